"""Proving processes and killing a whole tree by pidfd (kernel/proc.py): real processes.

Each tree is a chain of real processes that all share the test's pipe as stdout: the
pipe reads end-of-file only once every one of them is gone, so "the whole tree died"
is shown by the kernel, not by a timer. A process outside the tree (a sentinel, a
descendant reparented away before its check) must never be signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.waiting import wait_until

from uffdd.kernel import memory, proc
from uffdd.kernel.proc import (
    KILL_ROUNDS,
    TreeKill,
    UnprovenProcess,
    children,
    kill_tree,
    open_proven,
    parent_of,
    pidfd_alive,
    pidfd_pids,
    prove_child,
)

pytestmark = pytest.mark.timeout(120)

CHAIN = r"""
import os, sys, time
for _ in range(int(sys.argv[1]) - 1):
    if os.fork():
        break
os.write(1, b"%d\n" % os.getpid())  # one write: the lines never interleave
time.sleep(600)
"""
"""``python -c CHAIN N``: a chain of N processes (each the child of the one before),
each writing its pid and sleeping."""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _tree(pid: int) -> list[int]:
    found, frontier = [pid], [pid]
    while frontier:
        for child in children(frontier.pop()):
            found.append(child)
            frontier.append(child)
    return found


@contextlib.contextmanager
def chain(depth: int) -> Iterator[subprocess.Popen[str]]:
    """The chain's root; every process of it is killed (by pidfd) at the end."""
    root = subprocess.Popen(
        [sys.executable, "-c", CHAIN, str(depth)], stdout=subprocess.PIPE, text=True
    )
    pidfd = os.pidfd_open(root.pid)
    try:
        yield root
    finally:
        kill_tree(root.pid, pidfd)
        os.close(pidfd)
        root.kill()
        root.wait(60)
        assert root.stdout is not None
        root.stdout.close()


@contextlib.contextmanager
def sentinel() -> Iterator[subprocess.Popen[bytes]]:
    """A process outside every tree, which must outlive every kill."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as process:
        try:
            yield process
        finally:
            process.kill()


def _kill(pid: int, rounds: int = KILL_ROUNDS) -> TreeKill:
    """kill_tree with a pidfd of ``pid`` opened for it."""
    pidfd = os.pidfd_open(pid)
    try:
        return kill_tree(pid, pidfd, rounds=rounds)
    finally:
        os.close(pidfd)


def _pids(root: subprocess.Popen[str], count: int) -> list[int]:
    assert root.stdout is not None
    return [int(root.stdout.readline()) for _ in range(count)]


def test_kill_tree_kills_the_root_and_every_descendant_and_nothing_else() -> None:
    with sentinel() as outside, chain(3) as root:
        pids = sorted(_pids(root, 3))
        wait_until(lambda: sorted(_tree(root.pid)) == pids, "the whole chain")
        result = _kill(root.pid)
        assert result.complete
        assert result.killed[0] == root.pid
        assert sorted(result.killed) == pids
        assert root.wait(timeout=60) == -signal.SIGKILL
        assert root.stdout is not None
        assert root.stdout.read() == ""  # end of file: every process of the chain is gone
        assert outside.poll() is None
        assert _state(outside.pid) in ("S", "R")  # not even stopped


def test_kill_tree_outruns_a_tree_still_forking() -> None:
    """Killed while it grows: every member is stopped as it is proven, so none forks
    on and none is reparented out of reach; the whole chain dies."""
    with chain(200) as root:
        _pids(root, 1)  # the root runs; its descendants are being forked
        result = _kill(root.pid)
        assert result.complete
        assert root.wait(timeout=60) == -signal.SIGKILL
        assert root.stdout is not None
        root.stdout.read()  # end of file only once all 200 (or as many as were forked) died


def test_the_round_cap_is_reported_and_what_was_proven_is_killed() -> None:
    with chain(3) as root:
        pids = sorted(_pids(root, 3))
        wait_until(lambda: sorted(_tree(root.pid)) == pids, "the whole chain")
        result = _kill(root.pid, rounds=1)  # the walk that grew is the last
        assert not result.complete
        assert sorted(result.killed) == pids
        assert root.stdout is not None
        assert root.stdout.read() == ""


def test_a_descendant_reparented_before_its_check_is_not_signalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The walk lists the grandchild under the child; before the grandchild is proven
    the child dies and the grandchild is reparented out of the tree: it is left alone
    (it is no longer the tree's, and its number proves nothing)."""
    with chain(3) as root:
        pids = _pids(root, 3)
        wait_until(lambda: len(_tree(root.pid)) == 3, "the whole chain")
        middle = children(root.pid)[0]
        (last,) = children(middle)
        assert sorted(pids) == sorted([root.pid, middle, last])
        middle_fd, last_fd = os.pidfd_open(middle), os.pidfd_open(last)
        real_children = proc.children
        raced: list[int] = []

        def stale_children(pid: int) -> list[int]:
            if pid != middle:
                return real_children(pid)
            listed = real_children(pid)  # the grandchild, as /proc lists it now
            signal.pidfd_send_signal(middle_fd, signal.SIGKILL)
            wait_until(lambda: parent_of(last) != middle, "the grandchild reparented")
            raced.extend(listed)
            return listed

        monkeypatch.setattr(proc, "children", stale_children)
        try:
            result = _kill(root.pid)
            assert raced == [last]
            assert last not in result.killed
            assert root.wait(timeout=60) == -signal.SIGKILL
            assert pidfd_alive(last_fd)
            assert _state(last) in ("S", "R")  # neither killed nor stopped
        finally:
            signal.pidfd_send_signal(last_fd, signal.SIGKILL)
            os.close(middle_fd)
            os.close(last_fd)


def test_prove_child_takes_a_child_and_refuses_a_stranger() -> None:
    with sentinel() as outside, chain(2) as root:
        _pids(root, 2)
        wait_until(lambda: len(children(root.pid)) == 1, "the child")
        (child,) = children(root.pid)
        rootfd = os.pidfd_open(root.pid)
        try:
            assert prove_child(root.pid, rootfd, outside.pid) is None
            childfd = prove_child(root.pid, rootfd, child)
            assert childfd is not None
            pids = pidfd_pids(childfd)
            os.close(childfd)
            assert pids is not None
            assert pids[-1] == child
        finally:
            os.close(rootfd)


def test_open_proven_needs_the_pid_in_the_process_own_namespace() -> None:
    with sentinel() as outside:
        pidfd = open_proven(outside.pid, outside.pid)  # one namespace: the same number
        try:
            assert pidfd_alive(pidfd)
        finally:
            os.close(pidfd)
        with pytest.raises(UnprovenProcess, match="in its own pid namespace, not 1"):
            open_proven(outside.pid, 1)
        with pytest.raises(UnprovenProcess, match="names no process"):
            open_proven(0, 1)
        outside.kill()
        outside.wait(60)
        with pytest.raises(UnprovenProcess, match="does not exist"):
            open_proven(outside.pid, outside.pid)


def test_kill_tree_without_a_pidfd_signals_nothing() -> None:
    with sentinel() as outside:
        result = kill_tree(outside.pid, -1)
        assert result.killed == ()
        assert outside.poll() is None
        assert _state(outside.pid) in ("S", "R")


def test_resident_spans_are_the_pages_a_process_has() -> None:
    page = 4096
    region = memory.mmap(
        None,
        16 * page,
        memory.PROT_READ | memory.PROT_WRITE,
        memory.MAP_PRIVATE | memory.MAP_ANONYMOUS,
    )
    try:
        view = (ctypes.c_char * (16 * page)).from_address(region)
        for index in (0, 1, 2, 7, 15):
            view[index * page] = b"x"
        pidfd = os.pidfd_open(os.getpid())
        try:
            spans = proc.resident_spans(os.getpid(), pidfd, [(region, region + 16 * page)])
        finally:
            os.close(pidfd)
        assert spans == [
            (region, region + 3 * page),
            (region + 7 * page, region + 8 * page),
            (region + 15 * page, region + 16 * page),
        ]
    finally:
        memory.munmap(region, 16 * page)


def test_resident_spans_of_a_process_that_is_gone_are_not_trusted() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()
    try:
        assert proc.resident_spans(child.pid, pidfd, [(0, 4096)]) == []
    finally:
        os.close(pidfd)
