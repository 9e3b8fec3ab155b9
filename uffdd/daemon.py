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
from dataclasses import dataclass, field
from pathlib import Path

from uffdd import systemd
from uffdd.config import DaemonConfig
from uffdd.core.addresses import PAGE_SIZE
from uffdd.core.events import ProcId
from uffdd.core.handover import ErrorCode, HandoverRejected, ResidentSummary
from uffdd.core.policy import Policy
from uffdd.core.process import LazyRegion
from uffdd.errors import PageServerError, PageServerNotFound
from uffdd.executor import Executor, TreeOutcome
from uffdd.image.format import ExtentKind
from uffdd.kernel.handover import Handover, HandoverPolicy, Listener, accept_handovers
from uffdd.log import get_logger
from uffdd.remote.client import PageClient
from uffdd.remote.convert import ImageInfo
from uffdd.remote.tls import ClientTls

_log = get_logger("uffdd.daemon")


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


def regions_in_image(handover: Handover, info: ImageInfo) -> list[LazyRegion]:
    """The handover's regions as core values, each checked to lie inside one image
    region with the same page size (anything else would be served as zeros)."""
    lazy = []
    for region in handover.regions:
        start, end = region.image_address, region.image_address + region.length
        home = next(
            (r for r in info.regions if r.start <= start and end <= r.start + r.length), None
        )
        if home is None:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"image range [{start:#x}, {end:#x}) is not inside one region of image "
                f"{info.image_id}",
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
        self._clients = _Clients(config)
        self._sessions: dict[ProcId, Handover] = {}
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._replies: set[asyncio.Task[None]] = set()
        self._executor: Executor | None = None

    def stop(self) -> None:
        """Begin a graceful stop (what SIGTERM and SIGINT do)."""
        self._stopping.set()

    async def run(self, listener: Listener | None = None) -> None:
        """Serve until stopped; then drain within the grace period and return."""
        loop = asyncio.get_running_loop()
        self._executor = Executor(
            Policy(
                max_in_flight=_power_of_two_at_most(self.config.max_inflight_bytes),
                urgent_deadline=self.config.fetch_deadline,
                bulk_deadline=max(self.config.fetch_deadline, 60.0),
            )
        )
        listener = listener or self._listen()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        policy = (
            HandoverPolicy()
            if self.config.allowed_uids is None
            else HandoverPolicy(allowed_uids=self.config.allowed_uids)
        )
        accepting = loop.create_task(
            accept_handovers(listener.sock, self._on_handover, policy=policy)
        )
        ticking = loop.create_task(self._progress_loop())
        _log.info("listening", handover=str(listener.path), page_server=self.config.page_server)
        systemd.ready("waiting for handovers")
        try:
            await self._stopping.wait()
        finally:
            systemd.stopping(f"stopping: {len(self._sessions)} restore(s) in progress")
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
            listener.close()
            await self._drain()
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
            if self._replies:
                await asyncio.gather(*self._replies, return_exceptions=True)
            self._executor.close()
            await self._clients.close()
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

    async def _on_handover(self, handover: Handover) -> None:
        assert self._executor is not None
        if self._stopping.is_set():
            raise HandoverRejected(ErrorCode.REFUSED, "uffdd is shutting down")
        target = handover.page_server or self.config.page_server
        if not target:
            raise HandoverRejected(
                ErrorCode.BAD_REQUEST,
                "the handover names no page server and the daemon has no default "
                "(uffdd daemon --page-server)",
            )
        client = self._clients.get(target)
        try:
            info = await client.image_info(handover.image_id, timeout=self.config.fetch_deadline)
        except PageServerNotFound as exc:
            raise HandoverRejected(ErrorCode.BAD_REQUEST, str(exc)) from exc
        except PageServerError as exc:
            raise HandoverRejected(ErrorCode.REFUSED, f"page server unavailable: {exc}") from exc
        regions = regions_in_image(handover, info)
        data = [
            (int(e.start), e.start + e.length) for e in info.extents if e.kind is ExtentKind.DATA
        ]
        root = ProcId(f"p{handover.pid}-{handover.session_id[:6]}")
        self._sessions[root] = handover
        self._idle.clear()
        self._executor.add_tree(
            root,
            uffd=handover.uffd,
            pid=handover.pid,
            pidfd=handover.pidfd,
            client=client,
            image_id=handover.image_id,
            regions=regions,
            data=data,
            on_done=self._tree_done,
        )
        _log.info(
            "serving",
            proc=root,
            pid=handover.pid,
            image=handover.image_id,
            page_server=target,
            bytes=sum(r.length for r in regions),
            session=handover.session_id,
        )
        await handover.reply.send_ack()

    def _tree_done(self, outcome: TreeOutcome) -> None:
        handover = self._sessions.pop(outcome.root, None)
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
                fault_p50_us=_micros(outcome.fault_p50),
                fault_p99_us=_micros(outcome.fault_p99),
                seconds=round(outcome.seconds, 3),
            )
        else:
            _log.error("restore failed", proc=outcome.root, reason=outcome.failure)
        if handover is not None:
            task = asyncio.get_running_loop().create_task(self._report(handover, outcome))
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)

    async def _report(self, handover: Handover, outcome: TreeOutcome) -> None:
        try:
            if outcome.exited:
                await handover.reply.send_failed("the restored process exited")
            elif outcome.failure is None:
                await handover.reply.send_resident(
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
                await handover.reply.send_failed(outcome.failure)
        finally:
            handover.close()

    async def _progress_loop(self) -> None:
        interval = self.config.progress_interval
        watchdog = systemd.watchdog_interval()
        if watchdog is not None:
            interval = min(interval, watchdog)
        while True:
            await asyncio.sleep(interval)
            systemd.watchdog_ping()
            assert self._executor is not None
            for root, handover in list(self._sessions.items()):
                resident, total = self._executor.progress(root)
                await handover.reply.send_progress(resident, total)
            systemd.status(f"serving {len(self._sessions)} restore(s)")


def _micros(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _power_of_two_at_most(value: int) -> int:
    return 1 << (value.bit_length() - 1)
