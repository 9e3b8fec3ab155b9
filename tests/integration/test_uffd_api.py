"""Creating, adopting and negotiating userfaultfds on the real kernel; the probe."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Literal

import pytest
from support.workload import PAGE, WorkloadPool, fault, pattern, wait_events

from uffdd.core.errors import KernelSupportError, PeerProtocolError, UffdOpError
from uffdd.core.outcomes import OpResult, Outcome
from uffdd.kernel.probe import probe
from uffdd.kernel.uffd import Feature, Ioctl, RegisterMode, Uffd, kernel_features

pytestmark = pytest.mark.timeout(60)

UNKNOWN = Feature(1 << 30)  # no kernel has it (yet)


@pytest.mark.parametrize("method", ["auto", "syscall", "device"])
@pytest.mark.parametrize("nonblocking", [True, False])
def test_create_sets_cloexec_and_blocking_mode(
    method: Literal["auto", "syscall", "device"], nonblocking: bool
) -> None:
    uffd = Uffd.create(method=method, nonblocking=nonblocking)
    fd = uffd.fd
    assert uffd.fileno() == fd
    assert repr(uffd) == f"<Uffd fd={fd}>"
    assert not os.get_inheritable(fd)
    assert os.get_blocking(fd) is not nonblocking
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    uffd.close()
    uffd.close()  # idempotent
    assert uffd.closed
    assert repr(uffd) == "<Uffd closed>"
    with pytest.raises(ValueError, match="closed"):
        uffd.fileno()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_user_mode_only_fd_still_resolves_faults(workloads: WorkloadPool) -> None:
    # The flag only changes kernel-mode accesses; a fd made with it negotiates and
    # registers like any other (here on the test's own memory, never touched unresolved).
    with Uffd.create(user_mode_only=True) as uffd:
        uffd.api()
        region = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)
        try:
            view = ctypes.c_char.from_buffer(region)
            start = ctypes.addressof(view)
            del view
            uffd.register(start, PAGE, RegisterMode.MISSING)
            assert uffd.copy(start, pattern(200)) == OpResult(Outcome.DONE, PAGE)
            assert region[:] == pattern(200)  # present now: reading it does not fault
            uffd.unregister(start, PAGE)
        finally:
            region.close()


def test_read_on_an_idle_nonblocking_fd_returns_nothing() -> None:
    with Uffd.create() as uffd:
        uffd.api(Feature.EVENT_REMOVE)
        assert uffd.read_raw() == b""
        assert uffd.read_events() == []


def test_api_names_missing_features_and_leaves_the_fd_usable() -> None:
    with Uffd.create() as uffd:
        with pytest.raises(KernelSupportError) as refused:
            uffd.api(Feature.MOVE | UNKNOWN)
        assert refused.value.missing == ("bit30",)
        assert "bit30" in str(refused.value)
        # A refused handshake does not count: the fd can still be negotiated.
        info = uffd.api(Feature.MOVE | Feature.EVENT_FORK)
        assert info.features == Feature.MOVE | Feature.EVENT_FORK
        assert info.available == kernel_features()
        assert info.ioctls == Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER
        assert uffd.info().features == Feature.MOVE | Feature.EVENT_FORK
        # Once per fd.
        with pytest.raises(UffdOpError) as again:
            uffd.api(Feature.MOVE)
        assert (again.value.op, again.value.errno) == ("api", errno.EINVAL)


def test_api_drops_wishes_but_not_requirements() -> None:
    with Uffd.create() as uffd:
        info = uffd.api(Feature.THREAD_ID | UNKNOWN, required=Feature.THREAD_ID)
        assert info.features == Feature.THREAD_ID
        assert uffd.info().features == Feature.THREAD_ID
    with Uffd.create() as uffd:
        with pytest.raises(KernelSupportError) as refused:
            uffd.api(Feature.THREAD_ID, required=UNKNOWN | Feature.SIGBUS)
        assert refused.value.missing == ("bit30",)
        assert uffd.api(Feature.SIGBUS).features == Feature.SIGBUS


def test_this_kernel_offers_every_known_feature() -> None:
    # shared/PROTOCOLS.md: Linux 6.18 grants all 17 features (0x1ffff).
    assert kernel_features() == Feature(0x1FFFF)
    assert len(Feature) == 17


def test_info_of_an_adopted_fd_and_serving_with_it(workloads: WorkloadPool) -> None:
    child = workloads.start()
    features = Feature.EVENT_REMOVE | Feature.THREAD_ID  # what Firecracker negotiates + tid
    with child.create_uffd(features) as uffd:
        info = uffd.info()
        assert info.api == 0xAA
        assert info.features == features
        assert info.available is None  # fdinfo does not tell
        base = child.mmap(PAGE)
        uffd.register(base, PAGE, RegisterMode.MISSING)
        child.start_read(base)
        assert wait_events(uffd) == [fault(address=base, tid=child.pid)]
        assert uffd.copy(base, pattern(201)).outcome is Outcome.DONE
        assert child.finish_read() == pattern(201)


def test_adopt_takes_ownership_and_fixes_flags() -> None:
    original = Uffd.create(nonblocking=False)
    fd = original.detach()
    assert original.closed
    os.set_inheritable(fd, True)  # as a fd received without MSG_CMSG_CLOEXEC is
    with Uffd.adopt(fd, nonblocking=True) as adopted:
        assert adopted.fd == fd
        assert not os.get_inheritable(fd)
        assert not os.get_blocking(fd)
        with pytest.raises(UffdOpError) as early:
            adopted.read_raw()  # nobody negotiated the API yet
        assert (early.value.op, early.value.errno) == ("read", errno.EINVAL)
        adopted.api()
        assert adopted.read_raw() == b""
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_adopt_rejects_what_is_not_a_userfaultfd() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(PeerProtocolError, match="not a userfaultfd"):
            Uffd.adopt(read_end)
        os.fstat(read_end)  # still open: still the caller's
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(PeerProtocolError, match="not open"):
        Uffd.adopt(read_end)


def test_probe_reports_ioctls_per_memory_and_mode() -> None:
    report = probe()
    assert report.syscall_error is None
    assert report.device_error is None
    assert report.api.available == kernel_features()
    assert Feature.EVENT_FORK in report.api.features  # we are root
    assert Feature.WP_ASYNC not in report.api.features

    anon_missing = report.ioctls("anon", RegisterMode.MISSING)
    assert anon_missing is not None
    assert Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE in anon_missing
    anon_wp = report.ioctls("anon", RegisterMode.WP)
    assert anon_wp is not None
    assert Ioctl.WRITEPROTECT in anon_wp
    assert report.ioctls("anon", RegisterMode.MINOR) is None  # minor is shmem/hugetlbfs only
    (anon_minor,) = [
        r for r in report.registrations if r.memory == "anon" and r.mode == RegisterMode.MINOR
    ]
    assert anon_minor.error == "register: EINVAL"
    shmem_minor = report.ioctls("shmem", RegisterMode.MINOR)
    assert shmem_minor is not None
    assert Ioctl.CONTINUE in shmem_minor

    huge = [r for r in report.registrations if r.memory == "hugetlbfs"]
    assert len(huge) == 3
    with open("/proc/sys/vm/nr_hugepages", encoding="ascii") as f:
        reserved = int(f.read())
    if reserved == 0:  # no huge pages reserved here: the probe must say why, not pretend
        assert all(r.ioctls is None and r.error and "nr_hugepages=0" in r.error for r in huge)
    else:
        missing = report.ioctls("hugetlbfs", RegisterMode.MISSING)
        assert missing is not None
        assert Ioctl.COPY in missing
        assert Ioctl.ZEROPAGE not in missing  # hugetlbfs has no zero page
