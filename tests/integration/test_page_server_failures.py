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
from page_server_support import (
    LANES,
    PAGE,
    Images,
    assert_rides,
    make_certs,
    make_images,
    run,
    serving,
)
from support.waiting import until

from uffdd.client.page_client import PageClient
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import PageServerDataError, PageServerError, PageServerUnavailable
from uffdd.v1 import pages_pb2
from uffdd.wire import chunk_codec
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
        await asyncio.get_running_loop().create_future()  # never done: no answer, ever
        yield b""  # pragma: no cover - never reached

    async def scenario() -> None:
        # No client-wide deadline: the request's own is the only thing that can end it.
        async with fake_page_server(silent) as target, PageClient(target, deadline=None) as client:
            stream = client.fetch("x", ImageAddr(0x1000), PAGE, deadline=0.3)
            with pytest.raises(PageServerUnavailable, match="deadline"):
                await stream.read_all()

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


@pytest.mark.parametrize("lanes", LANES)
def test_server_going_away_fails_everything_outstanding_then_reconnects(
    images: Images, tmp_path: Path, lanes: str
) -> None:
    socket = f"unix:{tmp_path}/pages.sock"
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        # No deadline: whatever ends these requests is the server going away.
        async with PageClient(socket, deadline=None, fast_lane=lanes == "fast") as client:
            loop = asyncio.get_running_loop()
            outcomes: dict[Priority, list[asyncio.Future[PageServerError | None]]] = {
                p: [] for p in Priority
            }
            # Bulk data trickles at a page a second: no bulk request can be complete.
            async with serving(images.root, [socket], chunk_size=4096, bulk_rate=4096):
                assert await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
                if lanes == "fast":
                    assert None not in await client.connect_fast_lanes()
                requests = []
                for index in range(8):
                    priority = Priority.BULK if index % 2 else Priority.URGENT
                    outcome: asyncio.Future[PageServerError | None] = loop.create_future()
                    outcomes[priority].append(outcome)
                    request = client.submit(
                        "mixed",
                        ImageAddr(region.start),
                        1024 * 1024,
                        priority,
                        on_chunk=lambda chunk: None,
                        on_done=outcome.set_result,
                    )
                    assert_rides(request, lanes)
                    requests.append(request)
                await until(lambda: all(r.sent or r.done for r in requests), "every request sent")
            # The server stopped (grace 0) with requests in flight: every one ends. An
            # urgent one may be complete (a Unix socket's 4 MiB buffer holds its answer
            # whole).
            bulk = await asyncio.gather(*outcomes[Priority.BULK])
            urgent = await asyncio.gather(*outcomes[Priority.URGENT])
            assert all(isinstance(e, PageServerUnavailable) for e in bulk), bulk
            assert all(e is None or isinstance(e, PageServerUnavailable) for e in urgent), urgent
            with pytest.raises(PageServerUnavailable):
                await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
            # a new server on the same address: the client reconnects by itself
            async with serving(images.root, [socket]):
                await client.wait_ready(20)
                data = await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()
                assert data == images.expected("small", 0x1000, PAGE)

    run(scenario, timeout=45)


def test_unreachable_server_fails_fast() -> None:
    async def scenario() -> None:
        # No deadline: the refused connection is the only thing that can end these.
        async with PageClient("127.0.0.1:1", deadline=None) as client:
            with pytest.raises(PageServerUnavailable):
                await client.fetch("x", ImageAddr(0), PAGE).read_all()
            with pytest.raises(PageServerUnavailable):
                await client.image_info("x")

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
            first = streams[0].request
            assert first is not None
            # all of the first one's data arrived, and nothing of it was consumed
            await until(lambda: first.done, "the first request answered")
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
