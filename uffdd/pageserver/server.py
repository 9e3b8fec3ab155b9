"""The page server process: a grpc.aio server with PageService, health and reflection.

Why these extras: health lets systemd, load balancers and the daemon's start-up probe
ask "is it serving?" the standard way, and reflection lets ``grpcurl list`` and
``grpcurl describe`` work without the .proto files at hand. Listening on TCP (with
optional TLS/mTLS) and on Unix sockets is just a list of addresses. Next to each
listener a fast lane (fast_lane.py) serves urgent fetches over a raw socket on
the same event loop, with the same TLS; ListImages advertises it.

``run`` is ``uffdd page-server``. Why a ready file: with ``--listen 127.0.0.1:0`` the
kernel picks the port; tests and supervisors read the bound addresses (and the fast
lane's) from it (JSON, written atomically once the server accepts calls), from the
``page server listening`` log line, or wait for systemd's READY=1. SIGTERM or SIGINT
stops accepting calls, lets in-flight calls run for the grace period, then returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

from grpc import aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from uffdd import systemd
from uffdd.config import (
    DEFAULT_BULK_CHUNK_SIZE,
    DEFAULT_BULK_NICE,
    DEFAULT_CHUNK_SIZE,
    PageServerConfig,
)
from uffdd.core.errors import ConfigError
from uffdd.kernel.sched import short_slice
from uffdd.log import get_logger
from uffdd.pageserver.bulk_worker import BulkWorker
from uffdd.pageserver.catalog import DEFAULT_MAX_REQUEST_LENGTH, ImageCatalog
from uffdd.pageserver.fast_lane import FastLaneServer
from uffdd.pageserver.service import SERVICE_NAME, PageService
from uffdd.wire.tls import ServerTls

HEALTH_SERVICE_NAME = "grpc.health.v1.Health"

_log = get_logger("uffdd.pageserver.server")


def grpc_options(max_message: int) -> list[tuple[str, int]]:
    """Channel arguments shared by the server and the client.

    Messages up to one chunk (plus framing) must pass in both directions; HTTP/2
    frames as large as allowed cut per-frame overhead on multi-MiB transfers.
    """
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
        ("grpc.so_reuseport", 0),
    ]


class _Health(Protocol):
    """What uffdd uses of grpc_health's asyncio servicer (its stubs lack the aio half)."""

    async def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


def _bound_address(listen: str, port: int) -> str:
    """The address clients dial: ``listen`` with port 0 replaced by the chosen port."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return listen
    host, _, _ = listen.rpartition(":")
    return f"{host}:{port}"


class PageServer:
    """Serve every image under ``images`` on each address in ``listen``."""

    def __init__(
        self,
        images: Path,
        listen: Sequence[str],
        *,
        tls: ServerTls | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        bulk_chunk_size: int = DEFAULT_BULK_CHUNK_SIZE,
        max_request_length: int = DEFAULT_MAX_REQUEST_LENGTH,
        bulk_rate: int | None = None,
        fast_lane: bool = True,
        bulk_worker: bool = False,
        bulk_nice: int = DEFAULT_BULK_NICE,
        urgent_thread: bool = True,
    ) -> None:
        if not listen:
            raise ConfigError("the page server needs at least one address to listen on")
        if not images.is_dir():
            raise ConfigError(f"image directory {images} does not exist")
        self.listen = list(listen)
        self.tls = tls
        self.catalog = ImageCatalog(images, max_request_length=max_request_length)
        self.service = PageService(
            self.catalog,
            chunk_size=chunk_size,
            bulk_chunk_size=bulk_chunk_size,
            bulk_rate=bulk_rate,
        )
        self.addresses: list[str] = []
        self.fast_lane_addresses: list[str] = []
        self._fast_lane_enabled = fast_lane
        self._urgent_thread = urgent_thread
        self.fast_lane: FastLaneServer | None = None
        # A second process for the fast lane's bulk connections (bulk_worker.py); an
        # SSL session cannot move there, and one bucket must see all rate-limited bulk.
        self.bulk_worker: BulkWorker | None = None
        if bulk_worker and fast_lane and tls is None and bulk_rate is None:
            self.bulk_worker = BulkWorker(
                images,
                chunk_size=chunk_size,
                bulk_chunk_size=self.service.bulk_chunk_size,
                max_request_length=max_request_length,
                nice=bulk_nice,
            )
        self._max_message = chunk_size + 64 * 1024
        # grpc.aio objects belong to the loop they are made in: made in start()
        self._health: _Health | None = None
        self._server: aio.Server | None = None

    async def start(self) -> list[str]:
        """Bind every address and start serving; returns the addresses as bound."""
        server = self._server = aio.server(options=grpc_options(self._max_message))
        self._health = health = cast(_Health, health_aio.HealthServicer())
        server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        credentials = None if self.tls is None else self.tls.credentials()
        for listen in self.listen:
            if listen.startswith("unix:") and not listen.startswith("unix://"):
                Path(listen.removeprefix("unix:")).parent.mkdir(parents=True, exist_ok=True)
            try:
                if credentials is None:
                    port = server.add_insecure_port(listen)
                else:
                    port = server.add_secure_port(listen, credentials)
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
            self.addresses.append(_bound_address(listen, port))
        await server.start()
        if self._fast_lane_enabled:
            try:
                await self._start_fast_lane()
            except ConfigError:
                await self.stop(0)
                raise
        # After the bulk worker and gRPC's threads started (children inherit it): the
        # thread that answers urgent requests gets the CPU soon after a wake-up.
        short_slice()
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        _log.info(
            "page server listening",
            addresses=self.addresses,
            fast_lane_addresses=self.fast_lane_addresses,
            images=str(self.catalog.root),
            tls="mutual" if self.tls and self.tls.client_ca else "on" if self.tls else "off",
        )
        return self.addresses

    async def _start_fast_lane(self) -> None:
        if self.bulk_worker is not None:
            await self.bulk_worker.start()
        lane = self.fast_lane = FastLaneServer(
            self.service,
            None if self.tls is None else self.tls.ssl_context(),
            self.bulk_worker,
            urgent_thread=self._urgent_thread,
        )
        for listen in self.listen:
            self.fast_lane_addresses += await lane.listen(listen)
        self.service.fast_lane_addresses = self.fast_lane_addresses

    async def stop(self, grace: float | None) -> None:
        """Stop accepting calls, give in-flight calls ``grace`` seconds, then cancel them."""
        _log.info("page server stopping", grace=grace)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        stopping = []
        if self.fast_lane is not None:
            self.service.fast_lane_addresses = []
            stopping.append(self.fast_lane.stop(grace))
        if self.bulk_worker is not None:
            stopping.append(self.bulk_worker.stop(grace))
        if self._server is not None:
            stopping.append(self._server.stop(grace))
        await asyncio.gather(*stopping)
        self.catalog.close()
        _log.info("page server stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def run(config: PageServerConfig) -> None:
    """``uffdd page-server``: serve until SIGTERM or SIGINT, then stop within the grace.

    Once the server accepts calls, the ready file (if any) is written atomically and
    systemd (if it started us) is told READY=1; ConfigError if it cannot start.
    """
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca)
    engine = config.engine
    server = PageServer(
        config.images,
        config.listen,
        tls=tls,
        chunk_size=config.chunk_size,
        bulk_chunk_size=config.bulk_chunk_size,
        bulk_worker=engine.bulk_worker,
        bulk_nice=engine.bulk_nice,
        urgent_thread=engine.urgent_thread,
        bulk_rate=config.bulk_rate,
        fast_lane=engine.fast_lane,
    )
    asyncio.run(_serve(server, config.grace, config.ready_file))


async def _serve(server: PageServer, grace: float, ready_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    addresses = await server.start()
    try:
        if ready_file is not None:
            _write_ready_file(ready_file, addresses, server.fast_lane_addresses)
        systemd.ready(f"serving on {', '.join(addresses)}")
        await stop.wait()
        _log.info("signal received, shutting down")
        systemd.stopping()
    finally:
        await server.stop(grace)


def _write_ready_file(path: Path, addresses: list[str], fast_lane_addresses: list[str]) -> None:
    """``{pid, addresses, fast_lane_addresses}`` as JSON, renamed into place whole."""
    scratch = path.with_name(f".{path.name}.tmp")
    content = {
        "pid": os.getpid(),
        "addresses": addresses,
        "fast_lane_addresses": fast_lane_addresses,
    }
    scratch.write_text(json.dumps(content) + "\n")
    scratch.replace(path)
