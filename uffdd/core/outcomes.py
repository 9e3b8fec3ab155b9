"""What a resolving ioctl's errno means to a lazy-restore handler, as a value.

Why in the core: the errnos a handler expects (the page is already there, drain events
first, the layout changed, the process is gone) are decisions, not IO. The kernel shell
(``kernel/uffd.py``), the C installer's completions (``native/installer.py``) and the
core's own ``InstallResult`` all read them through this one table; every other errno is
a :class:`~uffdd.core.errors.UffdOpError`.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from uffdd.core.errors import UffdOpError


class Outcome(enum.Enum):
    """How a resolving ioctl ended, for the errnos a handler expects."""

    DONE = "done"
    """The whole range was handled (``OpResult.done`` is the full length)."""
    EXISTS = "exists"
    """EEXIST: the first page of the range is already present; wake its waiters."""
    RETRY = "retry"
    """EAGAIN: stopped after ``done`` bytes; drain events, retry from ``start + done``."""
    LAYOUT_CHANGED = "layout_changed"
    """ENOENT: the range is no longer mapped as it was (munmap/mremap); re-check."""
    GONE = "gone"
    """ESRCH/ENOSPC: the process behind the uffd has exited."""


_OUTCOME_OF_ERRNO = {
    errno.EEXIST: Outcome.EXISTS,
    errno.EAGAIN: Outcome.RETRY,
    errno.ENOENT: Outcome.LAYOUT_CHANGED,
    errno.ESRCH: Outcome.GONE,
    errno.ENOSPC: Outcome.GONE,
}


@dataclass(frozen=True, slots=True)
class OpResult:
    """The outcome of a resolving ioctl and how many bytes of the range it completed."""

    outcome: Outcome
    done: int

    @property
    def partial(self) -> bool:
        """True when the kernel stopped part way: ``done`` bytes are in, the rest is not."""
        return self.outcome is not Outcome.DONE and self.done > 0


def op_result(op: str, err: int, count: int, start: int, length: int) -> OpResult:
    """Map an ioctl's errno and count field to an OpResult (or raise UffdOpError)."""
    if err == 0:
        return OpResult(Outcome.DONE, length)
    outcome = _OUTCOME_OF_ERRNO.get(err)
    if outcome is None:
        raise UffdOpError(op, err, start, length)
    # On failure the count field holds -errno, or the bytes done before stopping.
    return OpResult(outcome, max(count, 0))
