"""Non-cooperative events of a real process: FORK, REMAP, REMOVE, UNMAP, the EAGAIN
they cause while unread, and the process going away (ESRCH)."""

from __future__ import annotations

import mmap

import pytest
from support.workload import (
    PAGE,
    WorkloadPool,
    fault,
    pattern,
    remap,
    remove,
    unmap,
    wait_events,
    wait_readable,
)

from uffdd.core.events import Fork, UffdEvent
from uffdd.core.outcomes import OpResult, Outcome
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd

pytestmark = pytest.mark.timeout(60)

EVENTS = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP


def test_fork_event_gives_a_working_uffd_for_the_child(workloads: WorkloadPool) -> None:
    parent = workloads.start()
    with parent.create_uffd(EVENTS) as uffd:
        base = parent.mmap(2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        # Page 0 is resident before the fork: the child inherits it.
        before = pattern(10)
        assert uffd.copy(base, before).outcome is Outcome.DONE

        parent.request("fork")  # fork() waits until the FORK event is read
        (event,) = wait_events(uffd)
        assert isinstance(event, Fork)
        with Uffd.adopt(event.child_fd) as child_uffd:
            assert child_uffd.info().features == EVENTS  # inherited, not renegotiated
            child = workloads.adopt_fork(parent.reply())
            assert child.pid != parent.pid

            # Page 1 is missing in both; each process faults on its own uffd.
            child.start_read(base + PAGE)
            assert wait_events(child_uffd) == [fault(address=base + PAGE)]
            assert uffd.read_events() == []
            child_data, parent_data = pattern(11), pattern(12)
            assert child_uffd.copy(base + PAGE, child_data).outcome is Outcome.DONE
            assert child.finish_read() == child_data

            parent.start_read(base + PAGE)
            assert wait_events(uffd) == [fault(address=base + PAGE)]
            assert uffd.copy(base + PAGE, parent_data).outcome is Outcome.DONE
            assert parent.finish_read() == parent_data

            assert child.read(base, 2 * PAGE) == before + child_data
            assert parent.read(base, 2 * PAGE) == before + parent_data


@pytest.mark.parametrize("with_unmap", [True, False], ids=["unmap-events", "no-unmap-events"])
def test_remap_event_reports_old_and_new_addresses(
    workloads: WorkloadPool, with_unmap: bool
) -> None:
    child = workloads.start()
    features = EVENTS if with_unmap else Feature(EVENTS & ~Feature.EVENT_UNMAP)
    with child.create_uffd(features) as uffd:
        base = child.mmap(3 * PAGE)
        uffd.register(base, 3 * PAGE, RegisterMode.MISSING)
        first = pattern(20)
        assert uffd.copy(base, first).outcome is Outcome.DONE
        target = child.mmap(3 * PAGE, prot="none")  # a place to move to

        child.request("mremap", addr=base, length=3 * PAGE, new_length=3 * PAGE, to=target)
        # With EVENT_UNMAP the kernel follows the REMAP with an UNMAP of the *old*
        # range (mremap unmaps the source once the pages moved); the process waits
        # for both to be read.
        expected: list[UffdEvent] = [remap(old=base, new=target, length=3 * PAGE)]
        if with_unmap:
            expected.append(unmap(start=base, end=base + 3 * PAGE))
        assert wait_events(uffd, count=len(expected)) == expected
        assert child.reply().result == target

        assert uffd.read_events() == []
        # The resident page moved along; the missing ones fault at their new address.
        child.start_read(target, 2 * PAGE)
        assert wait_events(uffd) == [fault(address=target + PAGE)]
        second = pattern(21)
        assert uffd.copy(target + PAGE, second).outcome is Outcome.DONE
        assert child.finish_read() == first + second
        # The old range is gone from the process: installing there says so.
        assert uffd.copy(base + 2 * PAGE, pattern(22)) == OpResult(Outcome.LAYOUT_CHANGED, 0)


def test_remove_event_after_dontneed_then_zeros(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(EVENTS) as uffd:
        base = child.mmap(4 * PAGE)
        uffd.register(base, 4 * PAGE, RegisterMode.MISSING)
        data = pattern(30, 4 * PAGE)
        assert uffd.copy(base, data).outcome is Outcome.DONE
        assert child.read(base, 4 * PAGE) == data

        child.request("madvise", addr=base + PAGE, length=2 * PAGE, advice=mmap.MADV_DONTNEED)
        assert wait_events(uffd) == [remove(start=base + PAGE, end=base + 3 * PAGE)]
        child.reply()

        # The range stays registered: the dropped page faults again; answer with zeros.
        child.start_read(base + PAGE)
        assert wait_events(uffd) == [fault(address=base + PAGE)]
        assert uffd.zeropage(base + PAGE, PAGE).outcome is Outcome.DONE
        assert child.finish_read() == bytes(PAGE)
        # Or unregister it: the kernel then fills zeros itself, no fault.
        uffd.unregister(base + 2 * PAGE, PAGE)
        assert child.read(base + 2 * PAGE) == bytes(PAGE)
        # Pages outside the removed range kept their data.
        assert child.read(base, PAGE) == data[:PAGE]
        assert child.read(base + 3 * PAGE) == data[3 * PAGE :]


def test_unmap_event_and_copy_into_the_hole(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(EVENTS) as uffd:
        base = child.mmap(3 * PAGE)
        uffd.register(base, 3 * PAGE, RegisterMode.MISSING)
        child.request("munmap", addr=base + PAGE, length=2 * PAGE)
        assert wait_events(uffd) == [unmap(start=base + PAGE, end=base + 3 * PAGE)]
        child.reply()
        assert uffd.copy(base + PAGE, pattern(40)) == OpResult(Outcome.LAYOUT_CHANGED, 0)
        data = pattern(41)
        assert uffd.copy(base, data) == OpResult(Outcome.DONE, PAGE)
        assert child.read(base) == data


def test_eagain_while_an_event_is_unread(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd(EVENTS) as uffd:
        base = child.mmap(4 * PAGE)
        uffd.register(base, 4 * PAGE, RegisterMode.MISSING)
        data = pattern(50, 2 * PAGE)

        child.request("madvise", addr=base + 3 * PAGE, length=PAGE, advice=mmap.MADV_DONTNEED)
        wait_readable(uffd)  # the REMOVE is queued and nobody has read it
        assert uffd.copy(base, data) == OpResult(Outcome.RETRY, 0)
        assert uffd.zeropage(base + 2 * PAGE, PAGE) == OpResult(Outcome.RETRY, 0)

        assert wait_events(uffd) == [remove(start=base + 3 * PAGE, end=base + 4 * PAGE)]
        # The flag is lowered by the madvise caller once it runs again: after its
        # reply, the retry must succeed.
        child.reply()
        assert uffd.copy(base, data) == OpResult(Outcome.DONE, 2 * PAGE)
        assert child.read(base, 2 * PAGE) == data


def test_gone_after_the_process_exits(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        base = child.mmap(2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        assert uffd.copy(base, pattern(60)).outcome is Outcome.DONE
        assert child.read(base) == pattern(60)
        child.request("exit", code=0)
        assert child.wait_exit() == 0
        assert uffd.copy(base + PAGE, pattern(61)) == OpResult(Outcome.GONE, 0)
        assert uffd.zeropage(base + PAGE, PAGE) == OpResult(Outcome.GONE, 0)
        assert uffd.read_events() == []
