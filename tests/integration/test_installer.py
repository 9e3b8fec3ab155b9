"""The installer thread against real userfaultfds of real child processes.

What the executor relies on: a job installs exactly its bytes and reports like
UFFDIO_COPY; no piece runs while ``reading()`` is held; a fenced uffd's queued jobs end
with nothing installed and its running job stops between pieces with the bytes done
reported; any number of watched uffds can be fenced at once; a full queue refuses; an
errno no handler expects comes back as an error. Presence is checked in
/proc/PID/pagemap, and every installed byte in the child. Completions are waited for on
the installer's eventfd, the thread's progress on its counters (``stats()``).
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Iterator

import pytest
from support.threads import wait_thread_count, wait_threads_gone, wait_until
from support.workload import PAGE, Workload, WorkloadPool, fault, pattern, wait_events

from uffdd.core.outcomes import OpResult, Outcome
from uffdd.image.procmem import Mapping, populated_runs
from uffdd.kernel.uffd import RegisterMode, Uffd
from uffdd.native.installer import Completed, Installer

pytestmark = pytest.mark.timeout(60)

PIECE = 16 * PAGE


@pytest.fixture
def target(workloads: WorkloadPool) -> Iterator[tuple[Workload, Uffd]]:
    """A child process and its userfaultfd (registered regions come from _region)."""
    child = workloads.start()
    with child.create_uffd() as uffd:
        yield child, uffd


@pytest.fixture
def installer(target: tuple[Workload, Uffd]) -> Iterator[Installer]:
    """An installer whose fence table has a row for the target's uffd."""
    running = Installer(capacity=8, piece=PIECE)
    try:
        running.watch(target[1])
        yield running
    finally:
        running.close()


def _data(pages: int, seed: int = 3) -> bytearray:
    return bytearray(b"".join(pattern(seed + i) for i in range(pages)))


def _present(child: Workload, start: int, length: int) -> list[tuple[int, int]]:
    fd = os.open(f"/proc/{child.pid}/pagemap", os.O_RDONLY)
    try:
        return list(populated_runs(fd, Mapping(start, start + length, "rw-p", 0, 0, "")))
    finally:
        os.close(fd)


def _memory(child: Workload, start: int, length: int) -> bytes:
    """The child's bytes, through /proc/PID/mem (present pages only: no fault)."""
    fd = os.open(f"/proc/{child.pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, length, start)
    finally:
        os.close(fd)


def _wait_all(installer: Installer, count: int, timeout: float = 10.0) -> list[Completed]:
    """The next ``count`` completions, each waited for on the installer's eventfd."""
    taken: list[Completed] = []
    deadline = time.monotonic() + timeout
    while len(taken) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(taken)} of {count} jobs ended"
        select.select([installer.fd], [], [], left)
        taken.extend(installer.take())
    return taken


def _started(installer: Installer, pieces: int = 0) -> None:
    """Until the thread has made more than ``pieces`` pieces (the job in progress has
    made its first one)."""
    wait_until(lambda: installer.stats().pieces > pieces, "the job's first piece")


def _one_result(installer: Installer) -> OpResult | None:
    """The result of the one job outstanding, once it ends."""
    (done,) = _wait_all(installer, 1)
    return done.result


def _expect_installed(installer: Installer, child: Workload, base: int, data: bytearray) -> None:
    """The one job outstanding installs all of ``data`` at ``base``, byte for byte."""
    assert _one_result(installer) == OpResult(Outcome.DONE, len(data))
    assert _memory(child, base, len(data)) == data


def _region(child: Workload, uffd: Uffd, pages: int) -> int:
    base = child.mmap(pages * PAGE)
    uffd.register(base, pages * PAGE, RegisterMode.MISSING)
    return base


def test_a_job_installs_every_byte_and_reports_done(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    pages = 100  # not a multiple of the piece: the last piece is short
    base = _region(child, uffd, pages)
    data = _data(pages)
    job = installer.submit(uffd, base, memoryview(data), dontwake=True)
    assert job is not None
    (done,) = _wait_all(installer, 1)
    assert done == Completed(job, OpResult(Outcome.DONE, pages * PAGE))
    assert installer.pending == 0
    assert _present(child, base, pages * PAGE) == [(base, pages * PAGE)]
    assert _memory(child, base, pages * PAGE) == data


def test_a_job_without_dontwake_wakes_a_blocked_thread(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 40)
    child.start_read(base + 37 * PAGE, PAGE)  # in the job's last piece
    assert wait_events(uffd) == [fault(address=base + 37 * PAGE)]
    data = _data(40, seed=9)
    assert installer.submit(uffd, base, data, dontwake=False) is not None
    assert _one_result(installer) == OpResult(Outcome.DONE, 40 * PAGE)
    assert child.finish_read() == bytes(data[37 * PAGE : 38 * PAGE])


def test_no_piece_runs_while_a_read_holds_the_installer(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 32)
    data = _data(32)
    with installer.reading():
        assert installer.submit(uffd, base, data, dontwake=True) is not None
        # the thread has the job and its first piece waits for the lock this read holds
        wait_until(lambda: installer.stats().waiting_for_reader, "the piece waiting")
        stats = installer.stats()
        assert (stats.busy, stats.pieces, stats.queued) == (True, 0, 0)
        assert installer.take() == []
        assert _present(child, base, 32 * PAGE) == []
    _expect_installed(installer, child, base, data)
    assert installer.stats().pieces == 2  # 32 pages in pieces of 16


def test_a_fence_ends_queued_jobs_with_nothing_installed(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 64)
    first, second = _data(32, seed=1), _data(32, seed=2)
    with installer.reading() as fence:
        jobs = [
            installer.submit(uffd, base, first, dontwake=True),
            installer.submit(uffd, base + 32 * PAGE, second, dontwake=True),
        ]
        fence(uffd)
    installer.quiesce(uffd)
    taken = _wait_all(installer, 2)
    assert sorted(taken, key=lambda c: c.job) == [
        Completed(job, OpResult(Outcome.RETRY, 0)) for job in jobs if job is not None
    ]
    assert _present(child, base, 64 * PAGE) == []
    # Unfenced, the same uffd takes jobs again.
    installer.unfence(uffd)
    assert installer.submit(uffd, base, first, dontwake=True) is not None
    _expect_installed(installer, child, base, first)


def test_a_fence_stops_a_running_job_between_pieces(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    pages = 64 << 8  # 64 MiB: long enough to be caught mid-way
    data = _data(pages)
    # On a loaded machine this thread may lose the CPU until the whole job is done: such
    # an attempt shows nothing about the fence, so it is made again on a fresh region.
    for _ in range(5):
        base = _region(child, uffd, pages)
        pieces = installer.stats().pieces
        assert installer.submit(uffd, base, data, dontwake=True) is not None
        _started(installer, pieces)
        installer.fence(uffd)
        installer.quiesce(uffd)
        (done,) = _wait_all(installer, 1)
        assert done.result is not None
        if done.result.outcome is not Outcome.DONE:
            break
        installer.unfence(uffd)
    result = done.result
    assert result is not None
    copied = result.done
    assert result.outcome is Outcome.RETRY, "the job always ended before the fence"
    assert 0 < copied < pages * PAGE
    assert copied % PIECE == 0
    # Exactly the bytes reported went in, and nothing after them.
    assert _present(child, base, pages * PAGE) == [(base, copied)]
    assert _memory(child, base, copied) == data[:copied]


def test_any_number_of_watched_uffds_can_be_fenced_at_once() -> None:
    # Each fd is a uffd of this process: a fenced job ends before its first ioctl, so
    # none needs registered memory. (The table once had room for 16 fences.)
    uffds = [Uffd.create() for _ in range(40)]
    installer = Installer(capacity=64, piece=PIECE)
    try:
        for uffd in uffds:
            uffd.api()
            installer.watch(uffd)
        assert installer.stats().watched == len(uffds)
        data = _data(1)
        with installer.reading() as fence:
            jobs = [installer.submit(uffd, 0x10000, data, dontwake=True) for uffd in uffds]
            for uffd in uffds:
                fence(uffd)
        for uffd in uffds:
            installer.quiesce(uffd)
        taken = _wait_all(installer, len(uffds))
        assert sorted(taken, key=lambda c: c.job) == [
            Completed(job, OpResult(Outcome.RETRY, 0)) for job in jobs if job is not None
        ]
        assert installer.stats().pieces == 0
        for uffd in uffds:
            installer.unwatch(uffd)
        assert installer.stats().watched == 0
    finally:
        installer.close()
        for uffd in uffds:
            uffd.close()


def test_unwatch_drops_a_fence_with_the_row(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 16)
    installer.fence(uffd)
    installer.quiesce(uffd)
    installer.unwatch(uffd)  # released while fenced: its number may name a new uffd
    installer.watch(uffd)
    data = _data(16)
    assert installer.submit(uffd, base, data, dontwake=True) is not None
    _expect_installed(installer, child, base, data)


def test_a_negative_fd_is_refused_before_anything_is_read(installer: Installer) -> None:
    class NoFd:
        fd = -1

    with pytest.raises(OSError, match="cannot watch uffd -1"):
        installer.watch(NoFd())


def test_a_fault_moves_its_queued_job_first_and_the_job_wakes_it(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 3 * 32)
    waited = base + 2 * 32 * PAGE + 5 * PAGE  # in the third job
    child.start_read(waited, PAGE)
    assert wait_events(uffd) == [fault(address=waited)]
    datas = [_data(32, seed=s) for s in (1, 2, 3)]
    with installer.reading():  # no piece runs meanwhile
        submitted = [
            installer.submit(uffd, base + i * 32 * PAGE, datas[i], dontwake=True) for i in range(3)
        ]
        jobs = [job for job in submitted if job is not None]
        assert installer.expedite(uffd, waited)
        assert not installer.expedite(uffd, base + 3 * 32 * PAGE)  # no job there
    taken = [c.job for c in _wait_all(installer, 3)]
    # The third job went ahead of the second (the first may have been running).
    assert sorted(taken) == jobs
    assert taken.index(jobs[2]) < taken.index(jobs[1])
    # Nothing but the job can wake the reader: this test never wakes.
    assert child.finish_read() == bytes(datas[2][5 * PAGE : 6 * PAGE])
    assert _memory(child, base, 3 * 32 * PAGE) == b"".join(datas)


def test_a_fault_in_the_running_job_is_woken_by_its_pieces(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    pages = 64 << 8  # 64 MiB
    base = _region(child, uffd, pages)
    last = base + (pages - 1) * PAGE
    child.start_read(last, PAGE)
    assert wait_events(uffd) == [fault(address=last)]
    data = _data(pages)
    assert installer.submit(uffd, base, data, dontwake=True) is not None
    assert installer.expedite(uffd, last)
    # Nothing but the job's own pieces can wake the reader: this test never wakes.
    assert child.finish_read() == bytes(data[-PAGE:])
    assert _one_result(installer) == OpResult(Outcome.DONE, pages * PAGE)


def test_a_present_page_ends_a_job_like_uffdio_copy(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 48)
    assert uffd.copy(base + 20 * PAGE, pattern(99)).outcome is Outcome.DONE
    data = _data(48)
    assert installer.submit(uffd, base, data, dontwake=True) is not None
    (done,) = _wait_all(installer, 1)
    # Page 20 is the fifth of the second piece: that ioctl copied four pages and
    # stopped (EAGAIN with progress), so 20 pages are done and the rest is not.
    assert done.result == OpResult(Outcome.RETRY, 20 * PAGE)
    assert _present(child, base, 48 * PAGE) == [(base, 21 * PAGE)]
    assert installer.submit(uffd, base + 16 * PAGE, data[16 * PAGE :], dontwake=True)
    assert _one_result(installer) == OpResult(Outcome.EXISTS, 0)  # first page present


def test_a_full_queue_refuses_and_every_accepted_job_still_ends(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 9 * 16)
    with installer.reading():  # nothing ends meanwhile
        jobs = [
            installer.submit(uffd, base + i * 16 * PAGE, _data(16, seed=i), dontwake=True)
            for i in range(9)
        ]
    assert jobs[-1] is None  # the capacity is 8
    accepted = [job for job in jobs if job is not None]
    assert len(accepted) == 8
    taken = _wait_all(installer, 8)
    assert sorted(c.job for c in taken) == accepted
    assert all(c.result == OpResult(Outcome.DONE, 16 * PAGE) for c in taken)
    assert _present(child, base, 9 * 16 * PAGE) == [(base, 8 * 16 * PAGE)]


def test_an_unexpected_errno_comes_back_as_an_error(
    target: tuple[Workload, Uffd], installer: Installer
) -> None:
    child, uffd = target
    base = _region(child, uffd, 16)
    # Not page aligned: EINVAL, which no handler expects.
    assert installer.submit(uffd, base + 1, _data(1), dontwake=True) is not None
    (done,) = _wait_all(installer, 1)
    assert done.result is None
    assert done.error is not None
    assert done.error.errno == errno.EINVAL


def test_close_with_jobs_queued_returns(workloads: WorkloadPool) -> None:
    child = workloads.start()
    installer = Installer(capacity=8, piece=PIECE)
    with child.create_uffd() as uffd:
        base = _region(child, uffd, 64)
        with installer.reading():
            for index in range(3):
                installer.submit(uffd, base + index * 16 * PAGE, _data(16), dontwake=True)
        installer.close()
        installer.close()  # twice is fine
        assert installer.pending == 0


def test_close_stops_a_running_job_between_pieces(workloads: WorkloadPool) -> None:
    child = workloads.start()
    length = 256 << 20  # long enough to be caught mid-way
    data = bytearray(b"\x5a") * length
    with child.create_uffd() as uffd:
        # As in the fence test: an attempt whose job was done before close() shows
        # nothing about close, so it is made again with a fresh installer and region.
        for _ in range(5):
            installer = Installer(capacity=8, piece=PIECE)
            base = _region(child, uffd, length // PAGE)
            installer.submit(uffd, base, data, dontwake=True)
            _started(installer)
            installer.close()  # returns after the piece in progress, not the whole job
            ((start, copied),) = _present(child, base, length)
            if copied < length:
                break
        assert start == base
        assert 0 < copied < length, "the job always ended before close()"
        assert copied % PIECE == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="piece"):
        Installer(piece=1000)
    with pytest.raises(OSError, match="installer thread"):
        Installer(capacity=0)


def test_an_installer_dropped_unclosed_stops_before_its_buffers_go(
    workloads: WorkloadPool,
) -> None:
    child = workloads.start()
    installer = Installer(capacity=8, piece=PIECE)
    wait_thread_count("uffdd-install", 1)
    with child.create_uffd() as uffd:
        base = _region(child, uffd, 64)
        with installer.reading():
            installer.submit(uffd, base, _data(64), dontwake=True)
        del installer  # the last reference: __del__ joins the thread
        wait_threads_gone("uffdd-install")
