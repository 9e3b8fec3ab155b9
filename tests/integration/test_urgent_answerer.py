"""The page server's urgent answerer thread (``uffdd-urgent``) against the event loop.

Real PageServers on 127.0.0.1 and Unix sockets, raw fast-lane connections speaking the
frames by hand. The thread must send exactly the frames the loop would (same chunks,
same bytes, same checksums), serve a connection without the loop while it can, and
give the connection back, before answering a byte of it, for everything it does not
serve (unknown images, refusals, corrupt data, bulk frames, garbage, truncated frames).
What the thread is doing (connections held, one waiting for its peer to read) is waited
for on its counters (``UrgentAnswerer.stats``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import xxhash
from page_server_support import (
    PAGE,
    Images,
    eventually,
    flip_byte,
    make_images,
    run,
    serving,
)
from support.fds import open_fds

from uffdd.client.page_client import PageClient
from uffdd.core.addresses import ImageAddr
from uffdd.image.format import DATA_NAME, ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.image.writer import ImageWriter
from uffdd.pageserver.server import PageServer
from uffdd.pageserver.urgent import UrgentAnswerer
from uffdd.wire import fast_lane as wire

pytestmark = pytest.mark.timeout(60)

Frame = tuple[int, int, int, int, int, bytes]
"""request id, address, length, flags, checksum, body."""


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return make_images(tmp_path / "images")


def frame(
    request_id: int, image_id: str, address: int, length: int, *, bulk: bool = False
) -> bytes:
    return wire.encode_request(request_id, image_id.encode(), address, length, bulk=bulk)


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    header = await asyncio.wait_for(reader.readexactly(wire.RESPONSE.size), 10)
    request_id, address, length, flags, _, message_length, checksum = wire.RESPONSE.unpack(header)
    body = await reader.readexactly(wire.body_length(length, flags, message_length))
    return request_id, address, length, flags, checksum, body


async def answers(reader: asyncio.StreamReader, count: int) -> dict[int, list[Frame]]:
    """Every frame of ``count`` requests, by request id, in the order each came."""
    found: dict[int, list[Frame]] = {}
    finished = 0
    while finished < count:
        got = await read_frame(reader)
        found.setdefault(got[0], []).append(got)
        finished += bool(got[3] & wire.FLAG_LAST)
    return found


@contextlib.asynccontextmanager
async def connect(
    server: PageServer, index: int = 0
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    address = server.fast_lane_addresses[index]
    if address.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(address.removeprefix("unix:"))
    else:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def opened(server: PageServer, *image_ids: str) -> PageServer:
    """Open images as a client's ImageInfo does first: the thread serves only those."""
    for image_id in image_ids:
        server.catalog.image(image_id)
    return server


def on_the_loop(server: PageServer) -> int:
    """Fast-lane connections the event loop serves (the thread's are not among them)."""
    assert server.fast_lane is not None
    return len(server.fast_lane.connections)


def the_thread(server: PageServer) -> UrgentAnswerer:
    """The server's urgent answerer."""
    assert server.fast_lane is not None
    answerer = server.fast_lane.urgent_answerer
    assert answerer is not None
    return answerer


async def waiting_for_output(server: PageServer, count: int) -> None:
    """Until ``count`` of the thread's connections wait for their peers to read."""

    async def waiting() -> bool:
        return the_thread(server).stats.waiting_for_output == count

    await eventually(waiting)


def check_bytes(images: Images, image_id: str, frames: dict[int, list[Frame]]) -> None:
    """Every data frame holds the image's bytes and their xxh3; zero frames cover zeros."""
    for chunks in frames.values():
        for _, address, length, flags, checksum, body in chunks:
            if flags & wire.FLAG_ERROR:
                continue
            expected = images.expected(image_id, address, length)
            if flags & wire.FLAG_ZERO:
                assert expected == bytes(length)
            else:
                assert body == expected
                assert checksum == xxhash.xxh3_64_intdigest(body)


def valid_requests(images: Images) -> list[tuple[str, int, int]]:
    heap, anon, stack = images.regions["mixed"]
    return [
        ("mixed", heap.start, PAGE),  # one data page
        ("mixed", heap.start, len(heap.content)),  # data, zeros, data: one frame per extent
        ("mixed", anon.start, len(anon.content)),  # several chunks, a 1 MiB zero hole
        ("mixed", anon.start + 255 * PAGE, 3 * PAGE),  # the last data page and the hole
        ("mixed", stack.start + 2 * PAGE, PAGE),
        ("small", 0x1000, 4 * PAGE),
        ("zeros", 0x200000, 16 * PAGE),
    ]


def bad_requests(images: Images) -> list[tuple[str, int, int]]:
    heap = images.regions["mixed"][0]
    return [
        ("nope", heap.start, PAGE),  # NOT_FOUND
        ("mixed", heap.start + 100, PAGE),  # INVALID_ARGUMENT: misaligned
        ("mixed", heap.start, 128 * 1024 * 1024),  # INVALID_ARGUMENT: too long
        ("mixed", heap.start + len(heap.content) - PAGE, 2 * PAGE),  # OUT_OF_RANGE
        ("mixed", 0x20000000, PAGE),  # OUT_OF_RANGE: no region
    ]


async def ask(
    server: PageServer, requests: list[tuple[str, int, int]], first_id: int
) -> dict[int, list[Frame]]:
    async with connect(server) as (reader, writer):
        writer.write(b"".join(frame(first_id + i, *request) for i, request in enumerate(requests)))
        return await answers(reader, len(requests))


@pytest.mark.parametrize(("transport", "chunk_size"), [("tcp", 64 * 1024), ("unix", 4096)])
def test_the_thread_sends_exactly_the_frames_the_loop_sends(
    images: Images, tmp_path: Path, transport: str, chunk_size: int
) -> None:
    requests = valid_requests(images)
    refused = bad_requests(images)

    async def scenario() -> None:
        found: dict[bool, dict[int, list[Frame]]] = {}
        for thread in (True, False):
            unix = f"unix:{tmp_path}/pages-{thread}.sock"
            async with serving(
                images.root,
                [unix if transport == "unix" else "127.0.0.1:0"],
                chunk_size=chunk_size,
                urgent_thread=thread,
            ) as server:
                opened(server, "mixed", "small", "zeros")
                async with connect(server) as (reader, writer):
                    writer.write(b"".join(frame(i + 1, *r) for i, r in enumerate(requests)))
                    served = await answers(reader, len(requests))
                    # answered with no connection on the loop: the thread did it
                    assert on_the_loop(server) == (0 if thread else 1)
                    first_bad = len(requests) + 1
                    writer.write(
                        b"".join(frame(first_bad + i, *r) for i, r in enumerate(refused))
                        + frame(first_bad + len(refused), *requests[0])
                    )
                    served |= await answers(reader, len(refused) + 1)
                    assert on_the_loop(server) == 1  # given back for the first refusal
                found[thread] = served
        assert found[True] == found[False]
        for index, (image_id, _, _) in enumerate(requests):
            check_bytes(images, image_id, {index + 1: found[True][index + 1]})
        codes = [found[True][len(requests) + 1 + i][0][3] for i in range(len(refused))]
        assert all(flags == wire.FLAG_ERROR | wire.FLAG_LAST for flags in codes)

    run(scenario)


def test_a_corrupt_chunk_is_never_sent_and_the_loop_reports_it(images: Images) -> None:
    anon = images.regions["mixed"][1]
    good, bad = anon.start, anon.start + 200 * PAGE
    with ImageReader.open(images.root / "mixed") as reader:
        (extent,) = reader.extents(ImageAddr(bad), PAGE)
        assert extent.kind is ExtentKind.DATA
        bad_offset = extent.data_offset
        (extent,) = reader.extents(ImageAddr(good), PAGE)
        assert extent.data_offset // reader.chunk_size != bad_offset // reader.chunk_size
    flip_byte(images.root / "mixed" / DATA_NAME, bad_offset)

    async def scenario() -> None:
        async with serving(images.root) as server, connect(server) as (reader, writer):
            opened(server, "mixed", "small")
            writer.write(frame(1, "mixed", good, PAGE))
            served = await answers(reader, 1)
            check_bytes(images, "mixed", served)
            assert on_the_loop(server) == 0
            writer.write(frame(2, "mixed", bad, PAGE) + frame(3, "small", 0x1000, PAGE))
            served = await answers(reader, 2)
            ((_, _, _, flags, _, message),) = served[2]
            assert flags == wire.FLAG_ERROR | wire.FLAG_LAST
            assert b"checksum mismatch" in message
            check_bytes(images, "small", {3: served[3]})
            assert on_the_loop(server) == 1

    run(scenario)


def test_cancels_are_dropped_and_bulk_garbage_and_truncation_go_to_the_loop(
    images: Images,
) -> None:
    anon = images.regions["mixed"][1]

    async def scenario() -> None:
        async with serving(images.root) as server:
            opened(server, "mixed", "small")
            async with connect(server) as (reader, writer):
                # a cancel of a request already answered: nothing comes of it
                writer.write(frame(1, "small", 0x1000, PAGE) + wire.encode_cancel(1))
                writer.write(frame(2, "small", 0x2000, PAGE))
                served = await answers(reader, 2)
                assert sorted(served) == [1, 2]
                assert on_the_loop(server) == 0
                # a bulk frame: the loop answers it, and everything after
                writer.write(frame(3, "mixed", anon.start, 64 * PAGE, bulk=True))
                writer.write(frame(4, "small", 0x3000, PAGE))
                served = await answers(reader, 2)
                check_bytes(images, "mixed", {3: served[3]})
                check_bytes(images, "small", {4: served[4]})
                assert sum(f[2] for f in served[3]) == 64 * PAGE
                assert on_the_loop(server) == 1
            async with connect(server) as (reader, writer):
                writer.write(frame(5, "small", 0x1000, PAGE) + b"JUNK" + bytes(40))
                served = await answers(reader, 1)
                check_bytes(images, "small", served)
                assert await asyncio.wait_for(reader.read(), 10) == b""  # hung up
            async with connect(server) as (reader, writer):
                writer.write(frame(6, "small", 0x1000, PAGE) + frame(7, "small", 0x2000, PAGE)[:9])
                writer.write_eof()
                served = await answers(reader, 1)
                check_bytes(images, "small", served)
                assert await asyncio.wait_for(reader.read(), 10) == b""

    run(scenario)


def test_a_peer_that_does_not_read_holds_only_itself(images: Images) -> None:
    anon = images.regions["mixed"][1]
    flood = b"".join(frame(i, "mixed", anon.start, 1024 * 1024) for i in range(1, 3001))

    async def scenario() -> None:
        async with (
            serving(images.root, chunk_size=64 * 1024) as server,
            connect(opened(server, "mixed", "small")) as (_, stalled),
        ):
            stalled.write(flood)  # 3 GiB asked for, nothing read
            await waiting_for_output(server, 1)  # the thread stopped writing to it
            for _ in range(3):  # others are answered, by the thread, promptly
                async with connect(server) as (reader, writer):
                    writer.write(frame(1, "small", 0x1000, PAGE))
                    check_bytes(images, "small", await answers(reader, 1))
            assert on_the_loop(server) == 0  # the stalled one too: the thread holds it
            assert the_thread(server).stats.waiting_for_output == 1
            async with PageClient(server.addresses[0]) as client:  # and gRPC is served
                data = await asyncio.wait_for(
                    client.fetch("small", ImageAddr(0x2000), PAGE).read_all(), 5
                )
                assert data == images.expected("small", 0x2000, PAGE)

    run(scenario)


def urgent_threads() -> int:
    """This process's threads named uffdd-urgent (pthreads: not in ``threading``)."""
    tasks = Path("/proc/self/task")
    return sum((task / "comm").read_text().strip() == "uffdd-urgent" for task in tasks.iterdir())


def test_stopping_answers_what_was_accepted_and_leaves_nothing_behind(tmp_path: Path) -> None:
    size = 32 * 1024 * 1024  # more than the socket buffers hold: the thread must wait
    content = os.urandom(size)
    with ImageWriter(tmp_path, "big", page_size=PAGE) as writer:
        writer.add_region(ImageAddr(0x10000000), size, name="big")
        writer.write(ImageAddr(0x10000000), content)
        writer.commit()

    async def scenario() -> None:
        warm = PageServer(tmp_path, ["127.0.0.1:0"])  # gRPC's pollers stay for the process
        await warm.start()
        await warm.stop(0)
        before = open_fds()
        assert urgent_threads() == 0
        server = PageServer(tmp_path, ["127.0.0.1:0"], chunk_size=64 * 1024)
        await server.start()
        stopped = False
        try:

            async def named() -> bool:  # the thread names itself once it runs
                return urgent_threads() == 1

            await eventually(named)
            async with connect(server) as (reader, writer), connect(server) as (other, out):
                out.write(frame(9, "nope", 0x1000, PAGE))  # one connection given back
                assert (await answers(other, 1))[9][0][3] & wire.FLAG_ERROR
                # "big" is not open yet: the loop answers first, then gives it back
                writer.write(frame(2, "big", 0x10000000, PAGE))
                assert (await answers(reader, 1))[2][0][5] == content[:PAGE]

                async def given_back() -> bool:
                    return the_thread(server).connections == 1

                await eventually(given_back)
                assert on_the_loop(server) == 1  # only the "nope" one
                writer.write(frame(1, "big", 0x10000000, size))
                await waiting_for_output(server, 1)  # the thread fills the socket, and waits
                stopping = asyncio.ensure_future(server.stop(10))
                received = bytearray()
                while True:
                    _, address, _, flags, checksum, body = await read_frame(reader)
                    assert address == 0x10000000 + len(received)
                    assert checksum == xxhash.xxh3_64_intdigest(body)
                    received += body
                    if flags & wire.FLAG_LAST:
                        break
                assert received == content
                await asyncio.wait_for(stopping, 15)
                stopped = True
                assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            if not stopped:
                await server.stop(0)
        assert urgent_threads() == 0
        assert open_fds() == before

    run(scenario)
