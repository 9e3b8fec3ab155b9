"""``uffdd lazy-pages``: a drop-in for ``criu lazy-pages`` (same socket, same options).

Why CRIU's option names: operators swap the command in an existing migration script;
``-D/--images-dir``, ``-W/--work-dir``, ``--page-server --address A --port P``,
``-o/--log-file`` and ``-v`` mean what they mean to ``criu``. The process serves one
``criu restore --lazy-pages`` and exits: 0 when every task is fully resident, 1 when
the restore failed (the reason is logged and printed), 3 when a task exited on its own
before it was resident.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from uffdd.config import DaemonConfig
from uffdd.core.errors import ImageError
from uffdd.daemon.doors.criu import (
    EXIT_FAILED,
    LAZY_PAGES_SOCKET,
    CriuResult,
    bind_lazy_pages_socket,
    lazy_pages_once,
)
from uffdd.daemon.lifecycle import Daemon
from uffdd.image.criu.images import read_pstree
from uffdd.log import configure_logging, get_logger

_VERBOSITY = ("warning", "info", "debug")


def page_server_target(address: str | None, port: int | None) -> str:
    """``--address``/``--port`` as a gRPC target (``unix:/path`` passes through)."""
    if address is None:
        raise click.UsageError("--page-server needs --address (host, host:port or unix:/path)")
    if address.startswith("unix:"):
        return address
    if port is not None:
        host = f"[{address}]" if ":" in address and not address.startswith("[") else address
        return f"{host}:{port}"
    if ":" not in address:
        raise click.UsageError("--page-server needs --port (or --address HOST:PORT)")
    return address


@click.command("lazy-pages")
@click.option(
    "-D",
    "--images-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The dump's images (pstree, mm, pagemap; pages if local).",
)
@click.option(
    "-W",
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Where {LAZY_PAGES_SOCKET} is made (default: the images dir).",
)
@click.option(
    "--page-server",
    "use_page_server",
    is_flag=True,
    help="Fetch pages from uffdd page-server (images criu-<pid>) instead of -D.",
)
@click.option("--address", help="The page server: host, host:port or unix:/path.")
@click.option("--port", type=click.IntRange(1, 65535), help="The page server's port.")
@click.option(
    "--fetch-deadline",
    type=click.FloatRange(min=0.001),
    default=10.0,
    show_default=True,
    help="Seconds a page may take before the task is killed.",
)
@click.option("-o", "--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Log here.")
@click.option("-v", "verbose", count=True, help="More log (-v info, -vv debug).")
@click.option("--log-format", type=click.Choice(["json", "console"]), default="json",
              show_default=True)  # fmt: skip
def lazy_pages(
    *,
    images_dir: Path,
    work_dir: Path | None,
    use_page_server: bool,
    address: str | None,
    port: int | None,
    fetch_deadline: float,
    log_file: Path | None,
    verbose: int,
    log_format: str,
) -> None:
    """Serve a `criu restore --lazy-pages` (in place of `criu lazy-pages`)."""
    target = page_server_target(address, port) if use_page_server else None
    if not use_page_server and (address is not None or port is not None):
        raise click.UsageError("--address/--port need --page-server")
    try:
        read_pstree(images_dir)  # fail before criu restore connects
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    if log_file is not None:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        os.dup2(fd, sys.stderr.fileno())
        os.close(fd)
    configure_logging(json=log_format == "json", level=_VERBOSITY[min(verbose, 2)])
    result = asyncio.run(_run(images_dir, work_dir or images_dir, target, fetch_deadline))
    if result.reason:
        click.echo(f"uffdd lazy-pages: {result.reason}", err=True)
    sys.exit(result.code)


async def _run(
    images_dir: Path, work_dir: Path, target: str | None, fetch_deadline: float
) -> CriuResult:
    log = get_logger("uffdd.criu")
    daemon = Daemon(DaemonConfig(page_server=target or "", fetch_deadline=fetch_deadline))
    listener = bind_lazy_pages_socket(work_dir)
    log.info("listening", socket=str(work_dir / LAZY_PAGES_SOCKET), images=str(images_dir),
             page_server=target)  # fmt: skip
    results: list[CriuResult] = []

    async def door(running: Daemon) -> None:
        results.append(await lazy_pages_once(running, listener, images_dir, target))

    try:
        await daemon.run([door])
    finally:
        listener.close()
        (work_dir / LAZY_PAGES_SOCKET).unlink(missing_ok=True)
    return results[0] if results else CriuResult(EXIT_FAILED, "stopped before criu restore ended")


if __name__ == "__main__":
    lazy_pages()
