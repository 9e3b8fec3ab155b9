"""Processes by pid and pidfd: a process's descendants, and killing a whole tree.

Why here: killing is how uffdd keeps its first promise (a process it cannot serve dies
rather than read wrong memory), and it is plain kernel plumbing (``/proc``, signals,
pidfds) that the daemon and every door use the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children first found, deepest last)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                frontier.append(child)
    return found


def kill_tree(pid: int, pidfd: int) -> None:
    """SIGKILL the restored process and everything it forked (children first found
    while the root still lives, so none is reparented out of reach)."""
    for child in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    if pidfd >= 0:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
