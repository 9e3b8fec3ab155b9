"""Killing a whole process tree (kernel/proc.py): real processes, real signals."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.waiting import wait_until

from uffdd.kernel.proc import descendants, kill_tree

TREE = r"""
import os, time
for _ in range(2):
    if os.fork():
        break
os.write(1, b"%d\n" % os.getpid())  # one write: the three lines never interleave
time.sleep(600)
"""
"""A child that forks a grandchild, which forks a great-grandchild; each sleeps."""


def dead(pid: int) -> bool:
    """Gone, or a zombie (reparented to an init that has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_kill_tree_kills_the_root_and_every_descendant() -> None:
    with subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True) as root:
        assert root.stdout is not None
        pids = [root.pid]
        try:
            pids = sorted({root.pid, *(int(root.stdout.readline()) for _ in range(3))})
            assert len(pids) == 3
            children = [pid for pid in pids if pid != root.pid]
            wait_until(lambda: sorted(descendants(root.pid)) == children, "the tree")
            pidfd = os.pidfd_open(root.pid)
            try:
                kill_tree(root.pid, pidfd)
            finally:
                os.close(pidfd)
            assert root.wait(timeout=30) == -signal.SIGKILL
            for pid in children:
                wait_until(functools.partial(dead, pid), f"{pid} killed")
        finally:
            for pid in [*pids, *descendants(root.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
