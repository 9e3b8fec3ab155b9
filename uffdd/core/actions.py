"""What the core asks the shells to do: the output half of ``handle(event) -> [Action]``.

Why values: the core decides and never performs IO, so every decision is a frozen
record a test can inspect and a shell can execute. Actions that touch a process's
userfaultfd name the process (``proc``); fetches are routed by request id.

Contract for the shell, per process:

- execute the actions in the order given, and feed the outcome of every install action
  (Copy, ZeroFill) back as an ``InstallOutcome``;
- before passing the core a batch of uffd events that holds a layout event (REMOVE,
  UNMAP, REMAP, FORK), feed back the outcome of every install of that process, with no
  install of it running after the read of that batch; until the core has the batch,
  answer installs with RETRY, as the kernel does while such an event is unread;
- feed outcomes that come between that read and the batch after a ``BatchHeld`` event,
  so they cannot release the process before the batch's faults are answered.

The core relies on it: an install decided before a REMOVE was read must run before
that REMOVE is acknowledged, or snapshot data could land in a page that must read
zeros. A batch of page faults only may reach the core while installs are outstanding
(a copy running on another thread): faults on their pages wait for the outcome. How
the daemon keeps it (the fence): docs/architecture.md, section 5.3.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr
from uffdd.core.events import ProcId


class Priority(enum.IntEnum):
    """Which queue a fetch travels on: demand faults (URGENT) never wait behind the
    background sweep (BULK). The numbers are the wire's (``pages.proto``'s
    ``Priority``; ``wire/convert.py`` checks they agree)."""

    URGENT = 1
    BULK = 2


@dataclass(frozen=True, slots=True)
class Copy:
    """UFFDIO_COPY ``length`` bytes to ``run_addr`` from ``data[data_offset:]``.

    ``data`` is the buffer of a ``PagesArrived`` event, passed through untouched;
    ``image_addr`` is the image address of the first byte (for logs and checks).
    ``dontwake``: no thread is known to wait on the range, so skip the wake.
    ``page_size``: the mapping's page size (a copy splits only at its multiples).
    Report the result as ``InstallOutcome(proc, install_id, ...)``.
    """

    proc: ProcId
    install_id: int
    run_addr: RunAddr
    image_addr: ImageAddr
    length: int
    data: object
    data_offset: int
    dontwake: bool = False
    page_size: int = PAGE_SIZE


@dataclass(frozen=True, slots=True)
class ZeroFill:
    """UFFDIO_ZEROPAGE ``[run_addr, run_addr + length)`` and wake its waiters.

    ``page_size`` > 4096 means hugetlbfs, which has no ZEROPAGE: the shell installs
    zeros with UFFDIO_COPY from a zeroed buffer instead. Report the result as an
    ``InstallOutcome`` like a Copy.
    """

    proc: ProcId
    install_id: int
    run_addr: RunAddr
    length: int
    page_size: int


@dataclass(frozen=True, slots=True)
class Wake:
    """UFFDIO_WAKE ``[run_addr, run_addr + length)``: waiters retry their access."""

    proc: ProcId
    run_addr: RunAddr
    length: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask the page server for ``[image_addr, image_addr + length)`` of ``image_id``.

    Answer with ``PagesArrived(request_id, ...)`` (possibly in parts) or
    ``FetchFailed(request_id, reason)``. ``proc`` is the process that asked (for logs;
    the answer is routed by request id to every process waiting for it).
    """

    request_id: int
    image_id: str
    image_addr: ImageAddr
    length: int
    priority: Priority
    proc: ProcId


@dataclass(frozen=True, slots=True)
class CancelFetch:
    """Nobody needs request ``request_id`` any more; late data for it is ignored."""

    request_id: int


@dataclass(frozen=True, slots=True)
class AdoptChild:
    """``parent`` forked: serve ``child_fd`` (a uffd in the daemon's fd table) as ``child``."""

    parent: ProcId
    child: ProcId
    child_fd: int


@dataclass(frozen=True, slots=True)
class Release:
    """Stop serving ``proc``: close its uffd and report.

    ``exited`` False: every page is resident (what is left unregistered reads zeros,
    which is what the image says for it); report completion. True: the process exited.
    """

    proc: ProcId
    exited: bool = False


@dataclass(frozen=True, slots=True)
class Kill:
    """``proc`` cannot be served correctly: kill it (pidfd), then close its uffd.

    Never close the uffd of a live process instead: later faults would read zeros.
    """

    proc: ProcId
    reason: str


@dataclass(frozen=True, slots=True)
class Delegate:
    """Give whatever answers ``proc``'s faults in C (the fast serve, the demand thread)
    the process's current tables: ``LazyProcess.fast_ranges`` (image data is the right
    answer) and ``zero_ranges`` (zeros are), to answer faults there on its own under
    the policy's ``FaultPlan``. Emitted when a process starts and whenever its tables
    change (a layout event, the end); the outcome comes back as ``FastServed``."""

    proc: ProcId


@dataclass(frozen=True, slots=True)
class Expedite:
    """A thread of ``proc`` waits on ``run_addr``, which an install not yet ended
    covers: if a thread of the shell runs that install, let it go first and wake as it
    goes (queued behind the whole in-flight budget, it made the fault wait)."""

    proc: ProcId
    run_addr: RunAddr


Action = (
    Copy | ZeroFill | Wake | Fetch | CancelFetch | AdoptChild | Release | Kill | Delegate | Expedite
)
"""Everything the core can ask for."""
