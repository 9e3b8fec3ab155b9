"""The executor's C fast path against the real kernel: a local image, real processes.

Why here: the fast path answers faults without the core deciding each one, so what
must hold is checked end to end: every byte a process reads is the image's (or zeros
where the image or a madvise says so), a layout change (madvise, mremap, fork) is seen
before any later fault is served, and a chunk whose checksum fails is never installed.
The faulting workloads are separate processes (``support.workload``); the executor runs
on this test's event loop and the test talks to the workloads from worker threads.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from page_server_support import eventually
from support.workload import Workload, WorkloadPool, fault, remove, wait_readable

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import ProcId
from uffdd.core.outcomes import Outcome
from uffdd.core.policy import FaultPlan, Policy
from uffdd.core.process import LazyProcess, LazyRegion
from uffdd.core.wire import decode_messages
from uffdd.daemon.executor import Executor, TreeOutcome
from uffdd.daemon.sources import LocalImageSource
from uffdd.image.format import DATA_NAME, stored_ranges
from uffdd.image.reader import ImageReader
from uffdd.image.writer import ImageWriter
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.native.fast_serve import FastStatus, FastTable

pytestmark = pytest.mark.timeout(60)

P = 4096
CHUNK = 4 * P  # several checksum chunks per 64 KiB fault-around window
IMG = 0x40000000
HALF = 32  # pages in each of the two image regions
PAGES = 2 * HALF
ZERO_PAGES = {5, 6, 40}
FEATURES = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
ROOT = ProcId("fast")
MADV_DONTNEED = 4


def page_bytes(index: int) -> bytes:
    if index in ZERO_PAGES:
        return bytes(P)
    block = bytes((index * 37 + i * 11 + i // 253) & 0xFF or 1 for i in range(256))
    return block * (P // 256)


def expected(first: int, count: int) -> bytes:
    return b"".join(page_bytes(i) for i in range(first, first + count))


def build_image(root: Path) -> Path:
    """Two adjacent regions, the upper one written first: one lazy range of the process
    spans two DATA extents whose bytes are far apart in the data file."""
    with ImageWriter(root, "fast", chunk_size=CHUNK) as writer:
        writer.add_region(ImageAddr(IMG), HALF * P, "low")
        writer.add_region(ImageAddr(IMG + HALF * P), HALF * P, "high")
        writer.write(ImageAddr(IMG + HALF * P), expected(HALF, HALF))
        writer.write(ImageAddr(IMG), expected(0, HALF))
        return writer.commit()


class Harness:
    """A workload whose one lazy region is served by an Executor from a local image."""

    def __init__(self, pool: WorkloadPool, directory: Path, *, verify: bool = True) -> None:
        self.pool = pool
        self.reader = ImageReader.open(directory)
        if verify:
            assert self.reader.verify() == []
        self.workload = pool.start()
        self.uffd: Uffd = self.workload.create_uffd(FEATURES)
        self.base = self.workload.mmap(PAGES * P)
        self.uffd.register(self.base, PAGES * P, RegisterMode.MISSING)
        self.outcome: asyncio.Future[TreeOutcome] | None = None
        self.executor: Executor | None = None
        self.finished: dict[ProcId, LazyProcess] = {}
        """Processes of a tree the executor has forgotten (it became resident)."""

    def start(self) -> Executor:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[TreeOutcome] = loop.create_future()
        self.outcome = outcome
        self.executor = Executor(Policy(sweep=False))
        tracker = self.executor.tracker
        forget = tracker.forget_tree

        def keep_then_forget(root: ProcId) -> None:
            self.finished.update({p: tracker.process(p) for p in tracker.processes()})
            forget(root)

        tracker.forget_tree = keep_then_forget  # type: ignore[method-assign]
        self.executor.add_tree(
            ROOT,
            uffd=self.uffd,
            pid=self.workload.pid,
            pidfd=self.workload.pidfd,
            source=LocalImageSource(self.reader),
            image_id=self.reader.image_id,
            regions=[LazyRegion(RunAddr(self.base), ImageAddr(IMG), PAGES * P)],
            data=stored_ranges(self.reader.all_extents()),
            on_done=lambda result: _settle(outcome, result),
        )
        return self.executor

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.uffd.close()
        self.reader.close()

    async def read(self, workload: Workload, addr: int, length: int) -> bytes:
        """Read in pieces of 16 pages (a reply must fit one SEQPACKET message)."""
        parts = []
        for offset in range(0, length, 16 * P):
            size = min(16 * P, length - offset)
            parts.append(await asyncio.to_thread(workload.read, addr + offset, size))
        return b"".join(parts)

    def addr(self, page: int) -> int:
        return self.base + page * P

    def process(self, proc: ProcId = ROOT) -> LazyProcess:
        """A process of the tree, served now or already finished."""
        assert self.executor is not None
        if proc in self.executor.tracker.processes():
            return self.executor.tracker.process(proc)
        return self.finished[proc]

    def fetched(self, proc: ProcId = ROOT) -> int:
        """Bytes the slow path asked the source for (0: C served every data fault)."""
        return self.process(proc).stats.fetched


def _settle(future: asyncio.Future[TreeOutcome], result: TreeOutcome) -> None:
    if not future.done():
        future.set_result(result)


def run_served(
    directory: Path, body: Callable[[Harness], Awaitable[None]], *, verify: bool = True
) -> None:
    """Run ``body`` with the executor serving a fresh workload from the image."""
    with WorkloadPool() as pool:
        harness = Harness(pool, directory, verify=verify)

        async def main() -> None:
            harness.start()
            try:
                await asyncio.wait_for(body(harness), 45)
            finally:
                harness.close()

        asyncio.run(main())


def test_faults_on_verified_local_data_are_served_in_c(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert h.executor is not None
        # pages out of order, across the two regions' DATA extents and the zero pages
        for first, count in ((HALF - 2, 4), (3, 5), (50, 3), (0, 1), (20, 12), (39, 3)):
            assert await h.read(h.workload, h.addr(first), count * P) == expected(first, count)
        stats = h.process(ROOT).stats
        assert h.fetched() == 0, "a fault took the slow path"
        assert stats.faults > 0
        assert stats.data_installed > 0
        assert stats.latency.count == stats.faults
        # everything, including what fault-around brought in
        assert await h.read(h.workload, h.base, PAGES * P) == expected(0, PAGES)

    run_served(build_image(tmp_path / "images"), body)


def test_a_page_removed_after_fast_service_reads_zeros(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert await h.read(h.workload, h.addr(8), 8 * P) == expected(8, 8)
        # drop pages 10..13: some resident, and some never touched are in 14..
        await asyncio.to_thread(
            h.workload.call, "madvise", addr=h.addr(10), length=8 * P, advice=MADV_DONTNEED
        )
        assert await h.read(h.workload, h.addr(8), 12 * P) == (
            expected(8, 2) + bytes(8 * P) + expected(18, 2)
        )
        assert await h.read(h.workload, h.addr(24), 4 * P) == expected(24, 4)
        assert h.fetched() == 0

    run_served(build_image(tmp_path / "images"), body)


def test_an_mremap_then_a_touch_serves_the_moved_pages_at_the_new_address(
    tmp_path: Path,
) -> None:
    async def body(h: Harness) -> None:
        assert await h.read(h.workload, h.addr(0), P) == expected(0, 1)
        # move pages 16..47 (across both image regions, mostly untouched) elsewhere
        target = await asyncio.to_thread(h.workload.mmap, 32 * P)  # a place to move to
        reply = await asyncio.to_thread(
            h.workload.call, "mremap", addr=h.addr(16), length=32 * P, new_length=32 * P, to=target
        )
        moved = int(reply.result)
        assert moved == target
        assert await h.read(h.workload, moved + 10 * P, 12 * P) == expected(26, 12)
        assert await h.read(h.workload, moved, 32 * P) == expected(16, 32)
        assert await h.read(h.workload, h.addr(48), 16 * P) == expected(48, 16)
        assert h.fetched() == 0

    run_served(build_image(tmp_path / "images"), body)


def test_a_fork_child_reads_the_image_data_it_never_touched(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert await h.read(h.workload, h.addr(0), 4 * P) == expected(0, 4)
        # with EVENT_FORK the fork waits until the daemon read the event
        reply = await asyncio.to_thread(h.workload.call, "fork")
        child = h.pool.adopt_fork(reply)
        assert await h.read(child, h.addr(30), 20 * P) == expected(30, 20)
        assert await h.read(h.workload, h.addr(30), 4 * P) == expected(30, 4)
        assert await h.read(child, h.base, PAGES * P) == expected(0, PAGES)
        assert h.executor is not None
        assert h.process(ProcId(f"{ROOT}.1")).proc == f"{ROOT}.1"  # the fork was followed
        assert h.fetched() == h.fetched(ProcId(f"{ROOT}.1")) == 0

    run_served(build_image(tmp_path / "images"), body)


def test_a_corrupt_chunk_is_never_installed_and_the_process_is_killed(tmp_path: Path) -> None:
    directory = build_image(tmp_path / "images")
    # flip a byte of the data of image page 2 (the low region's bytes follow the high's)
    with (directory / DATA_NAME).open("r+b") as data:
        data.seek(HALF * P + 2 * P + 100)
        byte = data.read(1)
        data.seek(-1, os.SEEK_CUR)
        data.write(bytes([byte[0] ^ 0xFF]))

    async def body(h: Harness) -> None:
        # the background verification has run over the whole image first
        async def all_but_one_verified() -> bool:
            return sum(h.reader.verified) == h.reader.chunk_count - 1

        await eventually(all_but_one_verified)
        assert h.reader.verified[(HALF * P + 2 * P) // CHUNK] == 0
        assert await h.read(h.workload, h.addr(40), 8 * P) == expected(40, 8)
        h.workload.start_read(h.addr(2), P)
        assert h.outcome is not None
        outcome = await asyncio.wait_for(asyncio.shield(h.outcome), 20)
        assert outcome.failure is not None
        assert "checksum" in outcome.failure
        assert await asyncio.to_thread(h.workload.wait_exit) == -signal.SIGKILL

    run_served(directory, body, verify=False)


def test_fast_serve_hands_what_it_cannot_answer_back_raw_and_in_order(tmp_path: Path) -> None:
    data = bytearray(expected(0, 16))
    verified = bytearray([1, 0, 1, 1])  # chunk 1 (pages 4..7) is not verified
    with WorkloadPool() as pool:
        workload = pool.start()
        with workload.create_uffd(Feature.EVENT_REMOVE) as uffd:
            raw = workload.mmap(24 * P)
            base = -(-raw // (8 * P)) * (8 * P)  # fault-around windows aligned to base
            uffd.register(base, 16 * P, RegisterMode.MISSING)
            table = FastTable([(base, 16 * P, 0)], data, verified, 4 * P, FaultPlan(8 * P, False))
            try:
                # unverified data: the fault comes back for the slow path, untouched
                workload.start_read(base + 5 * P)
                wait_readable(uffd)
                result = uffd.fast_serve(table)
                assert (result.status, result.faults, result.installs) == (FastStatus.SLOW, 0, ())
                assert decode_messages(result.rest) == [fault(address=base + 5 * P)]
                assert uffd.copy(base + 5 * P, data[5 * P : 6 * P]).outcome is Outcome.DONE
                assert workload.finish_read() == expected(5, 1)
                # a verified page whose window holds the unverified chunk: the page alone
                workload.start_read(base + 2 * P)
                wait_readable(uffd)
                result = uffd.fast_serve(table)
                assert (result.status, result.faults, result.rest) == (FastStatus.DRAINED, 1, b"")
                assert result.installs == ((base + 2 * P, P),)
                assert workload.finish_read() == expected(2, 1)
                # a fully verified window goes whole
                workload.start_read(base + 9 * P)
                wait_readable(uffd)
                result = uffd.fast_serve(table)
                assert result.installs == ((base + 8 * P, 8 * P),)
                assert workload.finish_read() == expected(9, 1)
                # an event stops the fast path: it comes back raw
                workload.request("madvise", addr=base + 8 * P, length=2 * P, advice=MADV_DONTNEED)
                wait_readable(uffd)
                result = uffd.fast_serve(table)
                assert result.status is FastStatus.SLOW
                assert decode_messages(result.rest) == [
                    remove(start=base + 8 * P, end=base + 10 * P)
                ]
                workload.reply()
            finally:
                table.close()
