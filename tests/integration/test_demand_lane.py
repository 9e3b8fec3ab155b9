"""The demand thread against the real kernel: remote faults read, fetched and
installed in C.

Why here: the thread answers these faults without the core deciding each one, from
bytes that crossed a socket, while it owns the process's uffd, so what must hold is
checked end to end on real processes: every byte they read is the image's (or zeros
after a madvise, and known zeros are filled in C too), a layout change (madvise,
mremap, fork) reaches the core before any later fault is answered, a chunk with a
wrong checksum is never installed, and a lane that breaks gives its processes back to
the loop. The page server's gRPC side is the
real one; its fast lane is served by threads here (whatever answers the demand lane
must not run on the test's loop, which the executor's work runs on), from the image's
bytes, honestly or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import xxhash
from page_server_support import Images, eventually, make_images, serving
from support.workload import Workload, WorkloadPool

from uffdd.client.page_client import PageClient
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import ProcId
from uffdd.core.policy import Policy
from uffdd.core.process import LazyProcess, LazyRegion
from uffdd.daemon.executor import Executor, TreeOutcome
from uffdd.image.format import stored_ranges
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.wire import fast_lane as wire

pytestmark = pytest.mark.timeout(60)

P = 4096
IMAGE = "mixed"
START = 0x400000  # the image's "anon" region: 256 data pages, 256 zero, 256 data, 2 zero
PAGES = 770
FEATURES = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
ROOT = ProcId("remote")
MADV_DONTNEED = 4

DEMAND_MODES = ("honest", "bad checksum", "hang up")
"""How the fast lane answers the demand lane's connection: honestly, with the first
byte of every data chunk flipped (its checksum that of the right bytes), or by closing
after the first request. Every other
connection (the page client's own lanes) gets honest answers."""


class ThreadedFastLane:
    """A fast lane on 127.0.0.1 served by threads, from ``images``' bytes."""

    def __init__(self, images: Images, demand_mode: str) -> None:
        self.images = images
        self.demand_mode = demand_mode
        self.demand_peer: object = None  # the demand lane's address, once known
        self.requests: list[bool] = []  # per request: it came on the demand lane
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_all, daemon=True)
        self._accept.start()

    def _accept_all(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = self._listener.accept()
                self._connections.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn, peer), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        with contextlib.suppress(OSError), conn:
            while header := _read_exactly(conn, wire.REQUEST.size):
                _, request_id, address, length, id_length = wire.REQUEST.unpack(header)
                image_id = _read_exactly(conn, id_length).decode()
                demand = peer == self.demand_peer
                self.requests.append(demand)
                mode = self.demand_mode if demand else "honest"
                if mode == "hang up":
                    return
                data = self.images.expected(image_id, address, length)
                checksum = xxhash.xxh3_64_intdigest(data)
                if mode == "bad checksum":  # the bytes arrive damaged; the sum is the right one
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                conn.sendall(
                    wire.encode_data_header(request_id, address, length, checksum, True) + data
                )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close does not)
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in [self._accept, *self._threads]:
            thread.join(10)


def _read_exactly(conn: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        piece = conn.recv(length - len(data))
        if not piece:
            return b""
        data += piece
    return data


class Harness:
    """A workload whose lazy region (the image's "anon" region) is served by an
    Executor through a PageClient whose fast lane is ``lane``."""

    def __init__(self, pool: WorkloadPool, images: Images) -> None:
        self.pool = pool
        self.images = images
        self.workload = pool.start()
        self.uffd: Uffd = self.workload.create_uffd(FEATURES)
        self.base = self.workload.mmap(PAGES * P)
        self.uffd.register(self.base, PAGES * P, RegisterMode.MISSING)
        self.executor: Executor | None = None
        self.outcome: asyncio.Future[TreeOutcome] | None = None

    async def start(self, client: PageClient, lane: ThreadedFastLane) -> None:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[TreeOutcome] = loop.create_future()
        self.outcome = outcome
        info = await client.image_info(IMAGE)
        self.executor = Executor(Policy(sweep=False))
        self.executor.add_tree(
            ROOT,
            uffd=self.uffd,
            pid=self.workload.pid,
            pidfd=self.workload.pidfd,
            source=client,
            image_id=IMAGE,
            regions=[LazyRegion(RunAddr(self.base), ImageAddr(START), PAGES * P)],
            data=stored_ranges(info.extents),
            on_done=lambda result: None if outcome.done() else outcome.set_result(result),
        )

        async def lane_up() -> bool:
            return client.demand_lane() is not None

        await eventually(lane_up)
        demand = client.demand_lane()
        assert demand is not None
        lane.demand_peer = demand.local_address
        # the loop reads the first fault; then the demand thread takes the uffd over
        assert await self.read(self.workload, PAGES - 1, 1) == self.expected(PAGES - 1, 1)

        async def handed_over() -> bool:
            assert self.executor is not None
            return ROOT in self.executor.demand_served()

        await eventually(handed_over)

    def process(self) -> LazyProcess:
        assert self.executor is not None
        return self.executor.tracker.process(ROOT)

    async def read(self, workload: Workload, first: int, count: int) -> bytes:
        """Pages ``first`` .. ``first + count`` (16 at a time: one reply each)."""
        parts = []
        for page in range(first, first + count, 16):
            size = min(16, first + count - page) * P
            parts.append(await asyncio.to_thread(workload.read, self.base + page * P, size))
        return b"".join(parts)

    def expected(self, first: int, count: int) -> bytes:
        return self.images.expected(IMAGE, START + first * P, count * P)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.uffd.close()


@contextlib.contextmanager
def fast_lane(images: Images, demand_mode: str) -> Iterator[ThreadedFastLane]:
    lane = ThreadedFastLane(images, demand_mode)
    try:
        yield lane
    finally:
        lane.close()


def run_remote(
    tmp_path: Path, demand_mode: str, body: Callable[[Harness, ThreadedFastLane], Awaitable[None]]
) -> None:
    images = make_images(tmp_path / "images")

    async def main() -> None:
        with WorkloadPool() as pool, fast_lane(images, demand_mode) as lane:
            harness = Harness(pool, images)
            try:
                async with serving(images.root, fast_lane=False) as server:
                    server.service.fast_lane_addresses = [lane.address]
                    async with PageClient(server.addresses[0]) as client:
                        await harness.start(client, lane)
                        await asyncio.wait_for(body(harness, lane), 40)
            finally:
                harness.close()

    asyncio.run(main())


def test_remote_faults_are_fetched_and_installed_in_c(tmp_path: Path) -> None:
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        before = h.process().stats.fetched
        # across the data, the zero hole (never fetched: known zero) and the far data
        for first, count in ((3, 5), (250, 12), (300, 4), (600, 20), (0, 1), (767, 3)):
            assert await h.read(h.workload, first, count) == h.expected(first, count)
        stats = h.process().stats
        assert stats.fetched == before, "a data fault went through the page client"
        assert stats.faults > 0
        assert stats.latency.count == stats.faults
        assert any(lane.requests), "the demand lane asked for nothing"
        assert await h.read(h.workload, 0, PAGES) == h.expected(0, PAGES)

    run_remote(tmp_path, "honest", body)


def test_a_page_removed_after_c_served_it_reads_zeros(tmp_path: Path) -> None:
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        assert await h.read(h.workload, 8, 8) == h.expected(8, 8)
        await asyncio.to_thread(
            h.workload.call, "madvise", addr=h.base + 10 * P, length=8 * P, advice=MADV_DONTNEED
        )
        assert await h.read(h.workload, 8, 12) == (
            h.expected(8, 2) + bytes(8 * P) + h.expected(18, 2)
        )
        assert await h.read(h.workload, 24, 40) == h.expected(24, 40)
        assert any(lane.requests)

    run_remote(tmp_path, "honest", body)


def test_known_zeros_and_removed_pages_are_zero_filled_in_c(tmp_path: Path) -> None:
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        before = h.process().stats
        zero_fills, faults = before.zero_fills, before.faults
        # the image's zero hole (pages 256-511: a ZERO extent), read page after page
        assert await h.read(h.workload, 300, 40) == bytes(40 * P)
        # pages removed by madvise before they were ever read
        await asyncio.to_thread(
            h.workload.call, "madvise", addr=h.base + 20 * P, length=32 * P, advice=MADV_DONTNEED
        )
        assert await h.read(h.workload, 16, 40) == (
            h.expected(16, 4) + bytes(32 * P) + h.expected(52, 4)
        )
        stats = h.process().stats
        assert stats.faults > faults
        assert stats.zero_fills == zero_fills, "a zero fault went through the loop"
        everything = h.expected(0, 20) + bytes(32 * P) + h.expected(52, PAGES - 52)
        assert await h.read(h.workload, 0, PAGES) == everything

    run_remote(tmp_path, "honest", body)


def test_a_chunk_with_a_wrong_checksum_is_never_installed(tmp_path: Path) -> None:
    # the demand lane's answers lie; the page client's own lanes' do not
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        before = h.process().stats.fetched
        assert await h.read(h.workload, 40, 30) == h.expected(40, 30)
        assert await h.read(h.workload, 520, 8) == h.expected(520, 8)
        assert any(lane.requests), "the demand lane was not asked"
        # every window C refused went to the core, which fetched it on its own lanes
        assert h.process().stats.fetched > before
        assert h.outcome is not None
        assert not h.outcome.done(), "the process was ended"

    run_remote(tmp_path, "bad checksum", body)


def test_a_lane_that_hangs_up_leaves_its_faults_to_the_page_client(tmp_path: Path) -> None:
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        assert await h.read(h.workload, 100, 20) == h.expected(100, 20)
        assert lane.requests.count(True) == 1, "the broken lane was used again"
        assert await h.read(h.workload, 0, 256) == h.expected(0, 256)
        assert h.process().stats.fetched > 0

    run_remote(tmp_path, "hang up", body)


def test_an_mremap_moves_what_the_thread_serves_to_the_new_address(tmp_path: Path) -> None:
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        assert await h.read(h.workload, 0, 2) == h.expected(0, 2)
        target = await asyncio.to_thread(h.workload.mmap, 64 * P)  # a place to move to
        reply = await asyncio.to_thread(
            h.workload.call, "mremap", addr=h.base + 16 * P, length=64 * P,
            new_length=64 * P, to=target,
        )  # fmt: skip
        moved = int(reply.result)
        assert moved == target
        parts = [
            await asyncio.to_thread(h.workload.read, moved + i * P, 16 * P) for i in (0, 16, 32, 48)
        ]
        assert b"".join(parts) == h.expected(16, 64)
        assert await h.read(h.workload, 80, 40) == h.expected(80, 40)
        assert h.executor is not None
        assert ROOT in h.executor.demand_served()

    run_remote(tmp_path, "honest", body)


def test_sparse_memory_is_made_whole_a_block_per_fault(tmp_path: Path) -> None:
    first, count = 64, 64  # one page in two removed: data and zero runs of one page

    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        for page in range(first + 1, first + count, 2):
            await asyncio.to_thread(
                h.workload.call, "madvise", addr=h.base + page * P, length=P, advice=MADV_DONTNEED
            )
        faults = h.process().stats.faults
        expected = b"".join(
            bytes(P) if (page - first) % 2 else h.expected(page, 1)
            for page in range(first, first + count)
        )
        assert await h.read(h.workload, first, count) == expected
        taken = h.process().stats.faults - faults
        # a fault fetches its block's data runs and fills its zero runs: 4-5 blocks of
        # 16 pages (a page whose run the thread has not installed yet when the woken
        # reader gets to it faults again); a page at a time, it was 64 faults
        assert 0 < taken <= count // 4, taken

    run_remote(tmp_path, "honest", body)


def test_memory_grown_in_place_reads_zeros_a_block_per_fault(tmp_path: Path) -> None:
    keep = 704

    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        def mremap(length: int, new_length: int) -> int:
            reply = h.workload.call("mremap", addr=h.base, length=length, new_length=new_length)
            return int(reply.result)

        assert await asyncio.to_thread(mremap, PAGES * P, keep * P) == h.base  # the tail goes
        assert await asyncio.to_thread(mremap, keep * P, PAGES * P) == h.base  # and grows back
        fills = h.process().stats.zero_fills
        # never in the image (as brk or mremap grows memory): zeros, filled forward to
        # the end of each fault-around block, not a page per fault (the block that
        # crosses the mapping's end takes a few halving tries)
        assert await h.read(h.workload, keep, PAGES - keep) == bytes((PAGES - keep) * P)
        filled = h.process().stats.zero_fills - fills
        assert 0 < filled <= (PAGES - keep) // 16 + 6, filled  # 66 pages: 66 without
        assert await h.read(h.workload, 0, keep) == h.expected(0, keep)

    run_remote(tmp_path, "honest", body)


def test_a_fork_child_is_served_by_the_thread_too(tmp_path: Path) -> None:
    async def body(h: Harness, lane: ThreadedFastLane) -> None:
        assert await h.read(h.workload, 0, 4) == h.expected(0, 4)
        reply = await asyncio.to_thread(h.workload.call, "fork")  # waits for the event's read
        child = h.pool.adopt_fork(reply)
        assert await h.read(child, 30, 20) == h.expected(30, 20)
        assert h.executor is not None
        # (asked before the child is whole: a resident process is let go)
        assert ProcId(f"{ROOT}.1") in h.executor.demand_served()
        assert await h.read(h.workload, 30, 4) == h.expected(30, 4)
        assert await h.read(child, 0, PAGES) == h.expected(0, PAGES)

    run_remote(tmp_path, "honest", body)
