"""Registration modes and the newer ioctls on a real process: write protection, minor
faults on shmem with CONTINUE, POISON, MOVE, and the SIGBUS feature."""

from __future__ import annotations

import errno
import os
import signal
from typing import Any

import pytest
from support.workload import PAGE, WorkloadError, WorkloadPool, fault, pattern, wait_events

from uffdd.core.errors import UffdOpError
from uffdd.core.outcomes import OpResult, Outcome
from uffdd.kernel.uffd import Feature, Ioctl, RegisterMode

pytestmark = pytest.mark.timeout(60)


def _patched(data: bytes, offset: int, patch: bytes) -> bytes:
    return data[:offset] + patch + data[offset + len(patch) :]


def test_write_protect_faults_carry_wp_and_writeprotect_resolves(
    workloads: WorkloadPool,
) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.PAGEFAULT_FLAG_WP) as uffd:
        data = pattern(70, 2 * PAGE)
        base = child.mmap(2 * PAGE, fill=data)  # resident before protection
        assert Ioctl.WRITEPROTECT in uffd.register(base, 2 * PAGE, RegisterMode.WP)
        assert uffd.writeprotect(base, 2 * PAGE, protect=True) == OpResult(Outcome.DONE, 2 * PAGE)
        assert child.read(base, 2 * PAGE) == data  # reads never fault

        child.start_write(base + PAGE + 5, b"abc")
        assert wait_events(uffd) == [fault(address=base + PAGE, write=True, wp=True)]
        assert uffd.writeprotect(base + PAGE, PAGE, protect=False).outcome is Outcome.DONE
        child.reply()
        data = _patched(data, PAGE + 5, b"abc")
        assert child.read(base, 2 * PAGE) == data

        # Page 0 is still protected; unprotect with DONTWAKE, then wake.
        child.start_write(base + 7, b"z")
        assert wait_events(uffd) == [fault(address=base, write=True, wp=True)]
        assert uffd.writeprotect(base, PAGE, protect=False, dontwake=True).outcome is (Outcome.DONE)
        assert uffd.fault_counts().waiting == 1
        uffd.wake(base, PAGE)
        child.reply()
        assert child.read(base, 2 * PAGE) == _patched(data, 7, b"z")


def test_copy_with_wp_installs_a_protected_page(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.PAGEFAULT_FLAG_WP) as uffd:
        base = child.mmap(PAGE)
        uffd.register(base, PAGE, RegisterMode.MISSING | RegisterMode.WP)
        child.start_read(base)
        assert wait_events(uffd) == [fault(address=base)]
        data = pattern(71)
        assert uffd.copy(base, data, wp=True).outcome is Outcome.DONE
        assert child.finish_read() == data

        child.start_write(base, b"!")
        assert wait_events(uffd) == [fault(address=base, write=True, wp=True)]
        uffd.writeprotect(base, PAGE, protect=False)
        child.reply()
        assert child.read(base) == b"!" + data[1:]


def test_minor_fault_on_shmem_resolved_by_continue(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.MINOR_SHMEM) as uffd:
        cached = pattern(80, 2 * PAGE)
        addr, memfd = child.mmap_memfd(2 * PAGE, fill=cached)
        try:
            assert Ioctl.CONTINUE in uffd.register(addr, 2 * PAGE, RegisterMode.MINOR)
            child.start_read(addr + PAGE)
            assert wait_events(uffd) == [fault(address=addr + PAGE, minor=True)]
            # CONTINUE maps whatever the page cache holds now: change it first.
            fresh = pattern(81)
            assert os.pwrite(memfd, fresh, PAGE) == PAGE
            assert uffd.continue_(addr + PAGE, PAGE) == OpResult(Outcome.DONE, PAGE)
            assert child.finish_read() == fresh

            child.start_read(addr)
            assert wait_events(uffd) == [fault(address=addr, minor=True)]
            assert uffd.continue_(addr, PAGE, dontwake=True).outcome is Outcome.DONE
            assert uffd.fault_counts().waiting == 1
            uffd.wake(addr, PAGE)
            assert child.finish_read() == cached[:PAGE]
            # A mapped page cannot be continued twice.
            assert uffd.continue_(addr, PAGE) == OpResult(Outcome.EXISTS, 0)
        finally:
            os.close(memfd)


def test_poison_makes_the_access_end_in_sigbus(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.POISON) as uffd:
        base = child.mmap(2 * PAGE)
        assert Ioctl.POISON in uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        data = pattern(90)
        assert uffd.copy(base, data).outcome is Outcome.DONE
        assert child.read(base) == data
        assert uffd.poison(base + PAGE, PAGE) == OpResult(Outcome.DONE, PAGE)
        assert uffd.poison(base, PAGE) == OpResult(Outcome.EXISTS, 0)  # already present

        child.start_read(base + PAGE)
        with pytest.raises(WorkloadError, match="hung up"):
            child.finish_read()
        assert child.wait_exit() == -signal.SIGBUS
        assert uffd.read_events() == []  # no fault was reported for the poisoned page


def test_sigbus_feature_replaces_fault_events(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.SIGBUS) as uffd:
        base = child.mmap(2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        data = pattern(91)
        assert uffd.copy(base, data).outcome is Outcome.DONE
        assert child.read(base) == data
        child.start_read(base + PAGE)
        with pytest.raises(WorkloadError, match="hung up"):
            child.finish_read()
        assert child.wait_exit() == -signal.SIGBUS
        assert uffd.read_events() == []


def test_move_moves_pages_within_the_process(workloads: WorkloadPool) -> None:
    # MOVE works only when issued by the process that owns the memory (and the uffd):
    # the child moves its own pages with the uffd it kept; the same request from the
    # test process (naming the child's addresses) is refused with EINVAL.
    child = workloads.start()
    with child.create_uffd(Feature.MOVE, keep=True) as uffd:
        data = pattern(100, 3 * PAGE)
        src = child.mmap(3 * PAGE, fill=data)  # private anonymous, resident, exclusive
        dst = child.mmap(3 * PAGE)
        assert Ioctl.MOVE in uffd.register(dst, 3 * PAGE, RegisterMode.MISSING)

        with pytest.raises(UffdOpError) as foreign:
            uffd.move(dst, src, PAGE)
        assert foreign.value.errno == errno.EINVAL

        def move(offset: int, length: int, allow_src_holes: bool = False) -> list[Any]:
            reply = child.call(
                "move",
                dst=dst + offset,
                src=src + offset,
                length=length,
                allow_src_holes=allow_src_holes,
            )
            result: list[Any] = reply.result
            return result

        assert move(PAGE, PAGE) == ["DONE", PAGE]
        # The source page is gone now: a hole stops the move (ENOENT) ...
        assert move(0, 3 * PAGE) == ["RETRY", PAGE]  # page 0 moved, stopped at the hole
        assert move(PAGE, PAGE) == ["EXISTS", 0]  # the destination is present
        assert move(2 * PAGE, PAGE) == ["DONE", PAGE]  # the rest is still in the source
        assert child.read(dst, 3 * PAGE) == data
        assert child.read(src, 3 * PAGE) == bytes(3 * PAGE)  # moved out, not copied
        assert uffd.read_events() == []


def test_move_of_a_hole(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.MOVE, keep=True) as uffd:
        src = child.mmap(2 * PAGE)
        dst = child.mmap(2 * PAGE)
        uffd.register(dst, 2 * PAGE, RegisterMode.MISSING)
        args = {"dst": dst, "src": src, "length": 2 * PAGE}
        assert child.call("move", **args).result == ["LAYOUT_CHANGED", 0]
        assert child.call("move", allow_src_holes=True, **args).result == ["DONE", 2 * PAGE]
        # Nothing arrived: the destination still faults.
        child.start_read(dst)
        assert wait_events(uffd) == [fault(address=dst)]
        assert uffd.zeropage(dst, PAGE).outcome is Outcome.DONE
        assert child.finish_read() == bytes(PAGE)


def test_move_of_a_page_shared_after_fork_is_refused(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(Feature.MOVE, keep=True) as uffd:
        data = pattern(102)
        src = child.mmap(PAGE, fill=data)
        dst = child.mmap(PAGE)
        uffd.register(dst, PAGE, RegisterMode.MISSING)
        forked, _ = workloads.fork(child)  # no EVENT_FORK: fork() does not wait
        with pytest.raises(WorkloadError, match="EBUSY"):
            child.call("move", dst=dst, src=src, length=PAGE)
        assert child.read(src) == data
        assert forked.read(src) == data
        child.start_read(dst)
        assert wait_events(uffd) == [fault(address=dst)]
        assert uffd.copy(dst, data).outcome is Outcome.DONE
        assert child.finish_read() == data
