"""`uffdd daemon`: the long-running service that makes handed-over processes whole.

Why one asyncio loop (shared/DESIGN.md section 4): handover listeners, every uffd, the
gRPC channels, progress timers, signals and the systemd watchdog all wait on IO, and a
single loop orders them without locks. This module is the life cycle around the
``Executor`` (which serves processes): take handovers, look the image up on its page
server, check the regions against it, start serving, report progress and the outcome
to the restorer; on SIGTERM stop taking handovers, give what is being served a grace
period, then kill what is left rather than leave it reading wrong memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from uffdd import systemd
from uffdd.client.page_client import PageClient
from uffdd.config import DaemonConfig
from uffdd.core.addresses import PAGE_SIZE
from uffdd.core.events import ProcId, UffdEvent
from uffdd.core.handover import ResidentSummary
from uffdd.core.policy import Policy
from uffdd.core.process import LazyRegion
from uffdd.daemon.crash import crash_point
from uffdd.daemon.executor import Executor, TreeOutcome
from uffdd.daemon.sources import PageSource
from uffdd.image.store import ImageStore
from uffdd.keeper.journal import Generation, Record, StateDir
from uffdd.keeper.twin import Twin
from uffdd.kernel.memory import keep_freed_memory
from uffdd.kernel.proc import start_time
from uffdd.kernel.sched import short_slice
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger
from uffdd.wire.tls import ClientTls

_log = get_logger("uffdd.daemon.lifecycle")


Door = Callable[["Daemon"], Coroutine[object, object, None]]
"""A way restores come in (``doors/``): run for the daemon's life, cancelled at stop;
it calls :meth:`Daemon.start` for each restore it accepts."""


class Reporter(Protocol):
    """The line back to whoever handed a process over (the native handover's reply
    channel is one; a dialect without replies passes ``SilentReporter``)."""

    async def send_progress(self, resident_bytes: int, total_bytes: int) -> bool: ...
    async def send_resident(self, summary: ResidentSummary) -> bool: ...
    async def send_failed(self, reason: str) -> bool: ...


class SilentReporter:
    """For restorers that expect no reply (Firecracker, CRIU): the log says it all."""

    async def send_progress(self, resident_bytes: int, total_bytes: int) -> bool:
        return True

    async def send_resident(self, summary: ResidentSummary) -> bool:
        return True

    async def send_failed(self, reason: str) -> bool:
        return True


@dataclass(eq=False)
class Restore:
    """One process to serve, whatever protocol brought it (native, CRIU, Firecracker).

    The daemon owns it from :meth:`Daemon.start` on and calls ``close`` (which must
    release the uffd, the pidfd and the connection) once the tree ended: fully
    resident, exited, or killed because it could not be served.
    """

    name: str
    """Short label for logs and the process id (e.g. ``criu-1234``)."""
    pid: int
    pidfd: int
    uffd: Uffd
    image_id: str
    regions: list[LazyRegion]
    data: list[tuple[int, int]]
    """(image address, length) of the ranges holding data (everything else in the
    regions reads zeros): ``uffdd.image.format.stored_ranges`` of the image's extents."""
    source: PageSource
    reporter: Reporter
    close: Callable[[], None]
    handed_over: bool = True
    """False: hold the background sweep until :meth:`Daemon.handover_complete`."""
    on_done: Callable[[TreeOutcome], None] | None = None
    """Called after the daemon's own bookkeeping (a dialect that waits for its tasks)."""
    dialect: str = "native"
    origin: dict[str, str] = field(default_factory=dict)
    """Where its pages come from, for a daemon that resumes it: ``{"page_server":
    target}`` or ``{"images": root}``; empty: it cannot be resumed."""
    conn: int = -1
    """The restorer's connection, when the dialect has one (a resumed daemon reports
    there)."""
    handover_id: str = ""
    acked: bool = True
    """False until the door tells the daemon it acked (:meth:`Daemon.acknowledged`)."""


@dataclass
class _Clients:
    """One PageClient per page server target, made on first use."""

    config: DaemonConfig
    clients: dict[str, PageClient] = field(default_factory=dict)

    def get(self, target: str) -> PageClient:
        client = self.clients.get(target)
        if client is None:
            tls = None
            if self.config.tls_ca or self.config.tls_cert:
                tls = ClientTls(
                    ca=Path(self.config.tls_ca) if self.config.tls_ca else None,
                    cert=Path(self.config.tls_cert) if self.config.tls_cert else None,
                    key=Path(self.config.tls_key) if self.config.tls_key else None,
                )
            client = PageClient(target, tls=tls, deadline=self.config.fetch_deadline)
            self.clients[target] = client
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a door gives back for a restore of its own a resuming daemon takes over: the
    page source, the uffd the executor reads (the door may keep another copy), what
    closes everything, and what runs when the tree ends."""

    source: PageSource
    uffd: Uffd
    close: Callable[[], None]
    on_done: Callable[[TreeOutcome], None] | None = None


Resumer = Callable[[Record, Uffd], Coroutine[object, object, Resumed]]
"""A door's way to take back one of its restores (``Daemon.resumers``)."""


class Daemon:
    """The service: listener, executor, progress, watchdog, graceful stop."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.clients = _Clients(config)
        self._restores: dict[ProcId, Restore] = {}
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._replies: set[asyncio.Task[None]] = set()
        self._executor: Executor | None = None
        self._store: ImageStore | None = None
        self.state = StateDir(Path(config.state_dir or Path(config.handover).parent / "state"))
        self.resumers: dict[str, Resumer] = {}
        """Doors whose restores need more than a page source to resume, by the key their
        records' ``source`` names (``"firecracker:<socket>"``)."""
        self.resumed = asyncio.Event()
        """Set once the resume door has taken back what an earlier daemon left."""
        self.resumed_trees = 0
        self.failures: list[str] = []
        """Why each tree that failed failed (the one-restore dialects report them)."""
        self.passed = systemd.listen_fds()
        """What systemd passed at start: the handover socket and the fd store's entries
        (each side takes its own by name)."""
        self.journal: Generation | None = None
        self._twin: Twin | None = None

    def prepare(self) -> None:
        """The journal and the twin, before any socket a restore can come in on is
        bound (a uffd may arrive in its queue at once): from here on no uffd this
        daemon holds dies with it. The twin comes first while the daemon is small (it
        keeps a copy-on-write image of it). :meth:`run` calls it if nobody did; one
        that prepared and then does not run must :meth:`abandon`."""
        if self.journal is not None:
            return
        self.journal = self.state.new_generation(fd_store=systemd.under_systemd())
        self._twin = Twin(
            self.state.path, self.journal.name, self.config.resume_deadline, self.config.log_format
        )
        self.journal.twin_started(self._twin.pid)

    def abandon(self) -> None:
        """Undo :meth:`prepare` for a daemon that will not run (its start failed)."""
        if self._twin is not None:
            self._twin.close()
            self._twin = None
        if self.journal is not None:
            self.journal.discard()
            self.journal = None

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM and SIGINT do)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """A stop began: doors refuse new restores."""
        return self._stopping.is_set()

    def image_store(self) -> ImageStore:
        """The local image root (``--images``), opened on first use."""
        if self._store is None:
            self._store = ImageStore(Path(self.config.images))
        return self._store

    async def run(self, doors: Sequence[Door] = ()) -> None:
        """Serve until stopped; then drain within the grace period and return.

        ``doors``: the ways restores come in (``doors/``: native handovers, CRIU,
        Firecracker), each a coroutine run for the daemon's life and cancelled at stop.
        """
        loop = asyncio.get_running_loop()
        self.prepare()
        assert self._twin is not None
        loop.add_reader(self._twin.pidfd, self._twin_died)
        keep_freed_memory()  # receive buffers stay warm (see there)
        self._executor = Executor(
            Policy(
                fault_around=self.config.fault_around,
                bulk_max=self.config.bulk_max,
                max_in_flight=_power_of_two_at_most(self.config.max_inflight_bytes),
                urgent_deadline=self.config.fetch_deadline,
                bulk_deadline=max(self.config.fetch_deadline, 60.0),
                sweep=self.config.engine.sweep,
            ),
            background_installs=self.config.engine.install_thread,
            demand_lane=self.config.engine.demand_lane,
            journal=self.journal,
        )
        # After the installer thread started (threads inherit it): the loop's thread
        # gets the CPU soon after a wake-up, the bulk copies keep the default slice.
        short_slice()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        running = [loop.create_task(door(self)) for door in doors]
        ticking = loop.create_task(self._progress_loop())
        systemd.ready("waiting for handovers")
        try:
            await self._stopping.wait()
        finally:
            systemd.stopping(f"stopping: {len(self._restores)} restore(s) in progress")
            for door_task in running:
                door_task.cancel()
            for door_task in running:
                with contextlib.suppress(asyncio.CancelledError):
                    await door_task
            await self._drain()
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
            if self._replies:
                await asyncio.gather(*self._replies, return_exceptions=True)
            self._executor.close()
            await self.clients.close()
            if self._store is not None:
                self._store.close()
            loop.remove_reader(self._twin.pidfd)
            self.abandon()  # every restore ended: the twin and the journal go
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            _log.info("stopped")

    async def _drain(self) -> None:
        """Let restores in progress finish within the grace period; kill the rest."""
        if self._restores:
            crash_point("grace")
            _log.info("waiting for restores to finish", count=len(self._restores))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.config.grace)
        assert self._executor is not None
        for root in self._executor.trees:
            self._executor.kill_tree(
                root, f"uffdd stopped: not resident after {self.config.grace:g} s grace"
            )

    def start(self, restore: Restore, **log_fields: object) -> ProcId:
        """Serve ``restore`` from now on; returns its process id in the tracker."""
        assert self._executor is not None, "the daemon is not running"
        root = ProcId(restore.name)
        if root in self._restores:
            raise ValueError(f"a restore named {root!r} is being served already")
        self._restores[root] = restore
        self._idle.clear()
        self._executor.add_tree(
            root,
            uffd=restore.uffd,
            pid=restore.pid,
            pidfd=restore.pidfd,
            source=restore.source,
            image_id=restore.image_id,
            regions=restore.regions,
            data=restore.data,
            on_done=self._tree_done,
            handed_over=restore.handed_over,
        )
        self._journal_root(restore, root)
        _log.info(
            "serving",
            proc=root,
            pid=restore.pid,
            image=restore.image_id,
            bytes=sum(r.length for r in restore.regions),
            **log_fields,
        )
        return root

    def _journal_root(self, restore: Restore, root: ProcId) -> None:
        assert self.journal is not None
        assert self._executor is not None
        if root not in self._executor.trees:
            return  # it could not even be watched (and was killed)
        self.journal.add(
            Record(
                proc=str(root),
                root=str(root),
                parent=None,
                dialect=restore.dialect,
                image_id=restore.image_id,
                checkpoint=self._executor.checkpoint(root),
                uffd=restore.uffd.fd,
                pidfd=restore.pidfd,
                conn=restore.conn,
                pid=restore.pid,
                source=restore.origin,
                data=tuple(restore.data),
                handover_id=restore.handover_id,
                acked=restore.acked,
                started=start_time(restore.pid),
            )
        )

    def acknowledged(self, root: ProcId) -> None:
        """The restorer of ``root`` has its Ack (a daemon that resumes it sends none)."""
        assert self.journal is not None
        record = self.journal.read(str(root))
        if record is not None:
            self.journal.write(replace(record, acked=True))

    def resume(
        self,
        restore: Restore,
        root: Record,
        members: list[tuple[Record, Uffd]],
        replay: dict[ProcId, list[UffdEvent]],
    ) -> None:
        """Serve again a tree a daemon that died was serving (``daemon/resume.py``),
        applying first the layout events in ``replay`` its journal did not include."""
        assert self._executor is not None
        assert self.journal is not None
        name = ProcId(root.proc)
        self._restores[name] = restore
        self._idle.clear()
        for record, uffd in members:
            self.journal.add(
                replace(record, uffd=uffd.fd)
                if record.proc != root.proc
                else replace(
                    record, uffd=uffd.fd, pidfd=restore.pidfd, conn=restore.conn, acked=True
                )
            )
        self._executor.resume_tree(
            root, members, replay, source=restore.source, on_done=self._tree_done
        )
        self.resumed_trees += 1
        _log.info("resumed", proc=name, pid=root.pid, processes=len(members))

    async def until_idle(self) -> None:
        """Until no restore is being served."""
        await self._idle.wait()

    def _twin_died(self) -> None:
        """The keeper twin died (the OOM killer?): start another at once."""
        assert self._twin is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._twin.pidfd)
        self._twin.reap()
        _log.error("the keeper twin died; starting another")
        self._twin.spawn()
        assert self.journal is not None
        self.journal.twin_started(self._twin.pid)
        loop.add_reader(self._twin.pidfd, self._twin_died)

    def handover_complete(self, root: ProcId) -> None:
        """The restorer is done handing over: start ``root``'s background sweep."""
        assert self._executor is not None, "the daemon is not running"
        self._executor.handover_complete(root)

    def _tree_done(self, outcome: TreeOutcome) -> None:
        restore = self._restores.pop(outcome.root, None)
        if not self._restores:
            self._idle.set()
        if outcome.exited:
            _log.info(
                "restore ended: the process exited before it was fully resident",
                proc=outcome.root,
                processes=len(outcome.processes),
                bytes=outcome.bytes_resident,
                faults=outcome.faults,
                seconds=round(outcome.seconds, 3),
            )
        elif outcome.failure is None:
            _log.info(
                "fully resident",
                proc=outcome.root,
                processes=len(outcome.processes),
                bytes=outcome.bytes_resident,
                faults=outcome.faults,
                thread_installs=outcome.thread_installs,
                fault_p50_us=_micros(outcome.fault_p50),
                fault_p99_us=_micros(outcome.fault_p99),
                seconds=round(outcome.seconds, 3),
            )
        else:
            _log.error("restore failed", proc=outcome.root, reason=outcome.failure)
            self.failures.append(f"{outcome.root}: {outcome.failure}")
        if restore is not None:
            task = asyncio.get_running_loop().create_task(self._report(restore, outcome))
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)
            if restore.on_done is not None:
                restore.on_done(outcome)

    async def _report(self, restore: Restore, outcome: TreeOutcome) -> None:
        try:
            if outcome.exited:
                await restore.reporter.send_failed("the restored process exited")
            elif outcome.failure is None:
                await restore.reporter.send_resident(
                    ResidentSummary(
                        pages=outcome.bytes_resident // PAGE_SIZE,
                        bytes=outcome.bytes_resident,
                        faults=outcome.faults,
                        fault_p50_us=_micros(outcome.fault_p50) or 0.0,
                        fault_p99_us=_micros(outcome.fault_p99) or 0.0,
                        seconds_to_resident=outcome.seconds,
                    )
                )
            else:
                await restore.reporter.send_failed(outcome.failure)
        finally:
            restore.close()

    async def _progress_loop(self) -> None:
        interval = self.config.progress_interval
        watchdog = systemd.watchdog_interval()
        if watchdog is not None:
            interval = min(interval, watchdog)
        while True:
            await asyncio.sleep(interval)
            systemd.watchdog_ping()
            assert self._executor is not None
            for root, restore in list(self._restores.items()):
                resident, total = self._executor.progress(root)
                await restore.reporter.send_progress(resident, total)
            systemd.status(f"serving {len(self._restores)} restore(s)")


def _micros(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _power_of_two_at_most(value: int) -> int:
    return 1 << (value.bit_length() - 1)
