"""The fast lane end to end: urgent fetches over the page server's raw socket.

Real PageServers (in-process, and one ``uffdd page-server`` process) on 127.0.0.1 and
Unix sockets. The fast lane must give the same bytes and the same errors as gRPC,
survive garbage, and never leave a request hanging: when it breaks, what it carried
fails with PageServerUnavailable and later urgent requests take gRPC. The misbehaving
fast lanes here are small asyncio servers speaking the frames by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from page_server_support import (
    PAGE,
    Images,
    assert_rides,
    flip_byte,
    grpc_with_fake_fast_lane,
    make_certs,
    make_images,
    page_client,
    read_requests,
    run,
    serving,
)
from support.waiting import until

from uffdd.client.fast_lane import FastLane, candidates
from uffdd.client.page_client import Chunk, PageClient
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import PageServerError, PageServerUnavailable
from uffdd.demo.services import wait_for_path
from uffdd.image.format import DATA_NAME
from uffdd.pageserver.fast_lane import MAX_QUEUED
from uffdd.pageserver.server import PageServer
from uffdd.wire import fast_lane as wire
from uffdd.wire.tls import ClientTls, ServerTls

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
LAUNCH = [sys.executable, "-m", "uffdd", "page-server"]


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return make_images(tmp_path / "images")


# -- helpers -------------------------------------------------------------------------


async def on_fast_lane(client: PageClient) -> str:
    """Have ``client`` find and connect the server's fast lanes; the urgent one's address."""
    urgent, _ = await client.connect_fast_lanes()
    assert urgent is not None, "the urgent fast lane did not connect"
    return urgent


async def fetch_fast(client: PageClient, image_id: str, address: int, length: int) -> bytes:
    """Fetch over the fast lane (asserting it was the fast lane)."""
    stream = client.fetch(image_id, ImageAddr(address), length)
    assert stream.request is not None
    assert isinstance(stream.request.lane, FastLane)
    return bytes(await stream.read_all())


async def error_of(client: PageClient, image_id: str, address: int, length: int) -> str:
    """The exception class and status code a fetch fails with."""
    with pytest.raises(PageServerError) as caught:
        await client.fetch(image_id, ImageAddr(address), length).read_all()
    return f"{type(caught.value).__name__} {str(caught.value).split(':')[0]}"


def request_frame(
    request_id: int, image_id: str, address: int, length: int, *, bulk: bool = False
) -> bytes:
    return wire.encode_request(request_id, image_id.encode(), address, length, bulk=bulk)


# -- data ------------------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "chunk_size"), [("tcp", 4096), ("unix", 256 * 1024)])
def test_fast_lane_reads_back_exactly_what_was_written(
    images: Images, tmp_path: Path, transport: str, chunk_size: int
) -> None:
    listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/sock/pages.sock"

    async def scenario() -> None:
        async with (
            serving(images.root, [listen], chunk_size=chunk_size) as server,
            PageClient(server.addresses[0]) as client,
        ):
            address = await on_fast_lane(client)
            assert address in server.fast_lane_addresses
            for image_id, regions in images.regions.items():
                for region in regions:
                    whole = await fetch_fast(client, image_id, region.start, len(region.content))
                    assert whole == region.content
            # pieces across chunk and zero/data boundaries, pipelined
            anon = images.regions["mixed"][1]
            spans = [(anon.start + k * 40 * PAGE, 300 * PAGE) for k in range(8)]
            streams = [client.fetch("mixed", ImageAddr(a), n) for a, n in spans]
            for (start, length), stream in zip(spans, streams, strict=True):
                assert bytes(await stream.read_all()) == images.expected("mixed", start, length)
            assert client.fast_lane_address == address

    run(scenario)


def test_chunks_arrive_as_views_in_order(images: Images) -> None:
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        chunks: list[Chunk] = []
        async with (
            serving(images.root, chunk_size=64 * 1024) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await on_fast_lane(client)
            done: asyncio.Future[PageServerError | None] = asyncio.Future()
            client.submit(
                "mixed",
                ImageAddr(region.start),
                len(region.content),
                Priority.URGENT,
                on_chunk=chunks.append,
                on_done=done.set_result,
            )
            assert await done is None
        position = region.start
        for chunk in chunks:
            assert chunk.address == position
            if chunk.data is None:
                assert region.content[position - region.start :][: chunk.length] == bytes(
                    chunk.length
                )
            else:
                assert isinstance(chunk.data, memoryview)
                assert chunk.data.readonly
                assert len(chunk.data) == chunk.length <= 64 * 1024
            position += chunk.length
        assert position == region.start + len(region.content)

    run(scenario)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int, int, int, bytes]:
    """(request id, address, length, flags, body) of the next response frame."""
    header = await asyncio.wait_for(reader.readexactly(wire.RESPONSE.size), 10)
    request_id, address, length, flags, _, message_length, _ = wire.RESPONSE.unpack(header)
    body = await reader.readexactly(wire.body_length(length, flags, message_length))
    return request_id, address, length, flags, body


@contextlib.asynccontextmanager
async def raw_fast_lane(
    images: Images,
) -> AsyncIterator[tuple[PageServer, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A page server (4 KiB chunks) and a raw connection to its fast lane."""
    async with serving(images.root, chunk_size=4096) as server:
        host, port = server.fast_lane_addresses[0].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            yield server, reader, writer
        finally:
            writer.close()


def test_urgent_overtakes_bulk_queued_on_the_same_connection(images: Images) -> None:
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with raw_fast_lane(images) as (_, reader, writer):
            # 768 bulk chunks asked for, then one urgent page, in one write
            writer.write(
                request_frame(1, "mixed", region.start, len(region.content), bulk=True)
                + request_frame(2, "mixed", region.start + 700 * PAGE, PAGE)
            )
            order: list[int] = []
            bulk = bytearray()
            while True:
                request_id, address, length, flags, body = await read_response(reader)
                order.append(request_id)
                if request_id == 2:
                    assert body == images.expected("mixed", address, PAGE)
                    continue
                bulk += bytes(length) if flags & wire.FLAG_ZERO else body
                if flags & wire.FLAG_LAST:
                    break
            assert order.count(2) == 1
            assert order.index(2) < 16, "the urgent page waited behind the bulk transfer"
            assert bytes(bulk) == region.content

    run(scenario)


def test_cancelled_bulk_request_stops_and_the_connection_goes_on(images: Images) -> None:
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with raw_fast_lane(images) as (server, reader, writer):
            writer.write(request_frame(1, "mixed", region.start, len(region.content), bulk=True))
            first = await read_response(reader)
            assert first[:2] == (1, region.start)
            writer.write(wire.encode_cancel(1) + request_frame(2, "small", 0x1000, PAGE))
            while (response := await read_response(reader))[0] == 1:
                assert not response[3] & wire.FLAG_LAST, "the cancelled request was finished"
            assert response[0] == 2
            assert response[4] == images.expected("small", 0x1000, PAGE)
            assert server.fast_lane is not None
            (connection,) = server.fast_lane.connections
            assert connection.idle  # nothing of request 1 is held
            # nothing more of request 1 comes: the next answer is request 3's
            writer.write(request_frame(3, "small", 0x2000, PAGE))
            assert (await read_response(reader))[0] == 3

    run(scenario)


def test_duplicate_outstanding_request_id_is_refused(images: Images) -> None:
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with raw_fast_lane(images) as (_, reader, writer):
            big = request_frame(7, "mixed", region.start, len(region.content), bulk=True)
            writer.write(big + big)
            request_id, _, _, flags, message = await read_response(reader)
            assert (request_id, flags) == (7, wire.FLAG_ERROR | wire.FLAG_LAST)
            assert b"already outstanding" in message
            # the first request 7 is still answered, completely
            received = 0
            while True:
                request_id, _, length, flags, _ = await read_response(reader)
                assert request_id == 7
                received += length
                if flags & wire.FLAG_LAST:
                    break
            assert received == len(region.content)

    run(scenario)


def test_bulk_chunks_are_bigger_than_urgent_ones(images: Images) -> None:
    region = images.regions["mixed"][1]  # 1 MiB data, 1 MiB zeros, 1 MiB data, 8 KiB zeros

    async def scenario() -> dict[Priority, list[tuple[int, bool]]]:
        shapes: dict[Priority, list[tuple[int, bool]]] = {}
        async with (
            serving(images.root, chunk_size=64 * 1024, bulk_chunk_size=MiB) as server,
            page_client(server, "fast", "mixed") as client,
        ):
            for priority in Priority:
                stream = client.fetch(
                    "mixed", ImageAddr(region.start), len(region.content), priority
                )
                assert_rides(stream.request, "fast")
                chunks = [chunk async for chunk in stream]
                data = b"".join(bytes(c.length) if c.data is None else c.data for c in chunks)
                assert data == region.content
                shapes[priority] = [(c.length, c.data is None) for c in chunks]
        return shapes

    shapes = run(scenario)
    data, zeros, tail = (64 * 1024, False), (MiB, True), (2 * PAGE, True)
    assert shapes[Priority.URGENT] == [*[data] * 16, zeros, *[data] * 16, tail]
    assert shapes[Priority.BULK] == [(MiB, False), zeros, (MiB, False), tail]


# -- errors ------------------------------------------------------------------------------


def test_bad_requests_fail_as_they_do_over_grpc(images: Images) -> None:
    cases = [
        ("nope", 0x10000, PAGE),  # unknown image
        ("mixed", 0x9000000, PAGE),  # outside every region
        ("mixed", 0x10000 + 512, PAGE),  # misaligned address
        ("mixed", 0x10000, PAGE + 1),  # misaligned length
        ("mixed", 0x400000, 128 * 1024 * 1024),  # longer than the server allows
    ]
    results: list[str] = []

    async def scenario() -> None:
        async with (
            serving(images.root) as server,
            PageClient(server.addresses[0]) as fast,
            PageClient(server.addresses[0], fast_lane=False) as slow,
        ):
            await on_fast_lane(fast)
            for image_id, address, length in cases:
                over_grpc = await error_of(slow, image_id, address, length)
                over_fast_lane = await error_of(fast, image_id, address, length)
                assert over_fast_lane == over_grpc, (image_id, address, length)
                results.append(over_fast_lane)
            # and the lane carries on
            assert await fetch_fast(fast, "small", 0x1000, PAGE) == images.expected(
                "small", 0x1000, PAGE
            )
            assert fast.fast_lane_address is not None
        expected = {
            "PageServerNotFound NOT_FOUND",
            "PageServerNotFound OUT_OF_RANGE",
            "PageServerError INVALID_ARGUMENT",
        }
        assert set(results) <= expected
        assert len(results) == len(cases)

    run(scenario)


def test_corrupt_image_gives_data_loss_over_the_fast_lane(images: Images) -> None:
    flip_byte(images.root / "small" / DATA_NAME, 10)

    async def scenario() -> None:
        async with serving(images.root) as server, PageClient(server.addresses[0]) as client:
            await on_fast_lane(client)
            assert await error_of(client, "small", 0x1000, PAGE) == "PageServerDataError DATA_LOSS"
            data = await fetch_fast(client, "mixed", 0x10000, 2 * PAGE)
            assert data == images.expected("mixed", 0x10000, 2 * PAGE)

    run(scenario)


def test_garbage_closes_only_that_connection(images: Images) -> None:
    good = request_frame(7, "small", 0x1000, PAGE)
    garbage = {
        "bad magic": b"XXXX" + good[4:],
        "image id too long": wire.REQUEST.pack(wire.MAGIC, 1, 0x1000, PAGE, 5000) + b"x" * 64,
        "image id not UTF-8": wire.REQUEST.pack(wire.MAGIC, 1, 0x1000, PAGE, 2) + b"\xff\xfe",
        "truncated": good[:-3],
    }

    async def scenario() -> None:
        async with serving(images.root) as server:
            host, port = server.fast_lane_addresses[0].rsplit(":", 1)
            for name, frame in garbage.items():
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(good + frame)  # a good request first: it is still answered
                if name == "truncated":
                    writer.write_eof()
                header = await asyncio.wait_for(reader.readexactly(wire.RESPONSE.size), 10)
                request_id, address, length, flags, _, _, _ = wire.RESPONSE.unpack(header)
                assert (request_id, address, length, flags) == (7, 0x1000, PAGE, wire.FLAG_LAST)
                assert await reader.readexactly(PAGE) == images.expected("small", 0x1000, PAGE)
                assert await asyncio.wait_for(reader.read(), 10) == b"", name  # closed
                writer.close()
            # the server (and its fast lane) still serve everyone else
            async with PageClient(server.addresses[0]) as client:
                await on_fast_lane(client)
                assert await fetch_fast(client, "mixed", 0x10000, 8 * PAGE) == images.expected(
                    "mixed", 0x10000, 8 * PAGE
                )

    run(scenario)


# -- failures ----------------------------------------------------------------------------


def test_lane_lost_mid_request_fails_it_then_urgent_requests_take_grpc(images: Images) -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _, request_id, address, _ in read_requests(reader):
            writer.write(wire.encode_zero(request_id, address, PAGE, last=False))
            await writer.drain()
            writer.close()  # gone mid-request
            return

    async def scenario() -> None:
        async with (
            grpc_with_fake_fast_lane(images, half_answer) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await on_fast_lane(client)
            chunks: list[Chunk] = []
            done: asyncio.Future[PageServerError | None] = asyncio.Future()
            client.submit(
                "mixed",
                ImageAddr(0x400000),
                16 * PAGE,
                Priority.URGENT,
                on_chunk=chunks.append,
                on_done=done.set_result,
            )
            error = await asyncio.wait_for(done, 10)
            assert isinstance(error, PageServerUnavailable), error
            assert "fast lane lost" in str(error)
            assert len(chunks) == 1
            # later urgent requests go over gRPC, and get the right bytes
            assert client.fast_lane_address is None
            stream = client.fetch("mixed", ImageAddr(0x10000), 8 * PAGE)
            assert stream.request is not None
            assert not isinstance(stream.request.lane, FastLane)
            assert bytes(await stream.read_all()) == images.expected("mixed", 0x10000, 8 * PAGE)

    run(scenario)


def test_garbage_from_the_server_is_a_data_error_then_grpc(images: Images) -> None:
    async def lying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _, request_id, address, length in read_requests(reader):
            # right header, wrong checksum
            header = wire.encode_data_header(request_id, address, length, 12345, last=True)
            writer.write(header + b"\x01" * length)

    async def scenario() -> None:
        async with (
            grpc_with_fake_fast_lane(images, lying) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await on_fast_lane(client)
            assert await error_of(client, "small", 0x1000, PAGE) == (
                "PageServerDataError page server 127.0.0.1"
            )

    run(scenario)


def test_deadline_and_late_chunks(images: Images) -> None:
    async def scenario() -> None:
        expired = asyncio.Event()

        async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            """Answers, in order, only once the first request has missed its deadline."""
            async for _, request_id, address, length in read_requests(reader):
                await expired.wait()
                writer.write(wire.encode_zero(request_id, address, length, last=True))

        async with (
            grpc_with_fake_fast_lane(images, late) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await on_fast_lane(client)
            first = client.fetch("small", ImageAddr(0x1000), PAGE, deadline=0.2)
            with pytest.raises(PageServerUnavailable, match="deadline"):
                await first.read_all()  # nothing was answered yet: the deadline ended it
            expired.set()
            # the late answer to the expired request comes first and is dropped; the
            # next one is served
            data = await fetch_fast(client, "small", 0x1000, 2 * PAGE)
            assert data == bytes(2 * PAGE)
            assert client.fast_lane_address is not None

    run(scenario)


def test_cancelled_request_gets_no_callbacks_and_the_lane_goes_on(images: Images) -> None:
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with (
            serving(images.root, chunk_size=4096) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await on_fast_lane(client)
            calls: list[object] = []
            request = client.submit(
                "mixed",
                ImageAddr(region.start),
                len(region.content),
                Priority.URGENT,
                on_chunk=calls.append,
                on_done=calls.append,
            )
            assert isinstance(request.lane, FastLane)
            request.cancel()
            stream = client.fetch("mixed", ImageAddr(region.start), 2 * PAGE)
            stream.cancel()
            with pytest.raises(PageServerError, match="cancelled"):
                await stream.read_all()
            data = await fetch_fast(client, "small", 0x1000, 4 * PAGE)
            assert data == images.expected("small", 0x1000, 4 * PAGE)
            assert calls == []
            assert client.fast_lane_address is not None

    run(scenario)


@contextlib.contextmanager
def page_server_process(
    images: Images, tmp_path: Path, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """A ``uffdd page-server`` process and its ready file's content, once it wrote it
    (its output goes to a log, shown if it does not come up); killed and reaped after."""
    ready = tmp_path / "ready.json"
    log = tmp_path / "page-server.log"
    command = [
        *LAUNCH, "--images", str(images.root), "--ready-file", str(ready),
        "--log-level", "warning", *args,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink)
    try:
        wait_for_path(ready, "the page server", process, log)
        yield process, json.loads(ready.read_text())
    finally:
        process.kill()
        process.wait(timeout=10)


def test_page_server_process_killed_mid_request(images: Images, tmp_path: Path) -> None:
    with page_server_process(images, tmp_path, "--listen", "127.0.0.1:0") as (process, info):
        assert len(info["fast_lane_addresses"]) == 1

        async def scenario() -> None:
            # No deadline: whatever ends these requests is the server's death.
            async with PageClient(info["addresses"][0], deadline=None) as client:
                assert await on_fast_lane(client) == info["fast_lane_addresses"][0]
                process.send_signal(signal.SIGSTOP)  # it cannot answer: the request waits
                stream = client.fetch("mixed", ImageAddr(0x400000), 256 * PAGE)
                request = stream.request
                assert request is not None
                assert isinstance(request.lane, FastLane)
                assert request.sent  # on the wire, unanswered
                process.kill()
                with pytest.raises(PageServerUnavailable, match="fast lane lost"):
                    await stream.read_all()
                # gRPC is gone too: the next request fails as well
                with pytest.raises(PageServerUnavailable):
                    await client.fetch("small", ImageAddr(0x1000), PAGE).read_all()

        run(scenario)


def test_no_fast_lane_engine_knob(images: Images, tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "pages.sock"
    listen = f"unix:{socket_path}"
    engine = ("--engine", "fast_lane=off")
    with page_server_process(images, tmp_path, "--listen", listen, *engine) as (_, info):
        assert info["fast_lane_addresses"] == []

        async def scenario() -> None:
            async with PageClient(info["addresses"][0]) as client:
                # the discovery ends with no lane to connect
                assert await client.connect_fast_lanes() == (None, None)
                stream = client.fetch("small", ImageAddr(0x1000), PAGE)
                assert stream.request is not None
                assert not isinstance(stream.request.lane, FastLane)
                assert bytes(await stream.read_all()) == images.expected("small", 0x1000, PAGE)

        run(scenario)
        assert not Path(f"{socket_path}{wire.UNIX_SUFFIX}").exists()


# -- TLS ----------------------------------------------------------------------------------


def test_tls_and_mutual_tls(images: Images, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")

    async def refused(address: str, context: ssl.SSLContext | None) -> bool:
        """Whether the fast lane at ``address`` refuses to answer this client."""
        host, port = address.rsplit(":", 1)
        try:
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=context, server_hostname="127.0.0.1" if context else None
            )
        except (ssl.SSLError, ConnectionError):
            return True
        try:
            writer.write(request_frame(1, "small", 0x1000, PAGE))
            answer = await asyncio.wait_for(reader.read(wire.RESPONSE.size), 10)
        except (ssl.SSLError, ConnectionError):
            return True
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()
        return len(answer) < wire.RESPONSE.size

    async def scenario() -> None:
        tls = ServerTls(certs.server_cert, certs.server_key)
        async with serving(images.root, tls=tls) as server:
            async with PageClient(server.addresses[0], tls=ClientTls(ca=certs.ca)) as client:
                await on_fast_lane(client)
                data = await fetch_fast(client, "mixed", 0x400000, 300 * PAGE)
                assert data == images.expected("mixed", 0x400000, 300 * PAGE)
            assert await refused(server.fast_lane_addresses[0], None)  # plain text

        mutual = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca)
        async with serving(images.root, tls=mutual) as server:
            with_cert = ClientTls(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
            async with PageClient(server.addresses[0], tls=with_cert) as client:
                await on_fast_lane(client)
                data = await fetch_fast(client, "mixed", 0x10000, 8 * PAGE)
                assert data == images.expected("mixed", 0x10000, 8 * PAGE)
            anonymous = ssl.create_default_context(cafile=str(certs.ca))
            assert await refused(server.fast_lane_addresses[0], anonymous)

    run(scenario)


def test_request_frame_layout() -> None:
    frame = request_frame(5, "img", 0x7000, 3 * PAGE)
    assert frame == struct.pack("<4sQQIH", b"UFL1", 5, 0x7000, 3 * PAGE, 3) + b"img"
    assert wire.RESPONSE.size == 32


@pytest.mark.parametrize("bulk", [False, True], ids=["urgent", "bulk"])
def test_a_client_that_does_not_read_holds_bounded_memory(images: Images, bulk: bool) -> None:
    region = images.regions["mixed"][1]
    frames = b"".join(
        request_frame(index, "mixed", region.start, 1024 * 1024, bulk=bulk)
        for index in range(1, 3001)
    )

    async def scenario() -> None:
        async with serving(images.root, chunk_size=64 * 1024) as server:
            lane = server.fast_lane
            assert lane is not None
            host, port = server.fast_lane_addresses[0].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(frames)  # 3 GiB asked for, nothing read

            def held_back() -> bool:
                return any(c.backpressure == "client not reading" for c in lane.connections)

            await until(held_back, "the server stops reading a client that reads nothing")
            (stalled,) = lane.connections
            assert stalled.queued <= MAX_QUEUED
            # everyone else is still served, while that connection stays held back
            async with PageClient(server.addresses[0]) as client:
                await on_fast_lane(client)
                data = await fetch_fast(client, "small", 0x1000, PAGE)
                assert data == images.expected("small", 0x1000, PAGE)
            assert stalled.backpressure == "client not reading"
            assert stalled.queued <= MAX_QUEUED
            writer.close()
            del reader

    run(scenario)


def test_which_advertised_fast_lanes_a_client_may_use() -> None:
    advertised = ["0.0.0.0:7001", "10.0.0.5:7002", "unix:/run/a.sock.urgent", "unix:/b.urgent"]
    assert candidates("10.0.0.5:7000", advertised) == ["10.0.0.5:7001", "10.0.0.5:7002"]
    assert candidates("192.168.1.1:7000", advertised) == ["192.168.1.1:7001"]
    assert candidates("[::1]:7000", ["[::]:7003", "[::1]:7004"]) == ["[::1]:7003", "[::1]:7004"]
    assert candidates("unix:/b", advertised) == ["unix:/b.urgent", "unix:/run/a.sock.urgent"]
    assert candidates("unix:///run/a.sock", advertised)[0] == "unix:/run/a.sock.urgent"
