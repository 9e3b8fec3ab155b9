"""``uffdd page-server``: serve a directory of snapshot images over gRPC.

Why a ready file: with ``--listen 127.0.0.1:0`` the kernel picks the port; tests and
supervisors read the bound addresses (and the fast lane's) from the ``--ready-file``
(JSON, written atomically once the server accepts calls) or from the ``page server
listening`` log line. SIGTERM or SIGINT stops accepting calls, lets in-flight calls run for
``--grace`` seconds, then exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import click

from uffdd.core.errors import ConfigError
from uffdd.log import LEVELS, configure_logging, get_logger
from uffdd.pageserver.bulk_worker import DEFAULT_NICE
from uffdd.pageserver.ratelimit import parse_rate
from uffdd.pageserver.server import PageServer
from uffdd.pageserver.service import DEFAULT_BULK_CHUNK_SIZE, DEFAULT_CHUNK_SIZE
from uffdd.wire.tls import ServerTls

DEFAULT_LISTEN = "127.0.0.1:7070"


def _write_ready_file(path: Path, addresses: list[str], fast_lane_addresses: list[str]) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    content = {
        "pid": os.getpid(),
        "addresses": addresses,
        "fast_lane_addresses": fast_lane_addresses,
    }
    scratch.write_text(json.dumps(content) + "\n")
    scratch.replace(path)


async def _serve(server: PageServer, grace: float, ready_file: Path | None) -> None:
    log = get_logger("uffdd.page_server")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    addresses = await server.start()
    try:
        if ready_file is not None:
            _write_ready_file(ready_file, addresses, server.fast_lane_addresses)
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await server.stop(grace)


@click.command("page-server")
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Directory holding the images to serve (one subdirectory per image).",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="ADDRESS",
    help=f"host:port or unix:/path; repeatable (default {DEFAULT_LISTEN}; port 0 = any).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="PEM cert.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM key.")
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM CA bundle: require client certificates signed by it (mutual TLS).",
)
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds in-flight calls may run after SIGTERM.")  # fmt: skip
@click.option(
    "--chunk-size",
    type=click.IntRange(min=4096),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Largest data chunk in bytes (an urgent request waits behind at most one).",
)
@click.option(
    "--bulk-chunk-size",
    type=click.IntRange(min=4096),
    default=DEFAULT_BULK_CHUNK_SIZE,
    show_default=True,
    help="Largest chunk of a bulk request on the fast lane, in bytes (at least "
    "--chunk-size; bigger chunks cost less per byte on both ends).",
)
@click.option(
    "--bulk-worker/--no-bulk-worker",
    default=True,
    show_default=True,
    help="Send the fast lane's bulk data from a second process at a lower CPU priority, "
    "so urgent requests get the CPU first (not with TLS or --bulk-rate-limit).",
)
@click.option(
    "--urgent-thread/--no-urgent-thread",
    default=True,
    show_default=True,
    help="Answer the fast lane's urgent requests on a C thread of their own, without "
    "Python on the way (not with TLS; anything it does not serve goes to the event loop).",
)
@click.option(
    "--bulk-nice",
    type=click.IntRange(0, 19),
    default=DEFAULT_NICE,
    show_default=True,
    help="How much lower the bulk worker's CPU priority is (nice increment).",
)
@click.option(
    "--bulk-rate-limit",
    metavar="RATE",
    help="Cap background (bulk) data per second, e.g. 100M; demand faults are never capped.",
)
@click.option(
    "--fast-lane/--no-fast-lane",
    default=True,
    show_default=True,
    help="Also serve urgent fetches on a raw socket next to each listener (TCP: a port "
    "the kernel picks; unix:PATH: PATH.urgent); clients find it through ListImages.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write {pid, addresses} as JSON here once serving.",
)
@click.option("--log-format", type=click.Choice(["json", "console"]), default="json",
              show_default=True)  # fmt: skip
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
def page_server(
    *,
    images: Path,
    listen: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    grace: float,
    chunk_size: int,
    bulk_chunk_size: int,
    bulk_worker: bool,
    bulk_nice: int,
    urgent_thread: bool,
    bulk_rate_limit: str | None,
    fast_lane: bool,
    ready_file: Path | None,
    log_format: str,
    log_level: str,
) -> None:
    """Serve snapshot images to uffdd daemons (gRPC PageService, health, reflection)."""
    configure_logging(json=log_format == "json", level=log_level)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = ServerTls(tls_cert, tls_key, tls_client_ca)
    try:
        bulk_rate = None if bulk_rate_limit is None else parse_rate(bulk_rate_limit)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bulk-rate-limit") from exc
    try:
        server = PageServer(
            images,
            listen or (DEFAULT_LISTEN,),
            tls=tls,
            chunk_size=chunk_size,
            bulk_chunk_size=bulk_chunk_size,
            bulk_worker=bulk_worker,
            bulk_nice=bulk_nice,
            urgent_thread=urgent_thread,
            bulk_rate=bulk_rate,
            fast_lane=fast_lane,
        )
        asyncio.run(_serve(server, grace, ready_file))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
