"""Processes by pidfd: proving which process a pid names, and killing a whole tree.

Why here: killing is how uffdd keeps its first promise (a process it cannot serve dies
rather than read wrong memory), and a kill must reach exactly the processes uffdd
serves. A pid number alone can name another process (it was reused, or it is a number
from another pid namespace, where 1 is that namespace's init), so every signal goes
through a pidfd of a process proven to be the one meant: a pidfd names one process for
good, and a number read under ``/proc`` is trusted only while the pidfd of the process
it was read for shows that process still running. Plain kernel plumbing that the daemon
and every door use the same way.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from uffdd.kernel.fdpass import CREDENTIALS_SPACE, close_fds, credentials_in, fds_in

KILL_ROUNDS = 64
"""At most this many walks over a tree being killed. Each walk stops the processes it
proves; a tree stops changing once all of them stopped, so a fork bomb that outruns
64 walks is killed as far as it was proven, and ``TreeKill.complete`` says so."""


class UnprovenProcess(Exception):
    """A pid could not be proven to name the process meant: nothing was signalled."""


@dataclass(frozen=True, slots=True)
class TreeKill:
    """What :func:`kill_tree` signalled."""

    killed: tuple[int, ...]
    """The pids (of uffdd's namespace) sent SIGKILL by pidfd: the root first."""
    complete: bool
    """False when the round cap ran out while the tree still changed: a process forked
    after the last walk may live on (reparented away from the tree)."""


def pidfd_alive(pidfd: int) -> bool:
    """The process of ``pidfd`` has not exited (a pidfd polls readable once it has)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def pidfd_pids(pidfd: int) -> tuple[int, ...] | None:
    """The pids of ``pidfd``'s process in every pid namespace from ``/proc``'s down to
    its own (``NSpid`` of the pidfd's fdinfo: the process itself, never a number's
    current owner); None once it has exited."""
    value = _field(f"/proc/self/fdinfo/{pidfd}", "NSpid")  # none once gone (Pid: -1)
    return None if value is None else tuple(int(pid) for pid in value.split())


def open_proven(pid: int, ns_pid: int) -> int:
    """A pidfd of process ``pid`` (a pid of uffdd's namespace, such as a message's
    SCM_CREDENTIALS), proven to be the task whose pid in its own pid namespace is
    ``ns_pid`` (the same number when it lives in uffdd's namespace).

    Opened first, then checked through the pidfd itself, then checked still running,
    so a pid reused meanwhile is never taken. Raises :class:`UnprovenProcess`."""
    if pid <= 0:
        raise UnprovenProcess(f"pid {pid} names no process of uffdd's pid namespace")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise UnprovenProcess(f"process {pid} does not exist") from None
    try:
        pids = pidfd_pids(pidfd)
        if pids is None:
            raise UnprovenProcess(f"process {pid} exited")
        if pids[0] != pid:
            raise UnprovenProcess(
                f"process {pid} is {pids[0]} in /proc's pid namespace: /proc is not "
                "mounted for uffdd's pid namespace, so nothing can be proven"
            )
        if pids[-1] != ns_pid:
            raise UnprovenProcess(
                f"process {pid} is {pids[-1]} in its own pid namespace, not {ns_pid} "
                f"(NSpid {' '.join(map(str, pids))})"
            )
        if not pidfd_alive(pidfd):
            raise UnprovenProcess(f"process {pid} exited")
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def children(pid: int) -> list[int]:
    """The children of ``pid`` by number, as ``/proc`` lists them now (every thread's).

    Numbers only: true only while ``pid`` is proven running, and each child is proven
    on its own (:func:`prove_child`) before anything is done to it."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(map(int, (task / "children").read_text().split()))
        except OSError:
            continue
    return found


def parent_of(pid: int) -> int | None:
    """``PPid`` of ``pid`` by number (None when there is no such process now)."""
    value = _field(f"/proc/{pid}/status", "PPid")
    return None if value is None else int(value)


def _field(path: str, name: str) -> str | None:
    """The value of the ``name:`` line of a ``/proc`` status-like file (None: no such
    file or line)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value
    return None


def prove_child(parent: int, parent_pidfd: int, child: int) -> int | None:
    """A pidfd of ``child`` if it is a child of the process ``parent_pidfd`` names
    (whose pid is ``parent``), else None.

    The child's pidfd is opened first; its ``PPid`` must be ``parent`` while both are
    still running afterwards: a running process keeps its number, so the ``PPid`` read
    was the child's own and ``parent`` still named the parent. A child reparented (its
    parent died) or a number reused by a stranger is never taken."""
    try:
        pidfd = os.pidfd_open(child)
    except OSError:
        return None
    if parent_of(child) == parent and pidfd_alive(pidfd) and pidfd_alive(parent_pidfd):
        return pidfd
    os.close(pidfd)
    return None


def _stopped_or_gone(pid: int, pidfd: int) -> bool:
    """``pid`` can fork no more: it is stopped, or it exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not pidfd_alive(pidfd)
    state = stat.rsplit(")", 1)[1].split()[0]
    # a state read while the pidfd still shows it running was this process's own
    return not pidfd_alive(pidfd) or state in ("T", "t")


def _signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signum)


def kill_tree(pid: int, pidfd: int, *, rounds: int = KILL_ROUNDS) -> TreeKill:
    """SIGKILL the restored process ``pidfd`` (pid ``pid``) and everything it forked,
    each by a pidfd of a process proven to descend from it.

    Walks down from the root: every child ``/proc`` lists is proven (:func:`prove_child`:
    its parent is the process it was found under, which still runs) and sent SIGSTOP,
    so the tree stops growing and no member dies and lets its children be reparented
    out of reach. The walk repeats until one finds nothing new with every member
    stopped (at most ``rounds`` walks), then every proven member gets SIGKILL through
    its pidfd. Nothing is ever signalled by number; a pidfd < 0 proves nothing and
    kills nothing. A process that left the tree before the walk (a daemonizing double
    fork, ``CLONE_PARENT``) is no descendant any more and is not found: only a cgroup
    made for the restore would hold it."""
    if pidfd < 0:
        return TreeKill((), complete=False)
    proven: dict[int, int] = {pid: pidfd}
    opened: list[int] = []
    complete = False
    try:
        _signal(pidfd, signal.SIGSTOP)
        for _ in range(rounds):
            grew = False
            walk = list(proven.items())
            for parent, parent_pidfd in walk:  # grows as it goes: one walk, the whole tree
                for child in children(parent):
                    known = proven.get(child)
                    if known is not None and pidfd_alive(known):
                        continue
                    child_pidfd = prove_child(parent, parent_pidfd, child)
                    if child_pidfd is None:
                        continue
                    opened.append(child_pidfd)
                    proven[child] = child_pidfd
                    _signal(child_pidfd, signal.SIGSTOP)
                    walk.append((child, child_pidfd))
                    grew = True
            if not grew and all(_stopped_or_gone(p, fd) for p, fd in proven.items()):
                complete = True
                break
            if not grew:
                os.sched_yield()  # let a member just sent SIGSTOP get to stop
        for member_pidfd in proven.values():
            _signal(member_pidfd, signal.SIGKILL)
        return TreeKill(tuple(proven), complete)
    finally:
        for fd in opened:
            os.close(fd)


_PAGE = 4096
_PRESENT_OR_SWAPPED = (1 << 63) | (1 << 62)


def resident_spans(pid: int, pidfd: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``spans`` (run-time ``(start, end)``, page-aligned) in which process
    ``pid`` has a page (present or swapped out), from ``/proc/PID/pagemap``; [] when it
    cannot be read or the process behind ``pidfd`` is gone (so the pid may name another:
    nothing read is trusted)."""
    found: list[tuple[int, int]] = []
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            for start, end in spans:
                first = start // _PAGE
                raw = os.pread(pagemap.fileno(), (end - start) // _PAGE * 8, first * 8)
                entries = memoryview(raw).cast("Q")
                run = -1
                for index, entry in enumerate(entries):
                    if entry & _PRESENT_OR_SWAPPED:
                        if run < 0:
                            run = index
                    elif run >= 0:
                        found.append(((first + run) * _PAGE, (first + index) * _PAGE))
                        run = -1
                if run >= 0:
                    found.append(((first + run) * _PAGE, (first + len(entries)) * _PAGE))
    except OSError:
        return []
    return found if pidfd_alive(pidfd) else []


def start_time(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process;
    "" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]


def process_alive(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and fields[19] == started


def kill_proven(pid: int, started: str) -> bool:
    """Kill process ``pid``'s tree if it is the one that started at ``started``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not process_alive(pid, started):
            return False
        kill_tree(pid, pidfd)
        return True
    finally:
        os.close(pidfd)


def kill_senders_in_flight(conn: int) -> list[int]:
    """Kill the sender of every uffd still queued on the handover connection ``conn``
    (its task would read zeros once the connection closes), by a pidfd opened at once
    on the pid its message's credentials name; the pids killed."""
    killed = []
    sock = socket.socket(fileno=conn)
    try:
        sock.setblocking(False)
        room = socket.CMSG_SPACE(4 * 16) + CREDENTIALS_SPACE
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(64, room)
            except OSError:
                break
            fds = fds_in(ancillary)
            sender = credentials_in(ancillary)
            if fds and sender is not None and sender.pid > 0:
                with contextlib.suppress(OSError):
                    pidfd = os.pidfd_open(sender.pid)
                    try:
                        kill_tree(sender.pid, pidfd)
                        killed.append(sender.pid)
                    finally:
                        os.close(pidfd)
            close_fds(fds)
            if not data:  # the end (credentials still come with it: not a message)
                break
    finally:
        sock.detach()
    return killed
