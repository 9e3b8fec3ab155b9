"""What happens to a lazy process, as typed events the core reacts to.

The first five are what the kernel reports through a userfaultfd (decoded from raw
``uffd_msg`` bytes by ``wire.py``); their addresses are run-time addresses. Events that
the shells produce (data arrived, a fetch failed, the process exited) join them here so
``LazyProcess.handle`` has a single input type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

from uffdd.core.addresses import ImageAddr, RunAddr


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread touched a page that is missing (or write-protected, or minor)."""

    address: RunAddr
    write: bool = False
    wp: bool = False
    minor: bool = False
    tid: int = 0
    """The faulting thread id when UFFD_FEATURE_THREAD_ID is on, else 0."""


@dataclass(frozen=True, slots=True)
class Fork:
    """The process forked; ``child_fd`` is a new uffd, already in the reader's fd table."""

    child_fd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """mremap moved ``length`` bytes from ``old`` to ``new`` (the source is gone)."""

    old: RunAddr
    new: RunAddr
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """madvise(DONTNEED/REMOVE) dropped [start, end): it stays registered, reads zeros."""

    start: RunAddr
    end: RunAddr


@dataclass(frozen=True, slots=True)
class Unmap:
    """munmap (or an mremap shrink) removed [start, end) from the address space."""

    start: RunAddr
    end: RunAddr


UffdEvent = PageFault | Fork | Remap | Remove | Unmap
"""Every event a userfaultfd read can produce."""


# -- events the shells produce -----------------------------------------------------------
#
# Kernel events carry no process id (the uffd they were read from names the process); the
# shell events below do, except those routed by request id (PagesArrived, FetchFailed)
# and Tick, which concerns every process.

ProcId = NewType("ProcId", str)
"""Names one lazy process. The shell picks the ids of the processes it adopts; the core
names fork children ``"<parent>.<n>"``, so an id spells out its lineage."""


class InstallResult(enum.Enum):
    """How an install action (Copy or ZeroFill) ended, as the kernel shell saw it.

    Mirrors ``uffdd.kernel.uffd.Outcome`` (the core may not import the kernel layer).
    """

    DONE = "done"
    """The whole range is installed (and its waiters woken unless DONTWAKE)."""
    EXISTS = "exists"
    """EEXIST: the first page not done is already present."""
    RETRY = "retry"
    """EAGAIN: stopped after ``done`` bytes (queued events, or a present page)."""
    LAYOUT_CHANGED = "layout_changed"
    """ENOENT: the range is no longer mapped as it was."""
    GONE = "gone"
    """ESRCH/ENOSPC: the process behind the uffd has exited."""


@dataclass(frozen=True, slots=True)
class PagesArrived:
    """Data for ``[image_addr, image_addr + length)`` of request ``request_id`` is local.

    An answer may arrive in several parts, each inside the requested range. ``data`` is
    the shell's buffer (e.g. a memoryview); the core never reads it, it only hands it
    back in Copy actions with an offset, so no second copy of page data is made.
    """

    request_id: int
    image_addr: ImageAddr
    length: int
    data: object


@dataclass(frozen=True, slots=True)
class FetchFailed:
    """Request ``request_id`` cannot be answered (server gone, deadline, bad data)."""

    request_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """The kernel's answer to the Copy/ZeroFill action ``install_id`` of process ``proc``.

    ``done`` is how many bytes from the start of the action's range were installed.
    """

    proc: ProcId
    install_id: int
    result: InstallResult
    done: int = 0


@dataclass(frozen=True, slots=True)
class FastServed:
    """A C reader of ``proc``'s uffd answered ``faults`` faults read at ``read_at``, on
    its own, as the core's delegation said (``Delegate``): the outcome of delegating.

    ``installs``: the run-time ranges it filled (UFFDIO_COPY of image data, or
    UFFDIO_ZEROPAGE where the delegation names zeros; woken). It serves only where
    ``LazyProcess.fast_ranges``/``zero_ranges`` say that is the right answer, and never
    a fault read together with a layout event, so the core takes these pages as
    resident whatever state they were in.
    """

    proc: ProcId
    installs: tuple[tuple[RunAddr, int], ...]
    faults: int
    read_at: float
    answered_at: float | None = None
    """When C had answered them (the demand thread, which reports later); None: when
    the core hears of it."""


@dataclass(frozen=True, slots=True)
class TreeData:
    """Data another process of the same restore tree fetched (the tracker passes it
    on, never a shell): pages this process still misses in the range take it, since
    every process of a tree reads the same image."""

    image_addr: ImageAddr
    length: int
    data: object


@dataclass(frozen=True, slots=True)
class EventsDrained:
    """The shell read ``proc``'s uffd until it was empty: deferred installs may retry."""

    proc: ProcId


@dataclass(frozen=True, slots=True)
class BatchHeld:
    """The shell read a batch of ``proc``'s uffd holding a layout event and hands it
    over only after the install outcomes it still owes (the fence, core/actions.py):
    until that batch comes, the process is not released, since it may hold faults that
    still need an answer."""

    proc: ProcId


@dataclass(frozen=True, slots=True)
class HandoverComplete:
    """The restorer finished the handover (CRIU's RSTF): background transfer may start."""

    proc: ProcId


@dataclass(frozen=True, slots=True)
class Exited:
    """``proc`` exited (pidfd readable, uffd hung up, or an install reported GONE)."""

    proc: ProcId


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: check deadlines and retry deferred installs. The time is the
    ``now`` argument every ``handle`` call takes."""


ProcessEvent = UffdEvent | InstallOutcome | FastServed | EventsDrained | HandoverComplete | Exited
"""Events that concern one process (kernel events through ``Tracker.handle_uffd``)."""

ShellEvent = (
    PagesArrived
    | FetchFailed
    | InstallOutcome
    | FastServed
    | EventsDrained
    | BatchHeld
    | HandoverComplete
    | Exited
    | Tick
)
"""Everything a shell feeds to ``Tracker.handle``."""
