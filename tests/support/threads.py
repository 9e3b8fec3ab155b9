"""This process's C threads: by name, for checks that a thread started or ended, and
waits for the state a thread reports (its counters).

pthreads started by the cffi module are not in ``threading.enumerate()``; their names
are in ``/proc/self/task/*/comm``. A joined thread can still be listed for a moment:
``pthread_join`` returns once the kernel has cleared the thread's tid, before the
kernel removes its ``/proc`` entry. So "gone" is waited for, briefly, never assumed.
"""

from __future__ import annotations

import contextlib
import os

from support.waiting import wait_until

__all__ = ["named_threads", "wait_thread_count", "wait_threads_gone", "wait_until"]


def named_threads(name: str) -> list[str]:
    """The tids of this process's threads called ``name``."""
    found = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/comm") as comm:
            if comm.read().strip() == name:
                found.append(task)
    return found


def wait_thread_count(name: str, count: int, timeout: float = 5.0) -> None:
    """Until exactly ``count`` threads called ``name`` are listed (a new thread names
    itself when it starts); AssertionError after ``timeout``."""
    wait_until(
        lambda: len(named_threads(name)) == count,
        lambda: f"{count} {name} threads expected: {named_threads(name)}",
        timeout,
        interval=0.001,
    )


def wait_threads_gone(name: str, timeout: float = 5.0) -> None:
    """Until no thread called ``name`` is listed; AssertionError after ``timeout``."""
    wait_thread_count(name, 0, timeout)
