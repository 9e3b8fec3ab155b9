"""Test-side handle on the scripted workload processes (``workload_child.py``).

Why: every integration test (and later the daemon and restorer tests) needs a real
process whose memory it serves, driven step by step, and none may leak a process or
hang the run. :class:`Workload` sends one command and waits for its answer with a
deadline; a command that faults is sent with :meth:`Workload.request` so the test can
resolve the fault before collecting the answer with :meth:`Workload.reply`.
:class:`WorkloadPool` starts workloads and kills every one of them (forked ones too) at
the end of a test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from uffdd.core.addresses import RunAddr
from uffdd.core.events import PageFault, Remap, Remove, UffdEvent, Unmap
from uffdd.kernel.uffd import NO_FEATURES, Feature, RegisterMode, Uffd

PAGE = os.sysconf("SC_PAGE_SIZE")
CHILD_SCRIPT = Path(__file__).with_name("workload_child.py")
REPLY_TIMEOUT = 30.0
"""Seconds to wait for an answer: a guard against hangs, never a measurement."""
MAX_MESSAGE = 1 << 20
CLOSE_GRACE = 2.0
"""Seconds an idle workload gets to leave on its own before it is killed."""


class WorkloadError(RuntimeError):
    """The workload reported a failed command, died, or did not answer in time."""


@dataclass
class Reply:
    result: Any
    fds: list[int] = field(default_factory=list)


def pattern(seed: int, length: int = PAGE) -> bytes:
    """Recognisable page contents: every page of every test differs."""
    block = bytes((seed * 31 + i * 7 + i // 251) & 0xFF for i in range(256))
    return (block * (length // 256 + 1))[:length]


class Workload:
    """One scripted process: the started child, or a process it forked."""

    def __init__(self, sock: socket.socket, pid: int, proc: subprocess.Popen[bytes] | None):
        self.sock = sock
        self.pid = pid
        self.proc = proc
        self.pidfd = os.pidfd_open(pid)
        self._outstanding = False

    @classmethod
    def start(cls) -> Workload:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.pop("PYTHONFAULTHANDLER", None)  # a SIGBUS must kill it, not dump a traceback
        try:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD_SCRIPT), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
            )
        finally:
            theirs.close()
        return cls(ours, proc.pid, proc)

    # -- the command channel ----------------------------------------------------------

    def request(self, op: str, **args: Any) -> None:
        """Send a command without waiting (it may block in the workload on a fault)."""
        if self._outstanding:
            raise WorkloadError(f"{op}: the previous command has not been answered")
        self.sock.sendall(json.dumps({"op": op, **args}).encode())
        self._outstanding = True

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """The answer to the outstanding command; fds received belong to the caller."""
        if not select.select([self.sock], [], [], timeout)[0]:
            raise WorkloadError(f"workload {self.pid} did not answer within {timeout}s")
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
        self._outstanding = False
        for fd in fds:
            os.set_inheritable(fd, False)
        if not data:
            raise WorkloadError(f"workload {self.pid} hung up (exited?)")
        answer = json.loads(data)
        if not answer["ok"]:
            for fd in fds:
                os.close(fd)
            raise WorkloadError(f"workload {self.pid}: {answer['error']}")
        return Reply(answer["result"], fds)

    def call(self, op: str, **args: Any) -> Reply:
        self.request(op, **args)
        return self.reply()

    # -- conveniences -----------------------------------------------------------------

    def create_uffd(self, features: Feature = NO_FEATURES, *, keep: bool = False) -> Uffd:
        """The workload creates a uffd for itself and hands it over (SCM_RIGHTS)."""
        reply = self.call("uffd", features=int(features), keep=keep)
        (fd,) = reply.fds
        return Uffd.adopt(fd)

    def mmap(
        self,
        length: int,
        kind: str = "anon",
        fill: bytes | None = None,
        prot: str = "rw",
    ) -> int:
        encoded = base64.b64encode(fill).decode() if fill is not None else None
        result: int = self.call("mmap", length=length, kind=kind, fill=encoded, prot=prot).result
        return result

    def mmap_memfd(self, length: int, fill: bytes | None = None) -> tuple[int, int]:
        """A MAP_SHARED memfd mapping: (address, memfd); the memfd is the caller's."""
        encoded = base64.b64encode(fill).decode() if fill is not None else None
        reply = self.call("mmap", length=length, kind="memfd", fill=encoded, share_fd=True)
        (memfd,) = reply.fds
        return int(reply.result), memfd

    def register(self, addr: int, length: int, mode: RegisterMode) -> int:
        """Register with the uffd the workload kept (``create_uffd(keep=True)``)."""
        result: int = self.call("register", addr=addr, length=length, mode=int(mode)).result
        return result

    def start_read(self, addr: int, length: int = PAGE) -> None:
        self.request("read", addr=addr, length=length)

    def finish_read(self) -> bytes:
        return base64.b64decode(self.reply().result)

    def read(self, addr: int, length: int = PAGE) -> bytes:
        self.start_read(addr, length)
        return self.finish_read()

    def start_write(self, addr: int, data: bytes) -> None:
        self.request("write", addr=addr, data=base64.b64encode(data).decode())

    def write(self, addr: int, data: bytes) -> None:
        self.start_write(addr, data)
        self.reply()

    # -- life and death ---------------------------------------------------------------

    def wait_exit(self, timeout: float = REPLY_TIMEOUT) -> int | None:
        """Wait until the process has exited; its status when it is our child."""
        if not select.select([self.pidfd], [], [], timeout)[0]:
            raise WorkloadError(f"workload {self.pid} did not exit within {timeout}s")
        if self.proc is not None:
            return self.proc.wait(timeout)
        return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(REPLY_TIMEOUT)

    def close(self) -> None:
        """End the process, reap it, and close every fd of this handle.

        A started child is first asked to leave by closing its socket (it then kills
        and reaps the processes it forked); one that does not (blocked on a fault) is
        killed. A forked process is killed and left for its parent to reap.
        """
        if self.pidfd < 0:
            return
        self.sock.close()
        if self.proc is not None:
            try:
                self.proc.wait(CLOSE_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self.kill()
            select.select([self.pidfd], [], [], REPLY_TIMEOUT)
        os.close(self.pidfd)
        self.pidfd = -1


class WorkloadPool:
    """Starts workloads for one test and kills them all when it ends."""

    def __init__(self) -> None:
        self.workloads: list[Workload] = []

    def start(self) -> Workload:
        workload = Workload.start()
        self.workloads.append(workload)
        return workload

    def fork(self, parent: Workload) -> tuple[Workload, Reply]:
        """Have ``parent`` fork; returns the new process's handle once fork returned.

        With EVENT_FORK the parent's fork() waits until the Fork event is read: use
        :meth:`Workload.request` ("fork") + this pool's :meth:`adopt_fork` instead.
        """
        reply = parent.call("fork")
        return self.adopt_fork(reply), reply

    def adopt_fork(self, reply: Reply) -> Workload:
        """Wrap the answer of a "fork" command as a handle on the new process."""
        (fd,) = reply.fds
        workload = Workload(socket.socket(fileno=fd), int(reply.result), None)
        self.workloads.append(workload)
        return workload

    def close(self) -> None:
        # Newest first: forked processes before their parents.
        for workload in reversed(self.workloads):
            workload.close()
        self.workloads.clear()

    def __enter__(self) -> WorkloadPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_events(uffd: Uffd, count: int = 1, timeout: float = REPLY_TIMEOUT) -> list[UffdEvent]:
    """Read events until at least ``count`` arrived (poll with a hang guard)."""
    events: list[UffdEvent] = []
    poller = select.poll()
    poller.register(uffd.fd, select.POLLIN)
    while len(events) < count:
        if not poller.poll(int(timeout * 1000)):
            raise WorkloadError(f"no uffd event within {timeout}s (have {events})")
        events.extend(uffd.read_events())
    return events


def wait_readable(uffd: Uffd, timeout: float = REPLY_TIMEOUT) -> None:
    """Wait until the uffd has a message queued, without reading it."""
    poller = select.poll()
    poller.register(uffd.fd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        raise WorkloadError(f"uffd not readable within {timeout}s")


# Expected events, from the plain ints the workload reports (run-time addresses).


def fault(
    *, address: int, write: bool = False, wp: bool = False, minor: bool = False, tid: int = 0
) -> PageFault:
    return PageFault(address=RunAddr(address), write=write, wp=wp, minor=minor, tid=tid)


def remap(*, old: int, new: int, length: int) -> Remap:
    return Remap(old=RunAddr(old), new=RunAddr(new), length=length)


def remove(*, start: int, end: int) -> Remove:
    return Remove(start=RunAddr(start), end=RunAddr(end))


def unmap(*, start: int, end: int) -> Unmap:
    return Unmap(start=RunAddr(start), end=RunAddr(end))
