"""This process's open file descriptors, for leak checks.

Collected first: garbage of earlier tests (sockets, pipes) closes its fds only when the
collector runs, which would otherwise move a test's baseline under its feet.
"""

from __future__ import annotations

import contextlib
import gc
import os


def open_fds() -> set[str]:
    """Open fds as ``"N->target"`` (socket names differ per socket, so a swap shows)."""
    gc.collect()
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return found
