"""The bulk fast lane received on its own pthread (``uffdd.client.bulk_receiver``).

Real sockets throughout: a real page server on 127.0.0.1 and on a Unix socket for the
bytes, small hand-written fast lanes for a lying or dying server, and socket pairs for
the connection's own rules (frames from the loop never block it, one chunk per loop
turn, close ends the thread and closes the socket). What the threads are doing (frames
read, the queue full, a frame half in, the writer in a send) is waited for on their
counters (``ThreadedConnection.stats``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import xxhash
from page_server_support import (
    PAGE,
    Answer,
    Images,
    eventually,
    grpc_with_fake_fast_lane,
    make_certs,
    make_images,
    read_requests,
    run,
    serving,
)
from support.fds import open_fds
from support.threads import named_threads, wait_threads_gone, wait_until

from uffdd.client.bulk_receiver import ThreadedConnection
from uffdd.client.fast_lane import FastLane
from uffdd.client.page_client import Chunk, PageClient
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import (
    PageServerDataError,
    PageServerError,
    PageServerNotFound,
    PageServerUnavailable,
)
from uffdd.native._ffi import lib
from uffdd.wire import fast_lane as wire
from uffdd.wire.tls import ClientTls, ServerTls

pytestmark = pytest.mark.timeout(60)

THREAD_NAMES = ("uffdd-bulk-recv", "uffdd-bulk-send")  # a lane's reader and writer


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return make_images(tmp_path / "images")


def receiver_threads() -> list[str]:
    """This process's lane threads, readers and writers."""
    return [tid for name in THREAD_NAMES for tid in named_threads(name)]


async def receivers_become(count: int) -> None:
    """Until ``count`` lanes run their reader and writer (a new thread names itself
    when it starts)."""

    async def counted() -> bool:
        return all(len(named_threads(name)) == count for name in THREAD_NAMES)

    await eventually(counted, timeout=10)


async def receivers_gone() -> None:
    """Until no lane thread is left (a joined thread's entry lingers a moment)."""
    for name in THREAD_NAMES:
        wait_threads_gone(name)


async def bulk_lane_ready(client: PageClient) -> None:
    """Until the bulk fast lane is connected. A bulk submit is what starts connecting
    it; the submits made before it is connected ride gRPC, so a hand-written lane sees
    no request before the test's own."""
    await client.image_info("small")  # starts the discovery

    async def connected() -> bool:
        if client.fast_bulk_lane_address is not None:
            return True
        client.submit(
            "small",
            ImageAddr(0x1000),
            PAGE,
            Priority.BULK,
            on_chunk=lambda _: None,
            on_done=lambda _: None,
        )
        return False

    await eventually(connected, timeout=10)


async def fetch_bulk(
    client: PageClient, image_id: str, address: int, length: int
) -> tuple[list[Chunk], PageServerError | None]:
    chunks: list[Chunk] = []
    done: asyncio.Future[PageServerError | None] = asyncio.get_running_loop().create_future()
    request = client.submit(
        image_id,
        ImageAddr(address),
        length,
        Priority.BULK,
        on_chunk=chunks.append,
        on_done=done.set_result,
    )
    assert isinstance(request.lane, FastLane)
    assert request.lane.window is not None  # the bulk fast lane
    return chunks, await asyncio.wait_for(done, 10)


def joined(chunks: list[Chunk]) -> bytes:
    return b"".join(bytes(c.length) if c.data is None else bytes(c.data) for c in chunks)


# -- bytes from a real page server -----------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_bulk_lane_on_its_thread_gives_exactly_the_image(
    images: Images, tmp_path: Path, transport: str
) -> None:
    listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/sock/pages.sock"

    async def scenario() -> None:
        async with (
            serving(images.root, [listen], chunk_size=64 * 1024) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await bulk_lane_ready(client)
            await receivers_become(1)
            for image_id, regions in images.regions.items():
                for region in regions:
                    chunks, error = await fetch_bulk(
                        client, image_id, region.start, len(region.content)
                    )
                    assert error is None
                    assert joined(chunks) == region.content
                    for chunk in chunks:
                        if chunk.data is not None:
                            assert chunk.data.readonly
        # closing the client ended the thread, and the thread closed its socket
        await receivers_gone()

    run(scenario)  # the first gRPC use in a process opens gRPC's own fds for good
    before = open_fds()
    run(scenario)
    assert open_fds() <= before


def test_refused_bulk_requests_fail_with_the_servers_status(images: Images) -> None:
    # error frames carry a message body: the C reader sizes it from the header
    assert wire.RESPONSE.size == lib.UFFDD_FRAME_HEADER

    async def scenario() -> None:
        async with (
            serving(images.root) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await bulk_lane_ready(client)
            _, unknown = await fetch_bulk(client, "no-such-image", 0x1000, PAGE)
            assert isinstance(unknown, PageServerNotFound)
            assert str(unknown).startswith("NOT_FOUND: no-such-image"), unknown
            _, outside = await fetch_bulk(client, "small", 0x7FFF_0000_0000, PAGE)
            assert isinstance(outside, PageServerNotFound)
            assert str(outside).startswith("OUT_OF_RANGE: small"), outside
            # the lane goes on
            region = images.regions["small"][0]
            chunks, error = await fetch_bulk(client, "small", region.start, PAGE)
            assert error is None
            assert joined(chunks) == region.content[:PAGE]

    run(scenario)


def test_tls_bulk_lane_stays_on_the_loop(images: Images, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with (
            serving(
                images.root,
                tls=ServerTls(certs.server_cert, certs.server_key),
            ) as server,
            PageClient(server.addresses[0], tls=ClientTls(ca=certs.ca)) as client,
        ):
            await bulk_lane_ready(client)
            assert receiver_threads() == []
            chunks, error = await fetch_bulk(client, "mixed", region.start, 64 * PAGE)
            assert error is None
            assert joined(chunks) == region.content[: 64 * PAGE]

    run(scenario)


# -- a lying or dying server -------------------------------------------------------------


def answers(bulk_answer: Callable[[int, int, int], bytes], *, then_close: bool = False) -> Answer:
    """Zero pages for urgent requests; ``bulk_answer(id, address, length)`` for bulk."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for magic, request_id, address, length in read_requests(reader):
            if magic == wire.BULK_MAGIC:
                writer.write(bulk_answer(request_id, address, length))
                await writer.drain()
                if then_close:
                    return
            else:
                writer.write(wire.encode_zero(request_id, address, length, last=True))

    return answer


def data_frame(request_id: int, address: int, body: bytes, checksum: int | None = None) -> bytes:
    digest = xxhash.xxh3_64_intdigest(body) if checksum is None else checksum
    return wire.encode_data_header(request_id, address, len(body), digest, last=True) + body


@pytest.mark.parametrize(
    ("answer", "error_type", "words"),
    [
        pytest.param(
            answers(lambda i, a, n: data_frame(i, a, b"\x01" * n, checksum=12345)),
            PageServerDataError,
            "checksum mismatch",
            id="wrong checksum",
        ),
        pytest.param(
            answers(lambda i, a, n: wire.RESPONSE.pack(i, a, n, 0x80, 0, 0, 0)),
            PageServerDataError,
            "garbage",
            id="unknown flags",
        ),
        pytest.param(
            answers(
                lambda i, a, n: data_frame(i, a, b"\x01" * n)[: wire.RESPONSE.size + 100],
                then_close=True,
            ),
            PageServerUnavailable,
            "closed in the middle of a chunk",
            id="closed mid-body",
        ),
        pytest.param(
            answers(lambda i, a, n: b"", then_close=True),
            PageServerUnavailable,
            "closed by the server",
            id="closed before answering",
        ),
    ],
)
def test_a_bad_bulk_lane_fails_its_request_clearly(
    images: Images, answer: Answer, error_type: type[PageServerError], words: str
) -> None:
    async def scenario() -> None:
        async with (
            grpc_with_fake_fast_lane(images, answer) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await bulk_lane_ready(client)
            chunks, error = await fetch_bulk(client, "small", 0x1000, 4 * PAGE)
            assert isinstance(error, error_type), error
            assert words in str(error)
            assert chunks == []
        await receivers_gone()

    run(scenario)


def test_good_answers_from_a_hand_written_lane_arrive_whole(images: Images) -> None:
    body = bytes(range(256)) * 64  # 4 pages

    async def scenario() -> None:
        async with (
            grpc_with_fake_fast_lane(
                images, answers(lambda i, a, n: data_frame(i, a, body))
            ) as server,
            PageClient(server.addresses[0]) as client,
        ):
            await bulk_lane_ready(client)
            chunks, error = await fetch_bulk(client, "small", 0x1000, len(body))
            assert error is None
            assert joined(chunks) == body

    run(scenario)


# -- the connection's own rules, on a socket pair ------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.chunks: list[tuple[wire.ResponseHeader, bytes, int]] = []
        self.lost: list[PageServerError] = []
        self.turn = 0

    def on_chunk(self, header: wire.ResponseHeader, body: memoryview) -> None:
        assert body.readonly
        self.chunks.append((header, bytes(body), self.turn))

    def on_lost(self, _connection: ThreadedConnection, error: PageServerError) -> None:
        self.lost.append(error)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    return ours, theirs


@contextlib.asynccontextmanager
async def connection_pair(
    max_queued_bytes: int = 1 << 26, *, transport: str = "unix"
) -> AsyncIterator[tuple[ThreadedConnection, socket.socket, Recorder]]:
    ours, theirs = tcp_pair() if transport == "tcp" else socket.socketpair()
    recorder = Recorder()
    connection = ThreadedConnection(
        ours,
        asyncio.get_running_loop(),
        target="test",
        on_chunk=recorder.on_chunk,
        on_lost=recorder.on_lost,
        max_chunk_bytes=1 << 20,
        max_queued_bytes=max_queued_bytes,
    )
    try:
        yield connection, theirs, recorder
    finally:
        connection.close()
        theirs.close()


async def turns_of_burst(frames: list[bytes]) -> list[int]:
    """Send ``frames`` at once while the loop is blocked; the loop turn each arrived in."""
    async with connection_pair() as (connection, theirs, recorder):
        stop = False

        def tick() -> None:
            recorder.turn += 1
            if not stop:
                asyncio.get_running_loop().call_soon(tick)

        theirs.sendall(b"".join(frames))
        # the loop is busy (blocked here) while the thread takes in the whole burst
        wait_until(lambda: connection.stats.frames_read == len(frames), "the whole burst")
        assert recorder.chunks == []
        tick()

        async def all_in() -> bool:
            return len(recorder.chunks) == len(frames)

        await eventually(all_in, timeout=10)
        stop = True
        assert [h[0] for h, *_ in recorder.chunks] == list(range(1, len(frames) + 1))
        return [turn for *_, turn in recorder.chunks]


def test_a_burst_of_data_is_handed_on_a_little_per_loop_turn() -> None:
    size = 150 * 1024  # two of them pass TURN_BYTES
    frames = [data_frame(k, 0x1000 * k, bytes([k]) * size) for k in range(1, 9)]

    async def scenario() -> None:
        turns = await turns_of_burst(frames)
        per_turn = collections.Counter(turns)
        assert sorted(per_turn.values()) == [2, 2, 2, 2], per_turn

    run(scenario)


def test_a_run_of_zero_chunks_goes_in_one_loop_turn() -> None:
    frames = [wire.encode_zero(k, 0x1000 * k, PAGE, last=True) for k in range(1, 201)]

    async def scenario() -> None:
        turns = await turns_of_burst(frames)
        assert len(set(turns)) == 1

    run(scenario)


def test_a_server_faster_than_the_loop_holds_bounded_memory() -> None:
    frames = [data_frame(k, 0x1000 * k, bytes([k]) * 50_000) for k in range(1, 21)]  # 1 MB

    async def scenario() -> None:
        async with connection_pair(max_queued_bytes=100_000) as (connection, theirs, recorder):
            sender = threading.Thread(target=theirs.sendall, args=(b"".join(frames),))
            sender.start()
            # the loop is busy (blocked here): the thread must stop reading, not queue 1 MB
            wait_until(lambda: connection.stats.full, "the reader stopped, its queue full")
            stats = connection.stats
            assert stats.queued_bytes < 100_000 + 50_000
            assert stats.frames_read < len(frames)
            assert recorder.chunks == []

            async def all_in() -> bool:
                return len(recorder.chunks) == len(frames)

            await eventually(all_in, timeout=10)
            sender.join()
            assert [h[0] for h, *_ in recorder.chunks] == list(range(1, 21))
            assert connection.stats.queued_bytes == 0

    run(scenario)


async def receive_exactly(sock: socket.socket, total: int) -> bytes:
    received = bytearray()
    loop = asyncio.get_running_loop()
    while len(received) < total:
        piece = await loop.sock_recv(sock, 1 << 20)
        assert piece, "the connection closed early"
        received += piece
    return bytes(received)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_frames_from_the_loop_never_block_and_arrive_in_order(transport: str) -> None:
    async def scenario() -> None:
        async with connection_pair(transport=transport) as (connection, theirs, recorder):
            theirs.setblocking(False)
            frames = [bytes([k % 251]) * (256 * 1024) for k in range(64)]  # 16 MiB
            for frame in frames:
                connection.send(frame)  # the peer reads nothing yet: these must queue
            total = sum(map(len, frames))
            wait_until(lambda: connection.stats.sending, "the writer in a send")
            assert connection.stats.unsent_bytes > 0  # more than the socket holds
            assert await receive_exactly(theirs, total) == b"".join(frames)
            assert connection.stats.unsent_bytes == 0
            assert recorder.lost == []

    run(scenario)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_frames_from_the_loop_go_out_while_a_chunk_is_half_in(transport: str) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB
    frame = data_frame(7, 0x1000, body)

    async def scenario() -> None:
        async with connection_pair(transport=transport) as (connection, theirs, recorder):
            theirs.setblocking(False)
            theirs.send(frame[: len(frame) // 2])
            # the thread has the header, and waits in its read of the body
            wait_until(lambda: connection.stats.in_frame, "a frame half in")
            for k in range(3):
                request = bytes([k]) * 100
                connection.send(request)
                assert await asyncio.wait_for(receive_exactly(theirs, 100), 5) == request
            assert recorder.chunks == []
            await asyncio.get_running_loop().sock_sendall(theirs, frame[len(frame) // 2 :])

            async def arrived() -> bool:
                return bool(recorder.chunks)

            await eventually(arrived, timeout=10)
            ((header, received, _),) = recorder.chunks
            assert header[0] == 7
            assert received == body
            assert recorder.lost == []

    run(scenario)


def test_a_send_to_a_closed_peer_ends_the_lane_with_the_error() -> None:
    async def scenario() -> None:
        async with connection_pair(transport="tcp") as (connection, theirs, recorder):
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            theirs.close()  # with linger 0: a reset, not an EOF

            async def lost() -> bool:
                connection.send(b"x" * 100)
                return bool(recorder.lost)

            await eventually(lost, timeout=10)
            (error,) = recorder.lost
            assert isinstance(error, PageServerUnavailable)
            assert "lost" in str(error), error
            await receivers_gone()

    run(scenario)


def test_close_frees_frames_not_yet_sent() -> None:
    async def scenario() -> None:
        before = open_fds()
        async with connection_pair(transport="tcp") as (connection, _theirs, recorder):
            for _ in range(64):
                connection.send(bytes(256 * 1024))  # 16 MiB the peer never reads
            wait_until(lambda: connection.stats.sending, "the writer in a send")
            assert connection.stats.unsent_bytes > 0
            connection.close()  # with the writer blocked in a send to a full socket
            await receivers_gone()
            assert recorder.lost == []
        assert open_fds() <= before

    run(scenario)


def test_close_ends_the_thread_and_closes_the_socket() -> None:
    async def scenario() -> None:
        async with connection_pair() as (connection, theirs, recorder):
            fd = os.readlink(f"/proc/self/fd/{theirs.fileno()}")  # the pair's other end
            await receivers_become(1)
            connection.close()  # joins the thread
            await receivers_gone()
            assert theirs.recv(1) == b""  # our end is closed: EOF
            connection.send(b"ignored after close")
            assert recorder.lost == []  # close is not a loss
            assert fd.startswith("socket:")

    run(scenario)


def test_garbage_on_the_pair_is_reported_once_and_ends_the_thread() -> None:
    async def scenario() -> None:
        async with connection_pair() as (connection, theirs, recorder):
            theirs.sendall(wire.RESPONSE.pack(1, 0x1000, 2 << 20, 0, 0, 0, 0))  # > max

            async def lost() -> bool:
                return bool(recorder.lost)

            await eventually(lost, timeout=10)
            # closed by the loss: its reader is off the loop and its threads joined, so
            # nothing is left to report a second time
            assert connection.closed
            with pytest.raises(ValueError, match="closed"):
                connection.stats  # noqa: B018
            assert len(recorder.lost) == 1
            assert isinstance(recorder.lost[0], PageServerDataError)
            assert "garbage" in str(recorder.lost[0])
            assert recorder.chunks == []

            await receivers_become(0)

    run(scenario)
