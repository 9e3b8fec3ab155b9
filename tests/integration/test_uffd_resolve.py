"""Faults of a real process resolved through Uffd: COPY, ZEROPAGE, DONTWAKE + WAKE,
partial progress, EEXIST, and the errors that must raise rather than return."""

from __future__ import annotations

import ctypes
import errno

import pytest
from support.workload import PAGE, WorkloadPool, fault, pattern, wait_events

from uffdd.core.errors import UffdOpError
from uffdd.core.outcomes import OpResult, Outcome
from uffdd.kernel.uffd import FaultCounts, Feature, Ioctl, RegisterMode

pytestmark = pytest.mark.timeout(60)


def test_copy_resolves_a_read_fault_byte_for_byte(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        base = child.mmap(4 * PAGE)
        ioctls = uffd.register(base, 4 * PAGE, RegisterMode.MISSING)
        assert Ioctl.COPY in ioctls
        assert Ioctl.ZEROPAGE in ioctls
        assert Ioctl.WAKE in ioctls

        child.start_read(base + 2 * PAGE + 100, 200)
        # Without EXACT_ADDRESS the kernel reports the page, not the byte.
        assert wait_events(uffd) == [fault(address=base + 2 * PAGE)]
        data = pattern(1)
        assert uffd.copy(base + 2 * PAGE, data) == OpResult(Outcome.DONE, PAGE)
        assert child.finish_read() == data[100:300]
        assert child.read(base + 2 * PAGE) == data


def test_write_fault_with_exact_address_and_thread_id(workloads: WorkloadPool) -> None:
    child = workloads.start()
    features = Feature.EXACT_ADDRESS | Feature.THREAD_ID
    with child.create_uffd(features) as uffd:
        assert uffd.info().features == features
        base = child.mmap(2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)

        child.start_write(base + PAGE + 123, b"hello")
        assert wait_events(uffd) == [fault(address=base + PAGE + 123, write=True, tid=child.pid)]
        data = pattern(2)
        assert uffd.copy(base + PAGE, data).outcome is Outcome.DONE
        child.reply()
        expected = data[:123] + b"hello" + data[128:]
        assert child.read(base + PAGE) == expected


def test_zeropage_resolves_with_zeros(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        base = child.mmap(2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        child.start_read(base, 2 * PAGE)
        assert wait_events(uffd) == [fault(address=base)]
        assert uffd.zeropage(base, PAGE) == OpResult(Outcome.DONE, PAGE)
        # The read goes on to the second page and faults there.
        assert wait_events(uffd) == [fault(address=base + PAGE)]
        data = pattern(3)
        assert uffd.copy(base + PAGE, data).outcome is Outcome.DONE
        assert child.finish_read() == bytes(PAGE) + data
        # A zero page is still writable memory of the child (copy-on-write).
        child.write(base + 10, b"xyz")
        assert child.read(base, 16) == bytes(10) + b"xyz" + bytes(3)


def test_dontwake_leaves_the_thread_asleep_until_wake(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        base = child.mmap(3 * PAGE)
        uffd.register(base, 3 * PAGE, RegisterMode.MISSING)
        child.start_read(base + PAGE)
        assert wait_events(uffd) == [fault(address=base + PAGE)]
        data = pattern(4, 3 * PAGE)
        # Fill the whole range, faulting page included, without waking anybody.
        assert uffd.copy(base, data, dontwake=True) == OpResult(Outcome.DONE, 3 * PAGE)
        # fdinfo counts threads blocked on this uffd: the reader is still waiting.
        assert uffd.fault_counts() == FaultCounts(unread=0, waiting=1)
        uffd.wake(base, 3 * PAGE)
        assert child.finish_read() == data[PAGE : 2 * PAGE]
        assert uffd.fault_counts() == FaultCounts(unread=0, waiting=0)
        assert child.read(base, 3 * PAGE) == data


def test_zeropage_dontwake_then_wake(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        base = child.mmap(PAGE, fill=None)
        uffd.register(base, PAGE, RegisterMode.MISSING)
        child.start_read(base)
        wait_events(uffd)
        assert uffd.zeropage(base, PAGE, dontwake=True) == OpResult(Outcome.DONE, PAGE)
        assert uffd.fault_counts().waiting == 1
        uffd.wake(base, PAGE)
        assert child.finish_read() == bytes(PAGE)


def test_partial_copy_reports_progress_and_exists(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        base = child.mmap(4 * PAGE)
        uffd.register(base, 4 * PAGE, RegisterMode.MISSING)
        data = pattern(5, 4 * PAGE)
        # Page 2 is resolved first (as a demand fault would be).
        child.start_read(base + 2 * PAGE)
        wait_events(uffd)
        assert uffd.copy(base + 2 * PAGE, data[2 * PAGE : 3 * PAGE]).outcome is Outcome.DONE
        assert child.finish_read() == data[2 * PAGE : 3 * PAGE]

        # A copy of the whole range stops at the present page: EAGAIN + bytes done.
        result = uffd.copy(base, data)
        assert result == OpResult(Outcome.RETRY, 2 * PAGE)
        assert result.partial
        # Retrying from where it stopped meets the present page first: EEXIST.
        again = uffd.copy(base + 2 * PAGE, memoryview(data)[2 * PAGE :])
        assert again == OpResult(Outcome.EXISTS, 0)
        assert not again.partial
        # Skip the present page and go on.
        rest = uffd.copy(base + 3 * PAGE, memoryview(data)[3 * PAGE :])
        assert rest == OpResult(Outcome.DONE, PAGE)
        assert child.read(base, 4 * PAGE) == data


def test_copy_from_an_address_in_our_own_memory(workloads: WorkloadPool) -> None:
    child = workloads.start()
    source = bytearray(pattern(6, 2 * PAGE))
    address = ctypes.addressof((ctypes.c_char * len(source)).from_buffer(source))
    with child.create_uffd() as uffd:
        base = child.mmap(2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        assert uffd.copy(base, address, 2 * PAGE) == OpResult(Outcome.DONE, 2 * PAGE)
        assert child.read(base, 2 * PAGE) == bytes(source)
        with pytest.raises(ValueError, match="length"):
            uffd.copy(base, address)


def test_bad_ranges_raise_uffd_op_error(workloads: WorkloadPool) -> None:
    child = workloads.start()
    with child.create_uffd() as uffd:
        # Two pages with a hole after them that nothing else maps.
        base = child.mmap(4 * PAGE)
        child.call("munmap", addr=base + 2 * PAGE, length=2 * PAGE)
        uffd.register(base, 2 * PAGE, RegisterMode.MISSING)
        with pytest.raises(UffdOpError) as unaligned:
            uffd.copy(base + 1, pattern(7))
        assert unaligned.value.errno == errno.EINVAL
        assert (unaligned.value.op, unaligned.value.start) == ("copy", base + 1)
        with pytest.raises(UffdOpError) as zero_length:
            uffd.zeropage(base, 0)
        assert zero_length.value.errno == errno.EINVAL
        with pytest.raises(UffdOpError) as outside:
            uffd.register(base + 2 * PAGE, 2 * PAGE, RegisterMode.MISSING)  # unmapped
        assert outside.value.op == "register"
        with pytest.raises(ValueError, match="bytes from"):
            uffd.copy(base, b"short", PAGE)
        # Nothing was installed by the failures: the page still faults and resolves.
        child.start_read(base)
        assert wait_events(uffd) == [fault(address=base)]
        assert uffd.copy(base, pattern(7)).outcome is Outcome.DONE
        assert child.finish_read() == pattern(7)
