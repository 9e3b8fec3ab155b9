"""The Firecracker front door: a Unix SOCK_STREAM socket where VMMs hand over guest memory.

Why its own listener: Firecracker speaks its own protocol (shared/PROTOCOLS.md
section 3): one ``sendmsg`` with a JSON region list and the uffd as SCM_RIGHTS, no
reply, no version, no pid. This module frames messages off the stream (several
(regions, uffd) pairs may follow on one connection), learns the VMM's pid with
SO_PEERCRED (and opens a pidfd at once, so a reused pid is never signalled), waits a
little for an fd that arrives after its payload (Firecracker's own example handler
retries the read 5 times, 100 ms apart; we wait up to ``fd_wait`` seconds), and then
hands each pair to the daemon with ``Daemon.start``.

Before serving a pair it proves the uffd is the VMM's (``kernel/ownership.py``): the
peer holds the same uffd (Firecracker keeps its copy) and every guest region is
registered for missing faults in its own memory, checked with its pidfd open.

Refusals are logged, the connection is closed, every fd received is closed, and the
listener serves everyone else. A refused VMM cannot be left as it is: it keeps its own
copy of the uffd, so its first touch of guest memory would block forever. Once a peer
has shown it is a VMM waiting for service (it sent a uffd, or a region list) and its
handover is refused, it is killed (SIGKILL through the pidfd), as the native handover
kills a process it cannot serve. A peer of a uid we do not serve is never signalled,
nor one whose uffd is not proven its own (its memory does not wait on that uffd).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from uffdd.core.errors import PageServerError, PeerProtocolError
from uffdd.core.firecracker import (
    GuestRegion,
    PayloadError,
    lazy_regions,
    parse_regions,
    take_message,
)
from uffdd.daemon.doors.firecracker.backing import Backing
from uffdd.daemon.doors.firecracker.endpoint import FirecrackerSocket, drain_now, recv
from uffdd.daemon.doors.firecracker.restore import VmRestore
from uffdd.daemon.doors.native.listener import PeerCredentials, peer_credentials
from uffdd.daemon.lifecycle import Daemon, Restore, Resumed, SilentReporter
from uffdd.keeper.journal import PendingHandover, Record
from uffdd.kernel.ownership import prove_owner
from uffdd.kernel.proc import start_time
from uffdd.kernel.uffd import Feature, Uffd
from uffdd.log import get_logger

_log = get_logger("uffdd.firecracker")

REQUIRED_FEATURES = Feature.EVENT_REMOVE
"""Without EVENT_REMOVE a page the balloon dropped would be refilled from the snapshot."""


def _default_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


@dataclass(frozen=True, slots=True)
class FirecrackerPolicy:
    """Who may hand over, and how patient the listener is."""

    allowed_uids: frozenset[int] = field(default_factory=_default_uids)
    fd_wait: float = 2.0
    """Seconds a complete region list may wait for its uffd (it can come in a later read)."""
    kill_refused: bool = True
    """Kill a VMM whose handover is refused (it would block forever on its own uffd)."""


@dataclass
class _Pending:
    """What one connection has received and not yet handed to the daemon."""

    buffer: bytes = b""
    fds: list[int] = field(default_factory=list)
    waiting: bool = False
    """A valid region list arrived: a VMM waits for its handover to complete."""
    journaled: str = ""
    """The name of its pending handover in the journal, until its restore is journaled."""

    def shows_vmm(self) -> bool:
        """Whether the peer is a VMM waiting for service (judged when uffdd stops)."""
        if self.waiting or self.fds:
            return True
        try:
            message, _ = take_message(self.buffer)
            return message is not None and bool(parse_regions(message))
        except PayloadError:
            return False


class Refused(Exception):
    """A handover that cannot be served; ``vmm`` says the peer showed it is a VMM."""

    def __init__(self, reason: str, *, vmm: bool) -> None:
        super().__init__(reason)
        self.vmm = vmm


def firecracker_door(
    socket_path: Path | FirecrackerSocket,
    backing: Backing,
    policy: FirecrackerPolicy | None = None,
    *,
    mode: int = 0o600,
) -> Callable[[Daemon], Coroutine[object, object, None]]:
    """A front door for ``Daemon.run(listeners=[...])``."""
    return functools.partial(
        serve_firecracker, socket=socket_path, backing=backing, policy=policy, mode=mode
    )


async def serve_firecracker(
    daemon: Daemon,
    socket: Path | FirecrackerSocket,
    backing: Backing,
    policy: FirecrackerPolicy | None = None,
    *,
    mode: int = 0o600,
) -> None:
    """Take Firecracker handovers on ``socket`` until cancelled (at the daemon's stop).

    Pass a :class:`FirecrackerSocket` bound beforehand to see bind errors at start-up;
    a path is bound here. If this front door fails unexpectedly the daemon is stopped
    (gracefully) rather than left running deaf.
    """
    listening = (
        socket
        if isinstance(socket, FirecrackerSocket)
        else FirecrackerSocket.bind(socket, mode=mode)
    )
    server = _Server(daemon, backing, policy or FirecrackerPolicy())
    server.resume_key = str(listening.path)
    daemon.resumers[f"firecracker:{listening.path}"] = server.resume
    _log.info("listening for Firecracker", socket=str(listening.path))
    try:
        await server.accept_loop(listening.sock)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _log.error("the Firecracker listener failed; stopping", error=repr(exc))
        daemon.stop()
    finally:
        server.refuse_backlog(listening.sock)
        listening.close()
        await server.close()


class _Server:
    def __init__(self, daemon: Daemon, backing: Backing, policy: FirecrackerPolicy) -> None:
        self.daemon = daemon
        self.backing = backing
        self.policy = policy
        self.resume_key = ""
        """What this door's restores are journaled under (its socket's path)."""
        self.connections: set[asyncio.Task[None]] = set()
        self.restores: set[VmRestore] = set()
        self._names = itertools.count(1)

    async def accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            task = loop.create_task(self.connection(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    def refuse_backlog(self, sock: socket.socket) -> None:
        """At stop: connections never accepted may hold a VMM's handover; look at each."""
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                pending = _Pending()
                try:
                    peer = peer_credentials(conn)
                    pending.buffer += drain_now(conn, pending.fds)
                    if peer.uid in self.policy.allowed_uids and pending.shows_vmm():
                        pidfd = os.pidfd_open(peer.pid)
                        try:
                            self._refuse(peer, pidfd, "uffdd stopped before serving it", vmm=True)
                        finally:
                            os.close(pidfd)
                except OSError as exc:
                    _log.warning("a connection at stop could not be checked", error=str(exc))
                finally:
                    for fd in pending.fds:
                        os.close(fd)

    async def close(self) -> None:
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.gather(*self.connections, return_exceptions=True)
        # Restores still served by the daemon end with it; resident watches end here.
        for restore in list(self.restores):
            if restore.resident:
                restore.close_now()

    # -- one connection ------------------------------------------------------------------

    async def connection(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pending = _Pending()
        pidfd = -1
        try:
            peer = peer_credentials(conn)
            if peer.uid not in self.policy.allowed_uids:
                _log.warning(
                    "refused a Firecracker peer",
                    pid=peer.pid,
                    uid=peer.uid,
                    reason="uid not allowed",
                )
                return
            try:
                pidfd = os.pidfd_open(peer.pid)
            except OSError as exc:
                _log.warning("the Firecracker peer is gone", pid=peer.pid, error=str(exc))
                return
            # The VMM's guest memory is registered and it runs on once it has sent its
            # uffd: should the daemon die before the restore is journaled, nobody would
            # ever answer it, so the keeper kills it (keeper/journal.py:PendingHandover).
            pending.journaled = f"fc-{peer.pid}-{id(conn):x}"
            self._journal(pending, peer, conn)
            try:
                await self._pairs(conn, peer, pidfd, pending)
            except Refused as exc:
                self._refuse(peer, pidfd, str(exc), vmm=exc.vmm)
            except asyncio.CancelledError:
                # uffdd stops: a VMM half-way through its handover will never be served
                # (what it sent may still be unread: look before deciding).
                pending.buffer += drain_now(conn, pending.fds)
                if pending.shows_vmm():
                    self._refuse(peer, pidfd, "uffdd stopped during the handover", vmm=True)
                raise
        finally:
            self._journaled(pending)
            for fd in pending.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if pidfd >= 0:
                os.close(pidfd)
            conn.close()

    def _journal(self, pending: _Pending, peer: PeerCredentials, conn: socket.socket) -> None:
        if self.daemon.journal is not None:
            self.daemon.journal.begin_handover(
                PendingHandover(
                    pending.journaled,
                    peer.pid,
                    conn.fileno(),
                    received=((-1, peer.pid, start_time(peer.pid)),),
                )
            )

    def _journaled(self, pending: _Pending) -> None:
        """The connection's handover is over, or its restore journaled."""
        if pending.journaled and self.daemon.journal is not None:
            self.daemon.journal.end_handover(pending.journaled)
        pending.journaled = ""

    def _refuse(self, peer: PeerCredentials, pidfd: int, reason: str, *, vmm: bool) -> None:
        kill = vmm and self.policy.kill_refused
        _log.error("refused a Firecracker handover", pid=peer.pid, reason=reason, killed=kill)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    async def _pairs(
        self, conn: socket.socket, peer: PeerCredentials, pidfd: int, pending: _Pending
    ) -> None:
        """Read (regions, uffd) pairs until the peer hangs up."""
        fds = pending.fds
        while True:
            try:
                message, pending.buffer = take_message(pending.buffer)
                regions = None if message is None else parse_regions(message)
            except PayloadError as exc:
                # Killed only if it passed a fd: garbage alone does not show a VMM waits.
                raise Refused(str(exc), vmm=bool(fds)) from None
            if regions is None:
                # A uffd travels with its message: once one is here, the rest of the
                # message gets as long as a late fd would, then the VMM is refused.
                data = await recv(conn, fds, self.policy.fd_wait if fds else None)
                if data is None:
                    raise Refused(
                        "a userfaultfd arrived but its region list did not end within "
                        f"{self.policy.fd_wait:g} s",
                        vmm=True,
                    )
                if not data:
                    if pending.buffer or fds:
                        raise Refused(
                            "the peer hung up in the middle of a handover "
                            f"({len(pending.buffer)} bytes of an unfinished message)",
                            vmm=bool(fds),
                        )
                    return
                pending.buffer += data
                continue
            # A valid region list: from here on the peer is a VMM waiting for service.
            pending.waiting = True
            deadline = time.monotonic() + self.policy.fd_wait
            while not fds:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Refused(
                        "no userfaultfd arrived with the region list within "
                        f"{self.policy.fd_wait:g} s",
                        vmm=True,
                    )
                data = await recv(conn, fds, remaining)
                if data == b"":
                    raise Refused("the peer hung up before sending the userfaultfd", vmm=True)
                pending.buffer += data or b""
            uffd_fd = fds.pop(0)
            if fds:
                _log.warning(
                    "closing extra fds of a Firecracker handover", pid=peer.pid, extra=len(fds)
                )
                for fd in fds:
                    os.close(fd)
                fds.clear()
            await self._handover(peer, pidfd, regions, uffd_fd)
            self._journaled(pending)  # its restore is journaled now
            pending.waiting = False

    async def resume(self, record: Record, uffd: Uffd) -> Resumed:
        """Take back a VM a daemon that died served through this door: the same backing,
        and the same let-go at full residency (``VmRestore``)."""
        layout = await self.backing.layout(self.daemon)
        if layout.image_id != record.image_id:
            raise ValueError(f"this door serves image {layout.image_id}, not {record.image_id}")
        restore = VmRestore(
            record.proc,
            record.pid,
            record.pidfd,
            uffd,
            list(record.checkpoint.pieces),
            self.restores.discard,
        )
        self.restores.add(restore)
        return Resumed(layout.source, restore.executor_uffd, restore.close, restore.done)

    async def _handover(
        self, peer: PeerCredentials, pidfd: int, regions: tuple[GuestRegion, ...], fd: int
    ) -> None:
        """Check one pair and start serving it; ``fd`` is closed on refusal."""
        try:
            uffd = Uffd.adopt(fd, nonblocking=True)
        except PeerProtocolError as exc:
            os.close(fd)
            raise Refused(str(exc), vmm=True) from None
        restore: VmRestore | None = None
        try:
            try:
                features = uffd.info().features
            except PeerProtocolError as exc:
                raise Refused(str(exc), vmm=True) from None
            missing = REQUIRED_FEATURES & ~features
            if missing:
                raise Refused(
                    f"the userfaultfd lacks {missing.name} (balloon pages would come back)",
                    vmm=True,
                )
            try:
                layout = await self.backing.layout(self.daemon)
            except PageServerError as exc:
                raise Refused(f"the image is not available: {exc}", vmm=True) from None
            try:
                lazy = lazy_regions(regions, layout.regions, layout.image_id)
            except PayloadError as exc:
                raise Refused(str(exc), vmm=True) from None
            # The VMM keeps its copy: it must hold this uffd and have registered its
            # guest memory with it, or it is not waiting on it (and is not ours to kill).
            disproof = await asyncio.to_thread(
                prove_owner,
                pidfd,
                peer.pid,
                uffd.fd,
                [(r.base_host_virt_addr, r.size) for r in regions],
            )
            if disproof is not None:
                raise Refused(
                    f"the userfaultfd is not proven the VMM's: {disproof.reason}", vmm=False
                )
            name = f"fc{peer.pid}-{next(self._names)}"
            restore_pidfd = os.dup(pidfd)
            restore = VmRestore(name, peer.pid, restore_pidfd, uffd, lazy, self.restores.discard)
            self.daemon.start(
                Restore(
                    name=name,
                    pid=peer.pid,
                    pidfd=restore_pidfd,
                    uffd=restore.executor_uffd,
                    image_id=layout.image_id,
                    regions=lazy,
                    data=layout.data,
                    source=layout.source,
                    reporter=SilentReporter(),
                    close=restore.close,
                    on_done=restore.done,
                    dialect="firecracker",
                    origin={"firecracker": self.resume_key},
                ),
                dialect="firecracker",
                regions=len(lazy),
                features="|".join(str(f.name) for f in Feature if f in features),
            )
            self.restores.add(restore)
        except BaseException:
            if restore is not None:
                restore.close_now()
            else:
                uffd.close()
            raise
