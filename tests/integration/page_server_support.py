"""Shared pieces of the page-server tests: real images, real servers, certificates.

Every server here is a real grpc.aio server on 127.0.0.1 port 0 or a Unix socket in a
temporary directory; every image is written with ImageWriter, and the test keeps the
bytes it wrote to compare against what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from support.waiting import until

from uffdd.client.fast_lane import FastLane
from uffdd.client.page_client import PageClient, Request
from uffdd.core.addresses import ImageAddr
from uffdd.image.writer import ImageWriter
from uffdd.pageserver.server import PageServer
from uffdd.wire import fast_lane as wire
from uffdd.wire.tls import ServerTls

PAGE = 4096
T = TypeVar("T")


def run(scenario: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
    """Run one async scenario with a hard timeout (a hang fails, never blocks)."""

    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(bounded())


@dataclass(frozen=True)
class RegionSpec:
    start: int
    content: bytes  # what the region must read as (zeros included)
    name: str


@dataclass(frozen=True)
class Images:
    root: Path
    regions: dict[str, list[RegionSpec]]

    def expected(self, image_id: str, address: int, length: int) -> bytes:
        for region in self.regions[image_id]:
            if region.start <= address and address + length <= region.start + len(region.content):
                offset = address - region.start
                return region.content[offset : offset + length]
        raise AssertionError(f"[{address:#x}, +{length:#x}) not inside one region")


def _pattern(rng: random.Random, pages: list[str]) -> bytes:
    """Region content page by page: 'd' random data, 'z' zeros."""
    return b"".join(rng.randbytes(PAGE) if kind == "d" else bytes(PAGE) for kind in pages)


def make_images(root: Path) -> Images:
    """Three images: a mixed one (data, zero holes, a region bigger than a chunk), a
    small one, and one that is all zeros."""
    rng = random.Random(1234)
    specs: dict[str, list[RegionSpec]] = {
        "mixed": [
            RegionSpec(0x10000, _pattern(rng, list("ddzzdzdd")), "[heap]"),
            # 3 MiB of data with a 1 MiB zero hole in the middle: several chunks
            RegionSpec(
                0x400000,
                _pattern(rng, ["d"] * 256 + ["z"] * 256 + ["d"] * 256 + ["z"] * 2),
                "anon",
            ),
            RegionSpec(0x7FF000000000, _pattern(rng, list("dzd")), "[stack]"),
        ],
        "small": [RegionSpec(0x1000, _pattern(rng, list("dddd")), "")],
        "zeros": [RegionSpec(0x200000, bytes(16 * PAGE), "bss")],
    }
    root.mkdir(parents=True, exist_ok=True)
    for image_id, regions in specs.items():
        with ImageWriter(root, image_id, page_size=PAGE) as writer:
            for region in regions:
                writer.add_region(ImageAddr(region.start), len(region.content), name=region.name)
                writer.write(ImageAddr(region.start), region.content)
            writer.commit()
    return Images(root, specs)


@contextlib.asynccontextmanager
async def serving(
    root: Path,
    listen: list[str] | None = None,
    *,
    tls: ServerTls | None = None,
    chunk_size: int = 256 * 1024,
    bulk_chunk_size: int | None = None,
    fast_lane: bool = True,
    bulk_rate: int | None = None,
    bulk_worker: bool = False,
    urgent_thread: bool = True,
) -> AsyncIterator[PageServer]:
    """A started PageServer; always stopped (grace 0) when the block ends. Bulk
    chunks on the fast lane are ``chunk_size`` too unless ``bulk_chunk_size`` says."""
    server = PageServer(
        root,
        listen or ["127.0.0.1:0"],
        tls=tls,
        chunk_size=chunk_size,
        bulk_chunk_size=bulk_chunk_size or chunk_size,
        fast_lane=fast_lane,
        bulk_rate=bulk_rate,
        bulk_worker=bulk_worker,
        urgent_thread=urgent_thread,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, *, what: str = "the condition"
) -> None:
    """Until ``check()`` holds, for states nobody announces (support/waiting.py)."""
    await until(check, what, timeout)


LANES = ["grpc", "fast"]
"""What a PageClient's requests ride, for tests that hold on every lane: the gRPC
streams only, or the fast lanes (urgent and bulk, each its own raw socket)."""


@contextlib.asynccontextmanager
async def page_client(
    server: PageServer, lanes: str, image_id: str, **options: Any
) -> AsyncIterator[PageClient]:
    """A PageClient of ``server`` whose requests all ride ``lanes`` (see LANES): for
    "fast", it returns once both fast lanes are connected."""
    async with PageClient(server.addresses[0], fast_lane=lanes == "fast", **options) as client:
        if lanes == "fast":
            await client.image_info(image_id)
            lanes_connected = await client.connect_fast_lanes()
            assert None not in lanes_connected, lanes_connected
        yield client


def assert_rides(request: Request | None, lanes: str) -> None:
    """``request`` went out on ``lanes`` (see LANES)."""
    assert request is not None
    assert isinstance(request.lane, FastLane) == (lanes == "fast"), request.lane


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody's certificate is signed by


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN=uffdd test {name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem",
            cwd=directory,
        )  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN=uffdd test {name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=directory,
        )  # fmt: skip
    return Certs(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of a file in place."""
    with path.open("r+b") as file:
        file.seek(offset)
        value = file.read(1)
        file.seek(offset)
        file.write(bytes((value[0] ^ 0xFF,)))
        file.flush()
        os.fsync(file.fileno())


# -- hand-written fast lanes -------------------------------------------------------

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_fast_lane(answer: Answer) -> AsyncIterator[str]:
    """A raw fast-lane server on 127.0.0.1 whose connections ``answer`` handles; every
    connection is closed (and its handler cancelled) when the block ends."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await answer(reader, writer)
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def grpc_with_fake_fast_lane(images: Images, answer: Answer) -> AsyncIterator[PageServer]:
    """A real page server (gRPC) advertising a hand-written fast lane instead of its own."""
    async with (
        fake_fast_lane(answer) as lane,
        serving(images.root, chunk_size=4096, fast_lane=False) as server,
    ):
        server.service.fast_lane_addresses = [lane]
        yield server


async def read_requests(
    reader: asyncio.StreamReader,
) -> AsyncIterator[tuple[bytes, int, int, int]]:
    """(magic, request id, address, length) of each request frame until the client
    hangs up."""
    while True:
        try:
            header = await reader.readexactly(wire.REQUEST.size)
        except asyncio.IncompleteReadError:
            return
        magic, request_id, address, length, id_length = wire.REQUEST.unpack(header)
        await reader.readexactly(id_length)
        yield magic, request_id, address, length
