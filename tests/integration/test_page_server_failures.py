"""PageClient when things go wrong: server gone, slow, lying; and TLS / mutual TLS.

A request must always end: with data, with the server's error, at its deadline, or
with PageServerUnavailable when the stream breaks; never a hang. The misbehaving
servers here are real gRPC servers with a hand-written Stream handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from page_server_support import PAGE, Images, eventually, make_certs, make_images, run, serving

from uffdd.client.page_client import PageClient
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import PageServerDataError, PageServerError, PageServerUnavailable
from uffdd.v1 import pages_pb2
from uffdd.wire import chunk_codec
from uffdd.wire.convert import Priority
from uffdd.wire.tls import ClientTls, ServerTls

pytestmark = pytest.mark.timeout(60)

StreamHandler = Callable[
    [AsyncIterable[pages_pb2.PageRequest], aio.ServicerContext[Any, Any]], AsyncIterator[bytes]
]


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return make_images(tmp_path / "images")


@contextlib.asynccontextmanager
async def fake_page_server(stream: StreamHandler) -> AsyncIterator[str]:
    """A gRPC server whose PageService/Stream is ``stream`` (pre-encoded chunks out)."""
    server = aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "uffdd.v1.PageService",
                {
                    "Stream": grpc.stream_stream_rpc_method_handler(
                        stream,
                        request_deserializer=pages_pb2.PageRequest.FromString,
                        response_serializer=lambda message: message,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def test_deadline_fails_a_request_the_server_never_answers() -> None:
    async def silent(
        requests: AsyncIterable[pages_pb2.PageRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            pass
        await asyncio.sleep(3600)
        yield b""  # pragma: no cover - never reached

    async def scenario() -> None:
        async with fake_page_server(silent) as target, PageClient(target) as client:
            started = asyncio.get_running_loop().time()
            stream = client.fetch("x", ImageAddr(0x1000), PAGE, deadline=0.3)
            with pytest.raises(PageServerUnavailable, match="deadline"):
                await stream.read_all()
            assert asyncio.get_running_loop().time() - started < 5

    run(scenario)


def test_checksum_mismatch_is_a_data_error() -> None:
    async def lying(
        requests: AsyncIterable[pages_pb2.PageRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            fetch = request.fetch
            data = memoryview(b"\x01" * fetch.length)
            yield chunk_codec.encode_data_chunk(
                fetch.request_id, fetch.image_address, data, checksum=12345, last=True
            )

    async def scenario() -> None:
        async with fake_page_server(lying) as target, PageClient(target) as client:
            with pytest.raises(PageServerDataError, match="checksum"):
                await client.fetch("x", ImageAddr(0x1000), PAGE).read_all()

    run(scenario)


def test_wrong_address_and_short_answers_are_data_errors() -> None:
    async def sloppy(
        requests: AsyncIterable[pages_pb2.PageRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            fetch = request.fetch
            shift = PAGE if fetch.request_id == 1 else 0  # 1: wrong place; 2: too short
            yield chunk_codec.encode_zero_chunk(
                fetch.request_id, fetch.image_address + shift, PAGE, last=True
            )

    async def scenario() -> None:
        async with fake_page_server(sloppy) as target, PageClient(target, lanes=1) as client:
            with pytest.raises(PageServerDataError, match="expected"):
                await client.fetch("x", ImageAddr(0x1000), PAGE).read_all()
            with pytest.raises(PageServerDataError, match="ended early"):
                await client.fetch("x", ImageAddr(0x1000), 2 * PAGE).read_all()

    run(scenario)


def test_server_going_away_fails_everything_outstanding_then_reconnects(
    images: Images, tmp_path: Path
) -> None:
    socket = f"unix:{tmp_path}/pages.sock"
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with PageClient(socket, deadline=20) as client:
            outcomes: dict[Priority, list[PageServerError | None]] = {p: [] for p in Priority}
            async with serving(images.root, [socket], chunk_size=4096):
                assert await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
                for index in range(8):
                    priority = Priority.BULK if index % 2 else Priority.URGENT
                    client.submit(
                        "mixed",
                        ImageAddr(region.start),
                        1024 * 1024,
                        priority,
                        on_chunk=lambda chunk: None,
                        on_done=outcomes[priority].append,
                    )
                await asyncio.sleep(0)
            # The server stopped (grace 0) with requests in flight: every one ends at
            # once. Bulk data goes a chunk per loop turn, so no bulk request is complete;
            # an urgent one may be (a Unix socket's 4 MiB buffer holds its answer whole).
            await eventually(lambda: _ready(sum(map(len, outcomes.values())) == 8), timeout=5)
            bulk, urgent = outcomes[Priority.BULK], outcomes[Priority.URGENT]
            assert all(isinstance(e, PageServerUnavailable) for e in bulk), bulk
            assert all(e is None or isinstance(e, PageServerUnavailable) for e in urgent), urgent
            with pytest.raises(PageServerUnavailable):
                await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
            # a new server on the same address: the client reconnects by itself
            async with serving(images.root, [socket]):

                async def fetch_works() -> bool:
                    try:
                        await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
                    except PageServerUnavailable:
                        return False
                    return True

                await eventually(fetch_works, timeout=20)

    run(scenario, timeout=45)


async def _ready(value: bool) -> bool:
    return value


def test_unreachable_server_fails_fast() -> None:
    async def scenario() -> None:
        async with PageClient("127.0.0.1:1", deadline=30) as client:
            started = asyncio.get_running_loop().time()
            with pytest.raises(PageServerUnavailable):
                await client.fetch("x", ImageAddr(0), PAGE).read_all()
            with pytest.raises(PageServerUnavailable):
                await client.image_info("x", timeout=5)
            assert asyncio.get_running_loop().time() - started < 10

    run(scenario)


def test_slow_consumer_bounds_bulk_requests_in_flight(images: Images) -> None:
    """With a 64 KiB window and a consumer that takes nothing, only the first bulk
    request is sent; the others wait in the client."""
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with (
            serving(images.root) as server,
            PageClient(server.addresses[0], window_bytes=64 * 1024) as client,
        ):
            streams = [
                client.fetch(
                    "mixed", ImageAddr(region.start + i * 64 * 1024), 64 * 1024, Priority.BULK
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.3)
            bulk = client._bulk
            assert len(bulk.bulk_queue) == 3  # held back: the window is full
            assert bulk.in_window == 64 * 1024  # the first one's data, not yet consumed
            for index, stream in enumerate(streams):
                start = index * 64 * 1024
                assert await stream.read_all() == region.content[start : start + 64 * 1024]

    run(scenario)


def test_a_failing_callback_cancels_only_its_request(images: Images) -> None:
    async def scenario() -> None:
        async with (
            serving(images.root) as server,
            PageClient(server.addresses[0], lanes=1) as client,
        ):
            done: list[PageServerError | None] = []

            def broken(chunk: object) -> None:
                raise RuntimeError("consumer bug")

            request = client.submit(
                "small",
                ImageAddr(0x1000),
                PAGE,
                Priority.URGENT,
                on_chunk=broken,
                on_done=done.append,
            )
            data = await client.fetch("small", ImageAddr(0x2000), PAGE).read_all()
            assert data == images.expected("small", 0x2000, PAGE)
            assert request.done
            assert done == []

    run(scenario)


# -- TLS ------------------------------------------------------------------------------


def test_tls_and_mutual_tls(images: Images, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")

    async def scenario() -> None:
        tls = ServerTls(certs.server_cert, certs.server_key)
        async with serving(images.root, tls=tls) as server:
            target = server.addresses[0]
            async with PageClient(target, tls=ClientTls(ca=certs.ca)) as client:
                assert await client.list_images() == ["mixed", "small", "zeros"]
                data = await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
                assert data == images.expected("small", 0x1000, PAGE)
            async with PageClient(target, tls=ClientTls(ca=certs.other_ca)) as untrusting:
                with pytest.raises(PageServerUnavailable):
                    await untrusting.list_images(timeout=5)
            async with PageClient(target) as plaintext:
                with pytest.raises(PageServerUnavailable):
                    await plaintext.list_images(timeout=5)

        mutual = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca)
        async with serving(images.root, tls=mutual) as server:
            target = server.addresses[0]
            with_cert = ClientTls(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
            async with PageClient(target, tls=with_cert) as client:
                data = await client.fetch("mixed", ImageAddr(0x10000), 8 * PAGE).read_all()
                assert data == images.expected("mixed", 0x10000, 8 * PAGE)
            async with PageClient(target, tls=ClientTls(ca=certs.ca)) as anonymous:
                with pytest.raises(PageServerUnavailable):
                    await anonymous.fetch("small", ImageAddr(0x1000), PAGE).read_all()

    run(scenario)
