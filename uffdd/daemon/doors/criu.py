"""CRIU's lazy-pages handover: ``criu restore --lazy-pages`` hands each task's uffd over.

Why a module of its own: the protocol (shared/PROTOCOLS.md section 2) has no framing,
reply or version: on one SOCK_STREAM connection come, per task in pstree order, a
native-endian 4-byte pid then the task's uffd (SCM_RIGHTS, 1-byte payload), a zombie as
a negated pid without fd, and at the end the 4-byte "RSTF" marker and a hang-up. Every
way that can go wrong (a short pid, a pid without fd, an unknown pid, a hang-up before
the marker) must end the restore with a reason, killing the tasks already handed over
rather than leaving them to read zeros. The daemon serves each task as a restore of its
own (``criu-<pid>``): faults at once, the background sweep after the marker.

The 4-byte pid is the task's pid in the restored tree's own pid namespace (often 1): it
names images and page requests only. The process uffdd acts on (pidfd, kills, /proc) is
the sender of the messages, from SCM_CREDENTIALS (SO_PASSCRED on the socket), proven to
be that task (``kernel/proc.py:open_proven``); a task that cannot be proven fails the
restore, as a malformed handover does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from uffdd.config import LazyPagesConfig
from uffdd.core.addresses import RunAddr
from uffdd.core.errors import ImageError, PageServerError, PeerProtocolError
from uffdd.core.events import ProcId
from uffdd.core.process import LazyRegion
from uffdd.daemon.doors.native.listener import peer_credentials
from uffdd.daemon.executor import TreeOutcome
from uffdd.daemon.lifecycle import Daemon, Door, Restore, SilentReporter
from uffdd.daemon.sources import LocalImageSource, PageSource
from uffdd.image.criu.images import CriuImageError, read_pstree
from uffdd.image.criu.reader import CriuImageReader, CriuLayout, image_id_for
from uffdd.keeper.journal import PendingHandover
from uffdd.kernel.fdpass import (
    CREDENTIALS_SPACE,
    Credentials,
    close_fds,
    credentials_in,
    fds_in,
    pass_credentials,
    wait_readable,
)
from uffdd.kernel.proc import (
    UnprovenProcess,
    kill_proven,
    kill_senders_in_flight,
    open_proven,
    start_time,
)
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger

LAZY_PAGES_SOCKET = "lazy-pages.socket"
RESTORE_FINISHED = 0x52535446
"""The marker criu restore sends after the last task ("RSTF" as a native int)."""

EXIT_RESIDENT = 0
EXIT_FAILED = 1
EXIT_TASK_EXITED = 3
"""A task exited on its own while data it maps was still missing (nothing was served
wrong). A task that exits once everything was served is a success, as for criu."""

_PID = struct.Struct("=i")
_ANCILLARY_SPACE = socket.CMSG_SPACE(4 * 4) + CREDENTIALS_SPACE

_log = get_logger("uffdd.criu")


class CriuProtocolError(PeerProtocolError):
    """criu restore broke the lazy-pages protocol."""


@dataclass(frozen=True, slots=True)
class CriuResult:
    """How a CRIU restore ended: the exit code and, unless resident, why."""

    code: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Read:
    """``length`` bytes (fewer only at end of stream), the fds received meanwhile, and
    their sender: None unless every piece came with the same credentials of a process
    uffdd's pid namespace can see."""

    data: bytes
    fds: list[int]
    sender: Credentials | None


class _Stream:
    """Exact-length reads (with any fds and the sender) from a non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pass_credentials(sock)  # inherited from the listener already; a no-op then
        self.sock = sock

    async def read(self, length: int) -> _Read:
        data, fds = b"", list[int]()
        senders: set[Credentials | None] = set()
        while len(data) < length:
            try:
                chunk, ancdata, flags, _ = self.sock.recvmsg(
                    length - len(data), _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await wait_readable(self.sock.fileno())
                continue
            fds.extend(fds_in(ancdata))
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise CriuProtocolError("more fds came at once than the protocol allows")
            if not chunk:
                break
            data += chunk
            sender = credentials_in(ancdata)
            senders.add(sender if sender is not None and sender.pid > 0 else None)
        sender = senders.pop() if len(senders) == 1 else None
        return _Read(data, fds, sender)


def _releaser(resources: list[Callable[[], None]]) -> Callable[[], None]:
    def release() -> None:
        for step in reversed(resources):
            with contextlib.suppress(OSError):
                step()

    return release


@dataclass(eq=False)
class CriuRestore:
    """One ``criu restore --lazy-pages``: its connection and every task it hands over.

    ``page_server``: fetch page data from ``uffdd page-server`` (images ``criu-<pid>``)
    instead of reading ``pages-<id>.img`` from ``images_dir``; the layout always comes
    from ``images_dir`` (mm and pagemap images), as CRIU's own daemon does.
    """

    daemon: Daemon
    images_dir: Path
    page_server: str | None = None
    _roots: dict[ProcId, Restore] = field(default_factory=dict)
    _outcomes: dict[ProcId, TreeOutcome] = field(default_factory=dict)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _pending: PendingHandover | None = None

    async def run(self, conn: socket.socket) -> CriuResult:
        """Take the handover on ``conn`` and serve until every task is resident."""
        try:
            self._begin(conn)
            tasks = read_pstree(self.images_dir)
            await self._take_handover(_Stream(conn), {t.pid for t in tasks})
            self._end()
        except (CriuProtocolError, ImageError, PageServerError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
            _log.error("criu restore failed", reason=reason)
            await self._kill_all(reason)
            return CriuResult(EXIT_FAILED, reason)
        except asyncio.CancelledError:
            reason = "uffdd stopped during the handover"
            self._kill_started(reason)
            # A task whose uffd arrived and is not served yet, or is still in flight,
            # would read zeros once the connection closes: it dies with the restore.
            pending = self._pending.received if self._pending is not None else ()
            cut = [pid for _, pid, started in pending if kill_proven(pid, started)]
            cut += kill_senders_in_flight(conn.fileno())
            if cut:
                _log.error("killed restore tree", proc="criu handover", pids=cut, reason=reason)
            raise
        finally:
            conn.close()
            self._end()
        for root in self._roots:
            self.daemon.handover_complete(root)
        await self._wait_all()
        return self._result()

    def _begin(self, conn: socket.socket) -> None:
        """Journal the handover as in progress: should the daemon die before the
        restore-finished marker, the restore ends (keeper/journal.py: PendingHandover)."""
        assert self.daemon.journal is not None
        peer = peer_credentials(conn).pid
        self._pending = PendingHandover(f"criu-{peer}-{id(self):x}", peer, conn.fileno())
        self.daemon.journal.begin_handover(self._pending)

    def _received(self, fd: int, sender: int) -> None:
        """Journal a uffd received and not served yet, with its sender (before anything
        can wait): should the daemon die before its task is journaled, that task dies."""
        if self._pending is None:
            return
        assert self.daemon.journal is not None
        received = (*self._pending.received, (fd, sender, start_time(sender)))
        self._pending = replace(self._pending, received=received)
        self.daemon.journal.begin_handover(self._pending)

    def _end(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        assert self.daemon.journal is not None
        self.daemon.journal.end_handover(pending.name)

    async def _take_handover(self, stream: _Stream, pids: set[int]) -> None:
        seen: set[int] = set()
        while True:
            read = await stream.read(_PID.size)
            raw, fds = read.data, read.fds
            if fds:
                close_fds(fds)
                raise CriuProtocolError("an fd came with a pid, not after it")
            if not raw:
                raise CriuProtocolError(
                    "criu restore hung up before the restore-finished marker "
                    f"({len(seen)} of {len(pids)} tasks handed over)"
                )
            if len(raw) < _PID.size:
                raise CriuProtocolError(f"short pid: {len(raw)} byte(s), then a hang-up")
            (value,) = _PID.unpack(raw)
            if value == RESTORE_FINISHED:
                missing = sorted(pids - seen)
                if missing:
                    _log.warning("tasks never handed over", pids=missing)
                _log.info(
                    "restore finished", tasks=len(self._roots), zombies=len(seen) - len(self._roots)
                )
                return
            pid = abs(value)
            if pid == 0 or pid not in pids:
                raise CriuProtocolError(f"pid {value} is not a task of pstree.img")
            if pid in seen:
                raise CriuProtocolError(f"task {pid} was handed over twice")
            seen.add(pid)
            if value < 0:
                _log.info("zombie", pid=pid)
                continue
            uffd_read = await stream.read(1)
            payload, fds = uffd_read.data, uffd_read.fds
            if len(fds) != 1 or len(payload) != 1:
                close_fds(fds)
                what = "a hang-up" if not payload else f"{len(fds)} fds"
                raise CriuProtocolError(f"task {pid}: expected its uffd, got {what}")
            try:
                sender = _sender(pid, read.sender, uffd_read.sender)
            except CriuProtocolError:
                close_fds(fds)
                raise
            self._received(fds[0], sender)
            await self._start(pid, sender, fds[0])

    async def _start(self, pid: int, sender: int, fd: int) -> None:
        """Serve task ``pid`` (pstree pid) that is process ``sender`` (uffdd's pid)."""
        try:
            uffd = Uffd.adopt(fd, nonblocking=True)
        except PeerProtocolError as exc:
            os.close(fd)
            raise CriuProtocolError(f"task {pid}: {exc}") from exc
        resources: list[Callable[[], None]] = [uffd.close]
        try:
            try:
                pidfd = open_proven(sender, pid)
            except UnprovenProcess as exc:
                raise CriuProtocolError(f"task {pid}: its sender is not that task: {exc}") from None
            resources.append(lambda: os.close(pidfd))
            try:
                layout = CriuLayout.load(self.images_dir, pid)
                source = await self._source(layout, resources)
            except BaseException as exc:
                # its uffd is ours alone: closing it would leave the task reading zeros
                _log.error("killing task", pid=sender, task=pid, reason=str(exc))
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                raise
        except BaseException:
            _releaser(resources)()
            raise
        restore = Restore(
            name=f"criu-{pid}",
            pid=sender,
            pidfd=pidfd,
            uffd=uffd,
            image_id=image_id_for(pid),
            regions=[
                LazyRegion(RunAddr(r.start), r.start, r.length, r.page_size) for r in layout.regions
            ],
            data=layout.data,
            source=source,
            reporter=SilentReporter(),
            close=_releaser(resources),
            handed_over=False,
            on_done=self._task_done,
            dialect="criu",
            handover_id=self._pending.name if self._pending is not None else "",
            origin=(
                {"page_server": self.page_server}
                if self.page_server is not None
                else {"criu_images": str(self.images_dir), "task": str(pid)}
            ),
        )
        try:
            root = self.daemon.start(restore, dialect="criu")
        except ValueError as exc:  # the same task is being restored already
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            restore.close()
            raise CriuProtocolError(f"task {pid}: {exc}") from exc
        self._roots[root] = restore

    async def _source(self, layout: CriuLayout, resources: list[Callable[[], None]]) -> PageSource:
        if self.page_server is None:
            reader = CriuImageReader(self.images_dir, layout)
            resources.append(reader.close)
            return LocalImageSource(reader)
        client = self.daemon.clients.get(self.page_server)
        image_id = image_id_for(layout.pid)
        info = await client.image_info(image_id, timeout=self.daemon.config.fetch_deadline)
        ours = [(r.start, r.length) for r in layout.regions]
        theirs = [(r.start, r.length) for r in info.regions]
        if ours != theirs:
            raise CriuImageError(
                f"image {image_id} on {self.page_server} does not match mm-{layout.pid}.img "
                f"here (regions {theirs} vs {ours})"
            )
        return client

    def _task_done(self, outcome: TreeOutcome) -> None:
        self._outcomes[outcome.root] = outcome
        if len(self._outcomes) == len(self._roots):
            self._done.set()

    async def _wait_all(self) -> None:
        if self._roots and len(self._outcomes) < len(self._roots):
            await self._done.wait()

    async def _kill_all(self, reason: str) -> None:
        """Kill every task handed over so far (they would read zeros without us)."""
        self._kill_started(reason)
        await self._wait_all()

    def _kill_started(self, reason: str) -> None:
        for root, restore in self._roots.items():
            if root not in self._outcomes:
                _log.error("killing task", proc=root, pid=restore.pid, reason=reason)
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(restore.pidfd, signal.SIGKILL)

    def _result(self) -> CriuResult:
        failed = [o for o in self._outcomes.values() if o.failure is not None]
        if failed:
            return CriuResult(EXIT_FAILED, "; ".join(f"{o.root}: {o.failure}" for o in failed))
        exited = [str(o.root) for o in self._outcomes.values() if _exited_early(o)]
        if exited:
            return CriuResult(
                EXIT_TASK_EXITED, f"exited before fully resident: {', '.join(exited)}"
            )
        return CriuResult(EXIT_RESIDENT)


def _sender(pid: int, of_pid: Credentials | None, of_uffd: Credentials | None) -> int:
    """The pid (uffdd's namespace) of the process that sent task ``pid``'s pid and uffd:
    both messages must come from one process uffdd's pid namespace can see."""
    if of_pid is None or of_uffd is None:
        raise CriuProtocolError(
            f"task {pid}: a message without the sender's credentials (SCM_CREDENTIALS; "
            "a sender outside uffdd's pid namespace has none): its process cannot be proven"
        )
    if of_pid.pid != of_uffd.pid:
        raise CriuProtocolError(
            f"task {pid}: its pid came from process {of_pid.pid}, its uffd from {of_uffd.pid}"
        )
    return of_uffd.pid


def _exited_early(outcome: TreeOutcome) -> bool:
    """The task exited while data it maps was still missing (a task that verified
    everything and then exited was fully served: that is a success)."""
    if not outcome.exited:
        return False
    root = [s for s in outcome.processes if s.proc == outcome.root]
    return not root or root[0].bytes_missing > 0


def bind_lazy_pages_socket(work_dir: Path) -> socket.socket:
    """``<work_dir>/lazy-pages.socket``, listening (a stale file is replaced)."""
    path = work_dir / LAZY_PAGES_SOCKET
    work_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        pass_credentials(sock)  # before anyone connects: every message carries its sender
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def lazy_pages_once(
    daemon: Daemon, listener: socket.socket, images_dir: Path, page_server: str | None
) -> CriuResult:
    """``criu lazy-pages``: one connection, one restore, then stop the daemon."""
    try:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(listener)
        listener.close()
        return await CriuRestore(daemon, images_dir, page_server).run(conn)
    finally:
        listener.close()
        daemon.stop()


async def serve_criu_restores(
    daemon: Daemon,
    images_dir: Path,
    work_dir: Path | None = None,
    page_server: str | None = None,
    *,
    listener: socket.socket | None = None,
) -> None:
    """A daemon front door: every connection on ``<work_dir>/lazy-pages.socket`` is one
    CRIU restore of the dump in ``images_dir`` (served side by side, each to residency).

    ``listener``: that socket bound beforehand (``bind_lazy_pages_socket``), so it
    exists before the daemon runs (``criu restore`` may connect at once, and a bind error
    shows at start-up); it belongs to this door from the call on. None: bound here."""
    if listener is None:
        listener = bind_lazy_pages_socket(work_dir or images_dir)
    pass_credentials(listener)  # one bound elsewhere too: no message without its sender
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[CriuResult]] = set()
    try:
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(CriuRestore(daemon, images_dir, page_server).run(conn))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        for task in running:
            task.cancel()
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            ((work_dir or images_dir) / LAZY_PAGES_SOCKET).unlink()


def run_lazy_pages(config: LazyPagesConfig, resume: Door | None = None) -> CriuResult:
    """``uffdd lazy-pages`` (in place of ``criu lazy-pages``): serve one ``criu restore
    --lazy-pages`` on ``<work_dir>/lazy-pages.socket``, then return how it ended.

    With ``resume`` (the resume door), a ``uffdd lazy-pages`` started again in the
    same work directory after one died first takes back the restore that one served
    (its state directory is ``<work_dir>/uffdd-state`` unless set), serves it to the
    end and returns how that ended: ``criu restore`` does not connect twice."""
    return asyncio.run(_lazy_pages(config, resume))


async def _lazy_pages(config: LazyPagesConfig, resume: Door | None) -> CriuResult:
    target = config.daemon.page_server or None
    settings = config.daemon
    if not settings.state_dir:
        settings = replace(settings, state_dir=str(config.work_dir / "uffdd-state"))
    daemon = Daemon(settings)
    daemon.prepare()  # criu restore hands over as soon as the socket exists
    try:
        listener = bind_lazy_pages_socket(config.work_dir)
    except BaseException:
        daemon.abandon()
        raise
    _log.info("listening", socket=str(config.work_dir / LAZY_PAGES_SOCKET),
              images=str(config.images_dir), page_server=target)  # fmt: skip
    results: list[CriuResult] = []

    async def door(running: Daemon) -> None:
        if resume is not None:
            await running.resumed.wait()
        if running.resumed_trees:
            listener.close()
            await running.until_idle()
            failed = running.failures
            results.append(
                CriuResult(EXIT_FAILED, "; ".join(failed)) if failed else CriuResult(EXIT_RESIDENT)
            )
            running.stop()
            return
        results.append(await lazy_pages_once(running, listener, config.images_dir, target))

    try:
        await daemon.run([door] if resume is None else [resume, door])
    finally:
        listener.close()
        (config.work_dir / LAZY_PAGES_SOCKET).unlink(missing_ok=True)
    return results[0] if results else CriuResult(EXIT_FAILED, "stopped before criu restore ended")
