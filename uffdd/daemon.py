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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from uffdd import systemd
from uffdd.config import DaemonConfig
from uffdd.core.addresses import PAGE_SIZE
from uffdd.core.events import ProcId
from uffdd.core.handover import ErrorCode, HandoverRejected, ResidentSummary
from uffdd.core.policy import Policy
from uffdd.core.process import LazyRegion
from uffdd.errors import ImageError, PageServerError, PageServerNotFound
from uffdd.executor import Executor, TreeOutcome
from uffdd.image.format import ExtentLike, Region, stored_ranges
from uffdd.image.store import ImageNotFound, ImageStore
from uffdd.kernel.handover import Handover, HandoverPolicy, Listener, accept_handovers
from uffdd.kernel.memory import keep_freed_memory
from uffdd.kernel.sched import short_slice
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger
from uffdd.remote.client import PageClient
from uffdd.remote.tls import ClientTls
from uffdd.sources import LocalImageSource, PageSource

_log = get_logger("uffdd.daemon")


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


def regions_in_image(
    handover: Handover, image_id: str, image_regions: Sequence[Region]
) -> list[LazyRegion]:
    """The handover's regions as core values, each checked to lie inside one image
    region with the same page size (anything else would be served as zeros)."""
    lazy = []
    for region in handover.regions:
        start, end = region.image_address, region.image_address + region.length
        home = next(
            (r for r in image_regions if r.start <= start and end <= r.start + r.length), None
        )
        if home is None:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"image range [{start:#x}, {end:#x}) is not inside one region of image {image_id}",
            )
        if home.page_size != region.page_size:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"region at image {start:#x} has page size {region.page_size}, "
                f"the image has {home.page_size}",
            )
        lazy.append(
            LazyRegion(region.run_address, region.image_address, region.length, region.page_size)
        )
    return lazy


class Daemon:
    """The service: listener, executor, progress, watchdog, graceful stop."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.clients = _Clients(config)
        self._sessions: dict[ProcId, Restore] = {}
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._replies: set[asyncio.Task[None]] = set()
        self._executor: Executor | None = None
        self._store: ImageStore | None = None

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM and SIGINT do)."""
        self._stopping.set()

    async def run(
        self,
        listener: Listener | None = None,
        *,
        native: bool = True,
        listeners: Sequence[Callable[[Daemon], Coroutine[object, object, None]]] = (),
    ) -> None:
        """Serve until stopped; then drain within the grace period and return.

        ``native``: take native handovers (on ``listener``, a socket-activated fd, or
        the configured path). ``listeners``: more front doors (the CRIU and Firecracker
        dialects), each a coroutine run for the daemon's life and cancelled at stop.
        """
        loop = asyncio.get_running_loop()
        keep_freed_memory()  # receive buffers stay warm (see there)
        self._executor = Executor(
            Policy(
                fault_around=self.config.fault_around,
                bulk_max=self.config.bulk_max,
                max_in_flight=_power_of_two_at_most(self.config.max_inflight_bytes),
                urgent_deadline=self.config.fetch_deadline,
                bulk_deadline=max(self.config.fetch_deadline, 60.0),
                sweep=self.config.sweep,
            ),
            background_installs=self.config.install_thread,
            demand_lane=self.config.demand_lane,
        )
        # After the installer thread started (threads inherit it): the loop's thread
        # gets the CPU soon after a wake-up, the bulk copies keep the default slice.
        short_slice()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        doors: list[asyncio.Task[None]] = []
        if native:
            listener = listener or self._listen()
            policy = (
                HandoverPolicy()
                if self.config.allowed_uids is None
                else HandoverPolicy(allowed_uids=self.config.allowed_uids)
            )
            doors.append(
                loop.create_task(
                    accept_handovers(listener.sock, self.serve_handover, policy=policy)
                )
            )
            _log.info("listening", handover=str(listener.path), page_server=self.config.page_server)
        doors.extend(loop.create_task(door(self)) for door in listeners)
        ticking = loop.create_task(self._progress_loop())
        systemd.ready("waiting for handovers")
        try:
            await self._stopping.wait()
        finally:
            systemd.stopping(f"stopping: {len(self._sessions)} restore(s) in progress")
            for door_task in doors:
                door_task.cancel()
            for door_task in doors:
                with contextlib.suppress(asyncio.CancelledError):
                    await door_task
            if listener is not None:
                listener.close()
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
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            _log.info("stopped")

    def _listen(self) -> Listener:
        for passed in systemd.listen_fds():
            if passed.name in ("handover", "unknown"):
                return Listener.adopt(passed.fd)
        return Listener.bind(Path(self.config.handover), mode=self.config.handover_mode)

    async def _drain(self) -> None:
        """Let restores in progress finish within the grace period; kill the rest."""
        if self._sessions:
            _log.info("waiting for restores to finish", count=len(self._sessions))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.config.grace)
        assert self._executor is not None
        for root in self._executor.trees:
            self._executor.kill_tree(
                root, f"uffdd stopped: not resident after {self.config.grace:g} s grace"
            )

    # -- one handover --------------------------------------------------------------------

    async def serve_handover(self, handover: Handover) -> None:
        """Serve one native handover (what the native door calls for each; another
        door with its own listener policy may call it too)."""
        assert self._executor is not None
        if self._stopping.is_set():
            raise HandoverRejected(ErrorCode.REFUSED, "uffdd is shutting down")
        source, image_regions, extents, where = await self.find_image(handover)
        regions = regions_in_image(handover, handover.image_id, image_regions)
        data = stored_ranges(extents)
        self.start(
            Restore(
                name=f"p{handover.pid}-{handover.session_id[:6]}",
                pid=handover.pid,
                pidfd=handover.pidfd,
                uffd=handover.uffd,
                image_id=handover.image_id,
                regions=regions,
                data=data,
                source=source,
                reporter=handover.reply,
                close=handover.close,
            ),
            source=where,
            session=handover.session_id,
        )
        await handover.reply.send_ack()

    async def find_image(
        self, handover: Handover
    ) -> tuple[PageSource, Sequence[Region], Sequence[ExtentLike], str]:
        """Where the handover's image lives: the page server it names, else the local
        image root (``--images``), else the default page server. Returns the source,
        the image's regions and extents, and a label for the log."""
        image_id = handover.image_id
        target = handover.page_server or ("" if self.config.images else self.config.page_server)
        if target:
            client = self.clients.get(target)
            try:
                info = await client.image_info(image_id, timeout=self.config.fetch_deadline)
            except PageServerNotFound as exc:
                raise HandoverRejected(ErrorCode.BAD_REQUEST, str(exc)) from exc
            except PageServerError as exc:
                raise HandoverRejected(
                    ErrorCode.REFUSED, f"page server unavailable: {exc}"
                ) from exc
            return client, info.regions, info.extents, target
        if self.config.images:
            if self._store is None:
                self._store = ImageStore(Path(self.config.images))
            try:
                reader = self._store.open(image_id)
            except ImageNotFound as exc:
                raise HandoverRejected(ErrorCode.BAD_REQUEST, str(exc)) from exc
            except ImageError as exc:
                raise HandoverRejected(ErrorCode.REFUSED, f"image {image_id}: {exc}") from exc
            return LocalImageSource(reader), reader.regions, reader.all_extents(), "local"
        raise HandoverRejected(
            ErrorCode.BAD_REQUEST,
            "the handover names no page server and the daemon has neither a default "
            "(--page-server) nor local images (--images)",
        )

    def start(self, restore: Restore, **log_fields: object) -> ProcId:
        """Serve ``restore`` from now on; returns its process id in the tracker."""
        assert self._executor is not None, "the daemon is not running"
        root = ProcId(restore.name)
        if root in self._sessions:
            raise ValueError(f"a restore named {root!r} is being served already")
        self._sessions[root] = restore
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
        _log.info(
            "serving",
            proc=root,
            pid=restore.pid,
            image=restore.image_id,
            bytes=sum(r.length for r in restore.regions),
            **log_fields,
        )
        return root

    def handover_complete(self, root: ProcId) -> None:
        """The restorer is done handing over: start ``root``'s background sweep."""
        assert self._executor is not None, "the daemon is not running"
        self._executor.handover_complete(root)

    def _tree_done(self, outcome: TreeOutcome) -> None:
        restore = self._sessions.pop(outcome.root, None)
        if not self._sessions:
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
            for root, restore in list(self._sessions.items()):
                resident, total = self._executor.progress(root)
                await restore.reporter.send_progress(resident, total)
            systemd.status(f"serving {len(self._sessions)} restore(s)")


def _micros(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _power_of_two_at_most(value: int) -> int:
    return 1 << (value.bit_length() - 1)
