"""The daemon's end of the native handover: listen, receive one request + one uffd, check.

Why a module of its own: this is uffdd's front door for untrusted local peers. Every
way a restorer can be wrong or hostile (wrong uid, garbage, no fd, many fds, an fd that
is not a userfaultfd, a uffd without the event features, a pid that is not its own, a
uffd that belongs to another process, a hang-up or silence mid-handshake) ends here
with a precise ``HandoverError`` to the peer when it is still there, a log line, every
received fd closed, nothing tracked or signalled, and the listener accepting the next
connection. What passes comes out as one typed :class:`Handover`. The protocol is in
``proto/uffdd/v1/handover.proto``; the pure checks in ``uffdd.core.handover``.

The daemon's use::

    listener = Listener.bind(Path("/run/uffdd/handover.sock"))   # or Listener.adopt(fd)
    async def on_handover(handover: Handover) -> None:
        start_restore(handover)          # owns it from here; return promptly
        await handover.reply.send_ack()  # the restorer keeps its copy until the end
    await accept_handovers(listener.sock, on_handover, policy=HandoverPolicy())

    # later, in the restore's task, once every page is in (or after handover.kill()):
    await handover.reply.send_resident(summary)    # or send_failed(reason)
    handover.close()                               # uffd, pidfd, connection

Pid rule: SO_PEERCRED names the *connecting* process. The claimed pid (0 = the peer)
must be the peer or a descendant of it: a restorer may hand over for a child it forked
and restored, never for an unrelated process. A pidfd is opened on it so the daemon can
later signal the right process even if the pid number is reused.

Ownership rule: the uffd must be the claimed process's (``kernel/ownership.py``): that
process holds a copy of it (kcmp), and every region is mapped and registered for
missing faults in its own memory, checked with its pidfd open. So the restorer keeps
its copy at least until the ack (``uffdd.restorer`` keeps it until Resident or Failed);
when the claimed process is a descendant of the peer, the descendant must hold one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import signal
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from uffdd.core.errors import ConfigError, InternalError, PeerProtocolError, UffdOpError
from uffdd.core.events import Fork
from uffdd.core.handover import (
    DEFAULT_SOCKET_PATH,
    MAX_REQUEST_BYTES,
    Ack,
    Error,
    ErrorCode,
    Failed,
    HandoverLimits,
    HandoverRegion,
    HandoverRejected,
    HandoverRequest,
    Progress,
    Reply,
    ResidentSummary,
)
from uffdd.kernel.fdpass import close_fds, fds_in, wait_readable
from uffdd.kernel.ownership import MISSING_FLAG, Unproven, pidfd_alive, prove_owner, read_vmas
from uffdd.kernel.uffd import Feature, Uffd
from uffdd.kernel.unix_listener import bind_listener, unlink_if_ours
from uffdd.log import get_logger
from uffdd.wire.handover import decode_request, encode_reply

__all__ = [
    "DEFAULT_SOCKET",
    "REQUIRED_FEATURES",
    "Handover",
    "HandoverPolicy",
    "Listener",
    "PeerCredentials",
    "ReplyChannel",
    "accept_handovers",
    "drain_events",
    "receive_handover",
]

DEFAULT_SOCKET = Path(DEFAULT_SOCKET_PATH)
REQUIRED_FEATURES = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
)
"""What a handed-over uffd must have negotiated so the daemon can follow the process tree."""

_INT = array.array("i").itemsize
_MAX_FDS = 8
"""Room for this many fds per record: a peer sending extras gets them closed, not leaked
(beyond this the kernel truncates the control data, sets MSG_CTRUNC and drops the rest)."""
_ANCILLARY_SIZE = socket.CMSG_SPACE(_MAX_FDS * _INT)
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_MAX_ANCESTRY = 256
_BUSY_WAIT = 1.0

_log = get_logger("handover")


def _default_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


@dataclass(frozen=True, slots=True)
class HandoverPolicy:
    """Who may hand over what, and how long a handshake may take."""

    allowed_uids: frozenset[int] = field(default_factory=_default_uids)
    """Peer uids (SO_PEERCRED) accepted; default root and the daemon's own uid."""
    limits: HandoverLimits = field(default_factory=HandoverLimits)
    required_features: Feature = REQUIRED_FEATURES
    handshake_timeout: float = 10.0
    """Seconds a peer has from connecting to sending its request."""
    send_timeout: float = 5.0
    """Seconds a reply may wait for room in the peer's socket before the peer is dropped."""
    max_pending: int = 64
    """Handshakes in progress at once; more connections are refused (REFUSED, busy)."""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of the connecting process, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int


# -- the listening socket ---------------------------------------------------------------


class Listener:
    """The handover socket: bound here (and unlinked on close) or adopted from systemd."""

    def __init__(self, sock: socket.socket, path: Path | None, inode: int | None = None) -> None:
        self.sock = sock
        self.path = path
        self._inode = inode

    @classmethod
    def bind(
        cls, path: Path, *, mode: int = 0o600, gid: int | None = None, backlog: int = 64
    ) -> Listener:
        """Create, bind and listen on ``path`` (SOCK_SEQPACKET, non-blocking, ``mode``).

        A stale socket file left by a dead daemon is removed; a live one (something
        accepts connections) or a non-socket file at ``path`` is a ConfigError, never
        removed. The socket file is created with ``mode`` already (umask), so there is no
        window where it is more open than asked. ``gid`` makes it group-owned (pair with
        mode 0o660 and add the gid to ``allowed_uids``' peers by uid).
        """
        path = Path(path)
        sock, inode, removed = bind_listener(
            path, socket.SOCK_SEQPACKET, mode=mode, gid=gid, backlog=backlog
        )
        if removed:
            _log.info("removed stale handover socket", path=str(path))
        return cls(sock, path, inode)

    @classmethod
    def adopt(cls, fd: int) -> Listener:
        """Use an already bound, listening SOCK_SEQPACKET unix socket (socket activation).

        The socket file belongs to whoever bound it (systemd): close() leaves it alone.
        Raises ConfigError (the fd stays open, the caller's) when it is not such a socket.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(f"fd {fd} is not a socket: {exc.strerror or exc}") from exc
        problem = ""
        if sock.family != socket.AF_UNIX:
            problem = f"family {sock.family.name}, not AF_UNIX"
        elif sock.type != socket.SOCK_SEQPACKET:
            problem = f"type {sock.type.name}, not SOCK_SEQPACKET (ListenSequentialPacket=)"
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            problem = "not listening"
        if problem:
            sock.detach()
            raise ConfigError(f"handover fd {fd}: {problem}")
        sock.set_inheritable(False)
        sock.setblocking(False)
        return cls(sock, None)

    def close(self) -> None:
        """Close the socket; unlink the file if we bound it and it is still ours."""
        self.sock.close()
        if self.path is not None and self._inode is not None:
            unlink_if_ours(self.path, self._inode)


# -- the reply channel ------------------------------------------------------------------


class ReplyChannel:
    """The connection a handover came on, kept open to report back to the restorer.

    Sends never raise for the peer's sake: a restorer that hung up or stopped reading is
    allowed (serving goes on), so each method returns whether the record was delivered
    (and drops the connection when it was not). Misuse by the daemon (a second ack,
    Resident before the ack) is an InternalError.
    """

    def __init__(self, sock: socket.socket, handover_id: str, send_timeout: float = 5.0) -> None:
        self._sock: socket.socket | None = sock
        self.handover_id = handover_id
        self._send_timeout = send_timeout
        self.acked = False
        self.resident = False
        """Resident was reported (delivered or not): the process is fully served."""

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        """The connection's descriptor (-1 once closed): journaled, so that a daemon
        that resumes this restore reports on it."""
        return -1 if self._sock is None else self._sock.fileno()

    async def send_ack(self) -> bool:
        """Tell the restorer the daemon serves the uffd now (it keeps its own copy until
        Resident or Failed, or the connection ends).

        False means the restorer did not get it: it then treats the handover as failed
        (closes its uffd, unmaps what it mapped), so the daemon should drop the Handover.
        """
        if self.acked:
            raise InternalError(f"handover {self.handover_id}: acked twice")
        self.acked = True
        return await self._send(Ack(self.handover_id))

    async def send_error(self, code: ErrorCode, message: str) -> bool:
        """Refuse the handover (before the ack only), then close the connection."""
        if self.acked:
            raise InternalError(f"handover {self.handover_id}: error reply after the ack")
        try:
            return await self._send(Error(code, message))
        finally:
            self.close()

    async def send_progress(self, resident_bytes: int, total_bytes: int) -> bool:
        """Lossy progress: sent only if there is room right now, else dropped."""
        self._require_ack("progress")
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send(
                encode_reply(Progress(resident_bytes, total_bytes)),
                socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
            )
        except BlockingIOError:
            return False
        except OSError:
            self.close()
            return False
        return True

    async def send_resident(self, summary: ResidentSummary) -> bool:
        """Report full residency (the source may be released), then close."""
        self._require_ack("resident")
        self.resident = True
        try:
            return await self._send(summary)
        finally:
            self.close()

    async def send_failed(self, reason: str) -> bool:
        """Report that the process could not be served, then close."""
        self._require_ack("failed")
        try:
            return await self._send(Failed(reason))
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection (after discarding anything the peer sent unasked)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            _discard_pending(sock)
            sock.close()

    def _require_ack(self, what: str) -> None:
        if not self.acked:
            raise InternalError(f"handover {self.handover_id}: {what} reply before the ack")

    async def _send(self, reply: Reply) -> bool:
        sock = self._sock
        if sock is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._send_timeout):
                await loop.sock_sendall(sock, encode_reply(reply))
        except (OSError, TimeoutError) as exc:
            _log.info(
                "restorer not reachable",
                handover=self.handover_id,
                reply=type(reply).__name__,
                error=str(exc) or type(exc).__name__,
            )
            self.close()
            return False
        return True


def _discard_pending(sock: socket.socket) -> None:
    """Read away unread records (closing their fds): closing a unix socket with unread
    data resets the connection, and the peer would lose the reply already sent."""
    for _ in range(16):
        try:
            data, ancillary, _, _ = sock.recvmsg(
                1, _ANCILLARY_SIZE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
        except OSError:
            return
        fds = fds_in(ancillary)
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            return


# -- the result -------------------------------------------------------------------------


@dataclass(eq=False)
class Handover:
    """A validated handover: who, which process, which image, which ranges, and the uffd.

    Owns ``uffd``, ``pidfd`` and ``reply`` until :meth:`close`. Never close a live
    process's uffd before it is fully resident (later faults would read zeros): kill it
    first (:meth:`kill`) when it cannot be served.

    The restorer keeps its own copy of the uffd until it hears Resident or Failed, so
    closing ours does not unregister the process's memory. Left registered with no
    reader, the process's next fork, mremap, munmap or madvise(DONTNEED) would wait for
    someone to read its event. So :meth:`close` after a Resident report first lets go
    of the memory through a copy kept here (``uffd`` itself is the executor's, closed
    when it releases the process): every VMA registered through this uffd is
    unregistered (its pages are all in; the kernel then handles them as ordinary
    memory) and the events raised meanwhile are read.
    """

    handover_id: str
    peer: PeerCredentials
    pid: int
    """The restored process (the peer or a descendant of it), in the daemon's namespace."""
    pidfd: int
    request: HandoverRequest
    """Validated; ``request.regions`` sorted by run-time address, non-overlapping."""
    features: Feature
    """The features negotiated on ``uffd`` (a superset of the policy's required ones)."""
    uffd: Uffd
    reply: ReplyChannel
    kept: Uffd | None = None
    """The daemon's second copy, for the let-go at :meth:`close` (made from ``uffd``
    when not given)."""

    def __post_init__(self) -> None:
        if self.kept is None:
            self.kept = Uffd(os.dup(self.uffd.fd))

    @property
    def image_id(self) -> str:
        return self.request.image_id

    @property
    def page_server(self) -> str:
        """The page server target; "" means the daemon's default."""
        return self.request.page_server

    @property
    def regions(self) -> tuple[HandoverRegion, ...]:
        return self.request.regions

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the restored process through its pidfd; False if it is already gone."""
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        """Close the uffd, the pidfd and the connection (idempotent); after a Resident
        report, let go of the process's memory first."""
        self.uffd.close()
        self.reply.close()
        kept, self.kept = self.kept, None
        pidfd, self.pidfd = self.pidfd, -1
        try:
            if kept is not None and self.reply.resident and pidfd >= 0:
                self._let_go(kept, pidfd)
        finally:
            if kept is not None:
                kept.close()
            if pidfd >= 0:
                os.close(pidfd)

    def _let_go(self, kept: Uffd, pidfd: int) -> None:
        let_go(kept, self.pid, pidfd, self.handover_id)


def let_go(kept: Uffd, pid: int, pidfd: int, handover_id: str) -> None:
    """Unregister what ``kept`` (a copy of a resident process's uffd) registered in
    process ``pid``, then read the events raised before that: the restorer keeps its
    own copy until it reads Resident, and meanwhile the process's next fork, mremap,
    munmap or madvise would wait for a reader. A VMA registered through another uffd of
    the process refuses (EINVAL) and is left alone; any other failure kills the process
    (it would wait forever on the restorer's copy)."""
    if not pidfd_alive(pidfd):
        return
    log = _log.bind(handover=handover_id, pid=pid)
    try:
        vmas = read_vmas(pid)
    except OSError as exc:
        vmas = []
        log.warning("cannot read a resident process's mappings", error=str(exc))
    for vma in vmas:
        if MISSING_FLAG not in vma.flags:
            continue
        try:
            kept.unregister(vma.start, vma.end - vma.start)
        except UffdOpError as exc:
            if exc.errno == errno.EINVAL:
                continue
            log.error("cannot let go of a resident process's memory: killing it", error=str(exc))
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return
    drain_events(kept)


def drain_events(uffd: Uffd) -> None:
    """Read (and so complete) every pending message of a uffd nobody serves any more,
    closing the uffds of FORK events (their children's memory is let go with them)."""
    while True:
        try:
            events = uffd.read_events()
        except UffdOpError as exc:
            _log.warning("reading a let-go uffd failed", error=str(exc))
            return
        if not events:
            return
        for event in events:
            if isinstance(event, Fork):
                os.close(event.child_fd)


# -- receiving one handover ---------------------------------------------------------------


async def receive_handover(
    conn: socket.socket, policy: HandoverPolicy | None = None, *, handover_id: str | None = None
) -> Handover:
    """Run the handshake on an accepted connection; return the Handover (not yet acked).

    On a bad request the peer gets an Error reply, every received fd and the connection
    are closed, and HandoverRejected is raised. A peer that hangs up before sending a
    request raises PeerProtocolError. ``conn`` belongs to this function from the call on:
    it ends up closed or inside the returned Handover's reply channel.
    """
    policy = policy or HandoverPolicy()
    channel = ReplyChannel(conn, handover_id or uuid.uuid4().hex, policy.send_timeout)
    fds: list[int] = []  # received and not yet owned by a Uffd
    try:
        conn.setblocking(False)
        return await _handshake(conn, channel, policy, fds)
    except HandoverRejected as exc:
        close_fds(fds)  # before the reply: once the peer reads it, nothing of its is open
        await channel.send_error(exc.code, exc.reason)
        raise
    except PeerProtocolError:
        close_fds(fds)
        channel.close()
        raise
    except Exception as exc:  # our bug or a resource failure: the peer still hears
        close_fds(fds)
        _log.exception("handover handshake failed", handover=channel.handover_id)
        await channel.send_error(ErrorCode.INTERNAL, f"internal error: {exc}")
        raise HandoverRejected(ErrorCode.INTERNAL, str(exc)) from exc
    except BaseException:  # cancelled: no reply, just let go of everything
        close_fds(fds)
        channel.close()
        raise


async def _handshake(
    conn: socket.socket, channel: ReplyChannel, policy: HandoverPolicy, fds: list[int]
) -> Handover:
    """The checks, in order; raises HandoverRejected. Received fds go into ``fds``."""
    # The request is read before any check, even from a peer that will be refused: a
    # socket closed with unread data resets the connection, and the peer would lose our
    # reply. Fds it carried are closed unused (received close-on-exec).
    peer = peer_credentials(conn)
    try:
        async with asyncio.timeout(policy.handshake_timeout):
            data, flags = await _recv_request(conn, fds)
    except TimeoutError:
        raise HandoverRejected(
            ErrorCode.MALFORMED, f"no request within {policy.handshake_timeout:g} s of connecting"
        ) from None
    if not data and not fds:
        raise PeerProtocolError(f"pid {peer.pid} hung up before sending a request")
    if peer.uid not in policy.allowed_uids:
        raise HandoverRejected(
            ErrorCode.PERMISSION_DENIED, f"uid {peer.uid} may not hand over to this daemon"
        )
    if flags & socket.MSG_TRUNC:
        raise HandoverRejected(ErrorCode.LIMIT, f"request larger than {MAX_REQUEST_BYTES} bytes")
    request = decode_request(data, policy.limits)
    if flags & socket.MSG_CTRUNC:
        raise HandoverRejected(
            ErrorCode.BAD_FD,
            f"more than {_MAX_FDS} fds attached, expected exactly one (the userfaultfd)",
        )
    if len(fds) != 1:
        raise HandoverRejected(
            ErrorCode.BAD_FD,
            "no fd attached, expected the userfaultfd as SCM_RIGHTS"
            if not fds
            else f"{len(fds)} fds attached, expected exactly one (the userfaultfd)",
        )
    uffd, features = _check_uffd(fds.pop(), policy.required_features)
    try:
        pid, pidfd = _open_process(peer, request.pid)
        try:
            # In a thread: /proc/PID/smaps waits for the process's mmap lock, which a
            # busy restore holds often (10 ms a read with 64 restores at once, all of
            # it stalling every other restore on the loop).
            await asyncio.to_thread(_prove_owner, pid, pidfd, uffd, request.regions)
        except BaseException:
            os.close(pidfd)
            raise
    except BaseException:
        uffd.close()
        raise
    return Handover(
        handover_id=channel.handover_id,
        peer=peer,
        pid=pid,
        pidfd=pidfd,
        request=request,
        features=features,
        uffd=uffd,
        reply=channel,
    )


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """SO_PEERCRED: the connecting process's pid, uid and gid (as of connect())."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


async def _recv_request(conn: socket.socket, fds: list[int]) -> tuple[bytes, int]:
    """One record and its flags; the fds it carried (close-on-exec) are added to ``fds``."""
    while True:
        try:
            data, ancillary, flags, _ = conn.recvmsg(
                MAX_REQUEST_BYTES + 1, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionResetError:
            return b"", 0
        else:
            fds.extend(fds_in(ancillary))
            return data, flags
        await wait_readable(conn.fileno())


def _check_uffd(fd: int, required: Feature) -> tuple[Uffd, Feature]:
    """Adopt ``fd`` (owned from here) as a non-blocking uffd with ``required`` on.

    On refusal the fd is closed before HandoverRejected is raised."""
    try:
        uffd = Uffd.adopt(fd, nonblocking=True)
    except PeerProtocolError as exc:
        os.close(fd)
        raise HandoverRejected(ErrorCode.BAD_FD, str(exc)) from None
    try:
        features = uffd.info().features
    except (OSError, PeerProtocolError) as exc:
        uffd.close()
        raise HandoverRejected(
            ErrorCode.BAD_FD, f"cannot read the uffd's features: {exc}"
        ) from None
    missing = Feature(int(required) & ~int(features))
    if missing:
        uffd.close()
        names = ", ".join(str(m.name) for m in Feature if m & missing)
        raise HandoverRejected(
            ErrorCode.MISSING_FEATURES,
            f"the userfaultfd lacks {names} (negotiated {int(features):#x}; create it with "
            f"UFFDIO_API features including {int(required):#x}, as root or CAP_SYS_PTRACE "
            "for EVENT_FORK)",
        )
    return uffd, features


def _open_process(peer: PeerCredentials, claimed: int) -> tuple[int, int]:
    """Resolve the claimed pid (0 = the peer), open a pidfd and check it is in the
    peer's tree. The check runs after opening, so the pidfd names the process checked."""
    pid = claimed or peer.pid
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise HandoverRejected(ErrorCode.BAD_PID, f"pid {pid} does not exist") from None
    try:
        if pid != peer.pid and not _is_descendant(pid, peer.pid):
            raise HandoverRejected(
                ErrorCode.BAD_PID,
                f"pid {pid} is neither the connecting process ({peer.pid}) nor a descendant",
            )
    except BaseException:
        os.close(pidfd)
        raise
    return pid, pidfd


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def _is_descendant(pid: int, ancestor: int) -> bool:
    try:
        for _ in range(_MAX_ANCESTRY):
            pid = _parent_of(pid)
            if pid == ancestor:
                return True
            if pid <= 1:
                return False
    except (OSError, ValueError):
        return False
    return False


_PROOF_CODES = {
    Unproven.GONE: ErrorCode.BAD_PID,
    Unproven.UNREADABLE: ErrorCode.BAD_PID,
    Unproven.NOT_HELD: ErrorCode.BAD_PID,
    Unproven.NOT_MAPPED: ErrorCode.BAD_REGIONS,
    Unproven.NOT_REGISTERED: ErrorCode.BAD_REGIONS,
}


def _prove_owner(pid: int, pidfd: int, uffd: Uffd, regions: tuple[HandoverRegion, ...]) -> None:
    """The uffd must be the claimed process's: it holds a copy, and every region is
    mapped and registered for missing faults in its own memory (``kernel/ownership``)."""
    disproof = prove_owner(pidfd, pid, uffd.fd, [(r.run_address, r.length) for r in regions])
    if disproof is not None:
        raise HandoverRejected(_PROOF_CODES[disproof.unproven], disproof.reason)


# -- the accept loop ------------------------------------------------------------------------


OnHandover = Callable[[Handover], Awaitable[None]]


async def accept_handovers(
    listener: socket.socket,
    on_handover: OnHandover,
    *,
    policy: HandoverPolicy | None = None,
) -> None:
    """Accept connections forever (until cancelled), one task per handshake.

    Each valid handover is passed to ``on_handover``, which owns it from then on: it
    sends the ack (``handover.reply.send_ack()``) once it serves the uffd, and closes the
    Handover when done. If ``on_handover`` raises, the listener cleans up: before the
    ack the peer gets Error(REFUSED or INTERNAL) and everything is closed (the restorer
    still holds its own uffd); after the ack the process is killed through its pidfd
    first (closing the uffd would make its faults read zeros), then Failed is sent.
    Raise HandoverRejected from ``on_handover`` to refuse with a chosen code.

    ``on_handover`` should return once it has taken the Handover over (e.g. started the
    restore's task): a callback still running when this loop is cancelled is cancelled
    too, and an acked process is then killed like above. Nothing a peer does ends this
    loop; cancelling it also cancels the handshakes in flight, closing their fds.
    """
    policy = policy or HandoverPolicy()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: back off, do not spin
                _log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            if len(tasks) >= policy.max_pending:
                task = loop.create_task(_refuse_busy(conn, policy))
            else:
                task = loop.create_task(_handle(conn, on_handover, policy))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _refuse_busy(conn: socket.socket, policy: HandoverPolicy) -> None:
    """Refuse, after a short wait for the request (so the peer's send is not reset)."""
    channel = ReplyChannel(conn, "", policy.send_timeout)
    fds: list[int] = []
    try:
        conn.setblocking(False)
        async with asyncio.timeout(min(policy.handshake_timeout, _BUSY_WAIT)):
            await _recv_request(conn, fds)
    except TimeoutError:
        pass
    finally:
        close_fds(fds)
    await channel.send_error(ErrorCode.REFUSED, "too many handovers in progress; retry later")


async def _handle(conn: socket.socket, on_handover: OnHandover, policy: HandoverPolicy) -> None:
    try:
        handover = await receive_handover(conn, policy)
    except HandoverRejected as exc:
        _log.warning("handover refused", code=exc.code.name, reason=exc.reason)
        return
    except PeerProtocolError as exc:
        _log.info("handover abandoned", reason=str(exc))
        return
    except Exception:
        _log.exception("handover failed")
        return
    log = _log.bind(
        handover=handover.handover_id,
        pid=handover.pid,
        peer_pid=handover.peer.pid,
        image=handover.image_id,
    )
    log.info(
        "handover received",
        regions=len(handover.regions),
        bytes=handover.request.total_bytes,
        restorer=handover.request.restorer,
    )
    try:
        await on_handover(handover)
    except BaseException as exc:
        await _cleanup_after_callback(handover, exc)
        if not isinstance(exc, Exception):
            raise
        log.exception("on_handover failed")


async def _cleanup_after_callback(handover: Handover, exc: BaseException) -> None:
    try:
        if not handover.reply.acked:
            if isinstance(exc, HandoverRejected):
                await handover.reply.send_error(exc.code, exc.reason)
            elif isinstance(exc, Exception):
                await handover.reply.send_error(ErrorCode.INTERNAL, f"daemon error: {exc}")
        else:
            handover.kill()
            if not handover.reply.closed:
                await handover.reply.send_failed(f"daemon error: {exc!r}; process killed")
    finally:
        handover.close()
