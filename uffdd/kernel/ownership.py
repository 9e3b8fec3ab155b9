"""Prove that a received userfaultfd belongs to the process a handover names.

Why: the daemon tracks, serves and, when it cannot serve, kills the process a handover
names. A uffd made by another process (a child that registered its own memory, handed
over by a parent that names itself) must never make the daemon track or kill the named
process: that process's memory is not the uffd's. Two facts read from the kernel prove
the claim, both while the claimed process's pidfd is open:

- the process holds the very same open file: an entry of ``/proc/PID/fd`` that is a
  userfaultfd (``anon_inode:[userfaultfd]``, the cheap filter) is the daemon's fd by
  ``kcmp(KCMP_FILE)``;
- every claimed range lies in that process's own VMAs registered for missing faults
  (``um`` in the ``VmFlags`` of ``/proc/PID/smaps``).

The pidfd is checked alive after both reads, so ``/proc/PID`` was that process
throughout (a pid reused in between would be caught). What ``um`` cannot say is *which*
uffd registered a range: a process that holds another's uffd and registered the same
addresses of its own memory with a second one passes; the first fault's THREAD_ID (a
thread of the claimed process) would tell them apart.

``kcmp`` is called as a raw syscall (ctypes), as ``kernel/sched.py`` calls
``sched_setattr``.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import errno
import os
import select
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Disproof",
    "Unproven",
    "Vma",
    "first_uncovered",
    "holds_file",
    "pidfd_alive",
    "prove_owner",
    "read_vmas",
    "same_file",
]

_SYS_KCMP = {"x86_64": 312, "aarch64": 272}
"""``__NR_kcmp``: <asm/unistd_64.h> on x86_64, the generic table on arm64."""
KCMP_FILE = 0
UFFD_LINK = "anon_inode:[userfaultfd]"
MISSING_FLAG = "um"
"""``VM_UFFD_MISSING`` as ``/proc/PID/smaps`` spells it in ``VmFlags``."""

_libc = ctypes.CDLL(None, use_errno=True)


class Unproven(enum.Enum):
    """Which part of the claim failed."""

    GONE = "gone"
    """The process exited (or never existed) while it was checked."""
    UNREADABLE = "unreadable"
    """Its ``/proc`` entries or ``kcmp`` could not be read (permissions, no kcmp)."""
    NOT_HELD = "not held"
    """It holds no descriptor of this uffd."""
    NOT_MAPPED = "not mapped"
    """A claimed range is not mapped in its memory."""
    NOT_REGISTERED = "not registered"
    """A claimed range is mapped but not registered for missing faults."""


@dataclass(frozen=True, slots=True)
class Disproof:
    """Why the claim does not hold, with a sentence for the peer and the log."""

    unproven: Unproven
    reason: str


@dataclass(frozen=True, slots=True)
class Vma:
    """One line of ``/proc/PID/smaps``: ``[start, end)`` and its ``VmFlags``."""

    start: int
    end: int
    flags: frozenset[str]


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether ``fd1`` of ``pid1`` and ``fd2`` of ``pid2`` are one open file (kcmp).

    Raises OSError: ENOSYS (a kernel without CONFIG_KCMP), EPERM (no ptrace access),
    ESRCH (no such process), EBADF (no such fd).
    """
    number = _SYS_KCMP.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"kcmp: no syscall number known for {os.uname().machine}")
    result = _libc.syscall(
        number,
        ctypes.c_long(pid1),
        ctypes.c_long(pid2),
        ctypes.c_long(KCMP_FILE),
        ctypes.c_ulong(fd1),
        ctypes.c_ulong(fd2),
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"kcmp: {os.strerror(code)}")
    return bool(result == 0)


def holds_file(pid: int, fd: int) -> bool:
    """Whether process ``pid`` holds a descriptor of the userfaultfd open as our ``fd``.

    Only its userfaultfd entries are compared. Raises OSError when its fd table cannot
    be read or compared (a process that is gone raises FileNotFoundError/ESRCH).
    """
    me = os.getpid()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != UFFD_LINK:
                continue
            if same_file(pid, int(name), me, fd):
                return True
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EBADF):  # closed while we looked
                continue
            raise
    return False


def read_vmas(pid: int) -> list[Vma]:
    """The process's VMAs with their flags, from ``/proc/PID/smaps`` (raises OSError)."""
    vmas: list[Vma] = []
    start = end = -1
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if head == "VmFlags:":
                if start >= 0:
                    vmas.append(Vma(start, end, frozenset(rest.split())))
                start = -1
            elif "-" in head and not head.endswith(":"):
                low, _, high = head.partition("-")
                try:
                    start, end = int(low, 16), int(high, 16)
                except ValueError:
                    start = -1
    return vmas


def first_uncovered(
    spans: Iterable[tuple[int, int]], ranges: Iterable[tuple[int, int]]
) -> tuple[int, int] | None:
    """The first ``(start, length)`` of ``ranges`` not inside the union of the
    ``[start, end)`` ``spans`` (adjacent spans join), or None when all are covered."""
    merged: list[list[int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    starts = [low for low, _ in merged]
    for start, length in ranges:
        index = bisect.bisect_right(starts, start) - 1
        if index < 0 or start + length > merged[index][1]:
            return start, length
    return None


def pidfd_alive(pidfd: int) -> bool:
    """Whether the process a pidfd names has not exited (a pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def prove_owner(
    pidfd: int, pid: int, fd: int, ranges: Sequence[tuple[int, int]]
) -> Disproof | None:
    """None when process ``pid`` (named by the open ``pidfd``) holds our uffd ``fd`` and
    every ``(start, length)`` of ``ranges`` is mapped in its memory and registered for
    missing faults; otherwise why not. Blocking (``/proc`` reads wait for the process's
    mmap lock): call it off the event loop."""
    disproof = _disprove(pid, fd, ranges)
    if not pidfd_alive(pidfd):
        return Disproof(Unproven.GONE, f"pid {pid} exited while its handover was checked")
    return disproof


def _disprove(pid: int, fd: int, ranges: Sequence[tuple[int, int]]) -> Disproof | None:
    try:
        vmas = read_vmas(pid)
    except OSError as exc:
        return Disproof(
            Unproven.UNREADABLE,
            f"cannot read the mappings of pid {pid}: {exc.strerror or exc}",
        )
    missing = first_uncovered(((v.start, v.end) for v in vmas), ranges)
    if missing is not None:
        return Disproof(
            Unproven.NOT_MAPPED,
            f"region [{missing[0]:#x}, +{missing[1]:#x}) is not mapped in pid {pid}",
        )
    try:
        held = holds_file(pid, fd)
    except OSError as exc:
        hint = " (a kernel without CONFIG_KCMP)" if exc.errno == errno.ENOSYS else ""
        return Disproof(
            Unproven.UNREADABLE,
            f"cannot compare the userfaultfd with the fds of pid {pid}: "
            f"{exc.strerror or exc}{hint}",
        )
    if not held:
        return Disproof(
            Unproven.NOT_HELD,
            f"pid {pid} holds no descriptor of this userfaultfd: the claimed process must "
            "create it and keep its own copy until the daemon reports resident or failed",
        )
    registered = ((v.start, v.end) for v in vmas if MISSING_FLAG in v.flags)
    missing = first_uncovered(registered, ranges)
    if missing is not None:
        return Disproof(
            Unproven.NOT_REGISTERED,
            f"region [{missing[0]:#x}, +{missing[1]:#x}) is not registered for missing "
            f"faults in pid {pid}'s memory",
        )
    return None
