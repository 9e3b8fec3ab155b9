"""What happens to a lazy process, as typed events the core reacts to.

The first five are what the kernel reports through a userfaultfd (decoded from raw
``uffd_msg`` bytes by ``wire.py``); their addresses are run-time addresses. Events that
the shells produce (data arrived, a fetch failed, the process exited) join them here so
``LazyProcess.handle`` has a single input type.
"""

from __future__ import annotations

from dataclasses import dataclass

from uffdd.core.addresses import RunAddr


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
