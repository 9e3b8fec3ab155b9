"""Crash points: the daemon SIGKILLs itself at a named moment, for fault-injection tests.

Why in the product: the moments that matter (a FORK read and not yet journaled, a
handover before its ack) last microseconds; no outside signal hits them on purpose.
``UFFDD_CRASH_AT=<point>[:<n>]`` kills the daemon the n-th time (default the first)
it reaches ``point``. Points: ``before-ack``, ``uffd-read`` (the loop read a uffd and
has not kept what it read), ``fork-read``, ``layout-read`` (a batch with a FORK, or
another layout event, held and not journaled), ``installing``, ``grace``. Unset
(always, outside tests), a point costs a comparison.
"""

from __future__ import annotations

import os
import signal

_VARIABLE = "UFFDD_CRASH_AT"


def _parse(value: str) -> tuple[str, int]:
    point, _, count = value.partition(":")
    return point, int(count) if count else 1


_TARGET = _parse(os.environ[_VARIABLE]) if os.environ.get(_VARIABLE) else None
_seen: dict[str, int] = {}


def crash_point(point: str) -> None:
    """SIGKILL this process if ``UFFDD_CRASH_AT`` names ``point`` and its count is up."""
    if _TARGET is None or _TARGET[0] != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
