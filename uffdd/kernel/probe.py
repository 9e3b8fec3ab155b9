"""What userfaultfd can do on this machine, found by trying it (for ``uffdd check``).

Why probe instead of reading the kernel version: features and per-memory ioctls depend
on the kernel's configuration, on privileges (EVENT_FORK needs CAP_SYS_PTRACE; the
syscall may be forbidden while /dev/userfaultfd is allowed) and on the machine's state
(hugetlbfs works only with huge pages reserved). The probe creates throwaway uffds,
maps a little anonymous, shmem (memfd) and hugetlbfs memory in this process, registers
it in each mode, and reports the ioctls offered, or why it failed, without raising for
anything but a missing userfaultfd.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Literal

from uffdd.core.errors import KernelSupportError, UffdOpError
from uffdd.kernel.uffd import ApiInfo, Feature, Ioctl, RegisterMode, Uffd

MemoryKind = Literal["anon", "shmem", "hugetlbfs"]
MEMORY_KINDS: tuple[MemoryKind, ...] = ("anon", "shmem", "hugetlbfs")
MODES = (RegisterMode.MISSING, RegisterMode.WP, RegisterMode.MINOR)
_MAP_HUGETLB = 0x40000


@dataclass(frozen=True, slots=True)
class RegistrationProbe:
    """Registering one kind of memory in one mode: the ioctls offered, or why not."""

    memory: MemoryKind
    mode: RegisterMode
    ioctls: Ioctl | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """Everything the probe learned."""

    syscall_error: str | None
    """Why userfaultfd(2) failed, or None when it works."""
    device_error: str | None
    """Why /dev/userfaultfd failed, or None when it works."""
    api: ApiInfo
    """The handshake of the probe fd: ``available`` is what the kernel offers, ``features``
    what this process could enable (without EVENT_FORK when it lacks CAP_SYS_PTRACE)."""
    registrations: tuple[RegistrationProbe, ...]

    def ioctls(self, memory: MemoryKind, mode: RegisterMode) -> Ioctl | None:
        """The ioctls offered for ``memory`` registered in ``mode`` (None: not possible)."""
        for reg in self.registrations:
            if reg.memory == memory and reg.mode == mode:
                return reg.ioctls
        return None


def probe(huge_page_size: int | None = None) -> ProbeReport:
    """Probe userfaultfd; :class:`KernelSupportError` if no uffd can be created at all."""
    errors: dict[str, str | None] = {}
    for method in ("syscall", "device"):
        try:
            Uffd.create(method=method).close()
            errors[method] = None
        except KernelSupportError as exc:
            errors[method] = str(exc)
    with Uffd.create() as uffd:
        # Everything the kernel offers except WP_ASYNC, which changes what WP means.
        api = uffd.api(Feature(~Feature.WP_ASYNC), required=Feature(0))
        registrations = [
            reg
            for memory in MEMORY_KINDS
            for reg in _probe_memory(uffd, memory, huge_page_size or _default_huge_page())
        ]
    return ProbeReport(errors["syscall"], errors["device"], api, tuple(registrations))


def _probe_memory(uffd: Uffd, memory: MemoryKind, huge: int) -> list[RegistrationProbe]:
    try:
        region, length = _map(memory, huge)
    except OSError as exc:
        why = f"mmap failed: {errno.errorcode.get(exc.errno or 0, exc)}"
        if memory == "hugetlbfs":
            why += f" (huge pages of {huge} bytes reserved? vm.nr_hugepages={_nr_hugepages()})"
        return [RegistrationProbe(memory, mode, None, why) for mode in MODES]
    try:
        view = ctypes.c_char.from_buffer(region)
        start = ctypes.addressof(view)
        del view  # release the buffer export so the mapping can be closed
        results = []
        for mode in MODES:
            try:
                ioctls = uffd.register(start, length, mode)
            except UffdOpError as exc:
                name = errno.errorcode.get(exc.errno, str(exc.errno))
                results.append(RegistrationProbe(memory, mode, None, f"register: {name}"))
            else:
                uffd.unregister(start, length)
                results.append(RegistrationProbe(memory, mode, ioctls))
        return results
    finally:
        region.close()


def _map(memory: MemoryKind, huge: int) -> tuple[mmap.mmap, int]:
    if memory == "anon":
        # Private: Python's default MAP_SHARED anonymous memory is shmem to the kernel.
        return mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE), mmap.PAGESIZE
    if memory == "hugetlbfs":
        flags = mmap.MAP_PRIVATE | _MAP_HUGETLB
        return mmap.mmap(-1, huge, flags=flags), huge
    memfd = os.memfd_create("uffdd-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, mmap.PAGESIZE)
        return mmap.mmap(memfd, mmap.PAGESIZE, flags=mmap.MAP_SHARED), mmap.PAGESIZE
    finally:
        os.close(memfd)


def _default_huge_page() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 20


def _nr_hugepages() -> str:
    try:
        with open("/proc/sys/vm/nr_hugepages", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
