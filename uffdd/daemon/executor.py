"""The shell around the core: read uffds, run the core's actions, feed outcomes back.

Why here and not in the core: this is where IO happens (ioctls on userfaultfds, page
requests over gRPC, pidfd signals), all on the one asyncio loop; every decision is the
core's (``Tracker.handle*`` -> actions). The loop of one uffd is: read until empty
(many messages per read), stamp the batch with the time of the read, hand it to the
core in order, execute the actions in order, and hand each install's outcome straight
back before anything else of that process is read, as ``core/actions.py`` requires.

Page data is never copied in Python: a chunk arrives as a view into the received gRPC
message, travels through the core untouched inside ``PagesArrived``/``Copy``, and goes
to ``UFFDIO_COPY`` with ``ffi.from_buffer``.

Who reads each uffd (the loop, with the C fast serve first when the image is local, or
a demand thread) is ``routes.py``'s. Large background copies go to the installer thread
(``native/installer.py``), so a demand fault is read and answered while a megabyte of
background data goes in. Here the fence keeps those copies behind every layout event:
``_readable`` fences on the read, ``fenced_batch`` ends and reports every copy of the
process before the core sees the batch, ``_install`` answers RETRY meanwhile.
docs/architecture.md, sections 5 and 6, has the whole model and why it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uffdd.client.page_client import Chunk
from uffdd.core.actions import (
    Action,
    AdoptChild,
    CancelFetch,
    Copy,
    Delegate,
    Expedite,
    Fetch,
    Kill,
    Priority,
    Release,
    Wake,
    ZeroFill,
)
from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr
from uffdd.core.errors import PageServerError, UffdOpError
from uffdd.core.events import (
    BatchHeld,
    EventsDrained,
    Exited,
    FastServed,
    FetchFailed,
    Fork,
    HandoverComplete,
    InstallOutcome,
    InstallResult,
    PageFault,
    PagesArrived,
    ProcId,
    ShellEvent,
    Tick,
    UffdEvent,
)
from uffdd.core.outcomes import OpResult
from uffdd.core.policy import Policy
from uffdd.core.process import Checkpoint, LazyRegion
from uffdd.core.stats import LatencyHistogram, ProcessSummary
from uffdd.core.tracker import Tracker
from uffdd.core.wire import decode_messages
from uffdd.daemon.crash import crash_point
from uffdd.daemon.routes import DemandRoute, LocalRoute
from uffdd.daemon.sources import FetchHandle, LocalData, PageSource, local_data_of
from uffdd.keeper.journal import SLOT_SIZE, Generation, Record
from uffdd.kernel.proc import kill_tree, resident_spans
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger
from uffdd.native._ffi import ffi
from uffdd.native.fast_serve import FastStatus, FastTable
from uffdd.native.installer import Installer

_log = get_logger("uffdd.daemon.executor")

_READ_BATCH = 64
_TICK_MIN_DELAY = 0.001
_TICK_SLACK = 0.001
"""A timer armed within this of the core's next wakeup is kept: a Tick up to 1 ms early
finds nothing due and asks again, and the core's deadlines are seconds."""


@dataclass(frozen=True, slots=True)
class TreeOutcome:
    """How a restore tree ended, with a summary: fully resident (``failure`` None and not
    ``exited``), the restored process exited first (``exited``), or killed (``failure``)."""

    root: ProcId
    failure: str | None
    exited: bool
    processes: tuple[ProcessSummary, ...]
    faults: int
    fault_p50: float | None
    fault_p99: float | None
    bytes_resident: int
    seconds: float
    thread_installs: int = 0
    """Copies the installer thread ran for this tree."""


@dataclass(eq=False)
class _Tree:
    """One handed-over restore: the root process and everything it forks."""

    root: ProcId
    pid: int
    pidfd: int
    source: PageSource
    started: float
    on_done: Callable[[TreeOutcome], None]
    members: set[ProcId] = field(default_factory=set)
    failure: str | None = None
    root_exited: bool = False
    """The restored process itself exited before it was fully resident."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    summaries: list[ProcessSummary] = field(default_factory=list)
    local: LocalData | None = None
    """The image in place, when the source has it locally (the C fast path serves)."""
    thread_installs: int = 0


class Executor:
    """Serves every lazy process of the daemon on the running loop."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        background_installs: bool = True,
        demand_lane: bool = True,
        journal: Generation | None = None,
    ) -> None:
        self.tracker = Tracker(policy)
        self.journal = journal
        """Where every process's layout is written down before it matters (a restarted
        daemon resumes from it); None: nothing outlives this daemon."""
        self._journal_c: Any = None
        """The journal's mapping as C sees it (released at :meth:`close`)."""
        if journal is not None:
            self._journal_c = ffi.from_buffer("uint8_t[]", journal.mapping, require_writable=True)
        self._deadlines = {
            Priority.URGENT: self.tracker.policy.urgent_deadline,
            Priority.BULK: self.tracker.policy.bulk_deadline,
        }
        self._loop = asyncio.get_running_loop()
        self._uffds: dict[ProcId, Uffd] = {}
        self._tree_of: dict[ProcId, _Tree] = {}
        self._trees: dict[ProcId, _Tree] = {}
        self._requests: dict[int, FetchHandle] = {}
        self._queue: deque[Action] = deque()
        self._running = False
        self._tick: asyncio.TimerHandle | None = None
        self._installer = Installer() if background_installs else None
        policy = self.tracker.policy
        self._local = LocalRoute(policy.fault_plan(round_trip=False))
        self._demand = (
            DemandRoute(
                self,
                self._loop,
                self._installer,
                policy.fault_plan(round_trip=True),
                journal=journal,
                journal_c=self._journal_c,
            )
            if demand_lane and self._installer is not None  # its safety needs the fence
            else None
        )
        self._background: dict[int, tuple[ProcId, int]] = {}
        """Installer job -> (process, install id) of the Copy it runs."""
        self._fenced: set[ProcId] = set()
        """Processes whose layout event was read and not yet handed to the core."""
        if self._installer is not None:
            self._loop.add_reader(self._installer.fd, self._take_completions)

    # -- what the daemon calls ---------------------------------------------------------

    def add_tree(
        self,
        root: ProcId,
        *,
        uffd: Uffd,
        pid: int,
        pidfd: int,
        source: PageSource,
        image_id: str,
        regions: list[LazyRegion],
        data: list[tuple[int, int]],
        on_done: Callable[[TreeOutcome], None],
        handed_over: bool = True,
    ) -> None:
        """Start serving a handed-over process (its uffd stays owned by the caller,
        which closes it once ``on_done`` ran). ``handed_over`` False: demand faults are
        served at once, the background sweep waits for :meth:`handover_complete` (CRIU
        sends its restore-finished marker after the last task)."""
        now = time.monotonic()
        tree = _Tree(root, pid, pidfd, source, now, on_done)
        local = local_data_of(source)
        if local is not None and local.image_id == image_id:
            tree.local = local
        try:
            self._watch(root, uffd, tree)
        except OSError as exc:  # nothing was read: it cannot be served, so it is killed
            kill_tree(pid, pidfd)
            failure = f"{root}: cannot watch its uffd: {exc}"
            on_done(TreeOutcome(root, failure, False, (), 0, None, None, 0, seconds=0.0))
            return
        self._trees[root] = tree
        if pidfd >= 0:
            self._loop.add_reader(pidfd, self._root_exited, root)
        self.run(
            self.tracker.add_process(root, image_id, regions, data, now, handed_over=handed_over)
        )

    def resume_tree(
        self,
        root: Record,
        members: list[tuple[Record, Uffd]],
        replay: dict[ProcId, list[UffdEvent]],
        *,
        source: PageSource,
        on_done: Callable[[TreeOutcome], None],
    ) -> None:
        """Serve again a tree a daemon that died was serving: ``members`` (the root
        first, then each fork child after its parent) with the uffds taken back from the
        keeper. The layout events in ``replay`` (read by the dead daemon, not yet in its
        journal) are applied first, as if just read. Every thread blocked on a fault the
        dead daemon read is woken, so it faults again and this daemon reads it."""
        now = time.monotonic()
        proc_root = ProcId(root.proc)
        tree = _Tree(proc_root, root.pid, root.pidfd, source, now, on_done)
        local = local_data_of(source)
        if local is not None and local.image_id == root.image_id:
            tree.local = local
        self._trees[proc_root] = tree
        if root.pidfd >= 0:
            self._loop.add_reader(root.pidfd, self._root_exited, proc_root)
        for record, uffd in members:
            proc = ProcId(record.proc)
            try:
                self._watch(proc, uffd, tree)
            except OSError as exc:
                uffd.close()
                self.kill_tree(proc_root, f"{proc}: cannot watch its uffd: {exc}")
                return
            parent = ProcId(record.parent) if record.parent else None
            # What the root has is read from its page table (a fork child's pid is not
            # known: its pages present are found by EEXIST instead).
            resident = (
                resident_spans(
                    root.pid,
                    root.pidfd,
                    [(p.run, p.run + p.length) for p in record.checkpoint.pieces],
                )
                if record.proc == root.proc
                else []
            )
            self.run(
                self.tracker.resume_process(
                    proc,
                    record.image_id,
                    record.checkpoint,
                    now,
                    root=proc_root,
                    parent=parent,
                    resident=resident,
                )
            )
        for proc, events in replay.items():
            if proc in self._uffds:
                _log.info(
                    "replaying held layout events",
                    proc=proc,
                    events=len(events),
                    forks=sum(isinstance(e, Fork) for e in events),
                )
                self.run(self.hand_batch(proc, list(events), now))
        for record, uffd in members:
            for piece in record.checkpoint.pieces:
                if not uffd.closed:
                    uffd.wake(piece.run, piece.length)

    def handover_complete(self, root: ProcId) -> None:
        """The restorer finished the whole restore: start the background sweep."""
        if root in self._trees:
            self.handle(HandoverComplete(root))

    def progress(self, root: ProcId) -> tuple[int, int]:
        """(resident bytes, total bytes) of a tree."""
        progress = self.tracker.progress(root)
        return progress.bytes_resident, progress.bytes_total

    def demand_served(self) -> list[ProcId]:
        """Processes whose uffd a demand thread reads (``routes.DemandRoute``)."""
        return [] if self._demand is None else self._demand.served()

    @property
    def trees(self) -> list[ProcId]:
        return list(self._trees)

    def kill_tree(self, root: ProcId, reason: str) -> None:
        """Kill a whole restore tree (never leave it reading zeros) and end it."""
        tree = self._trees.get(root)
        if tree is None:
            return
        self.run(self.tracker.kill_tree(root, reason, time.monotonic()))
        self._end_tree(tree, failure=reason)

    # -- reading uffds -----------------------------------------------------------------

    def _watch(self, proc: ProcId, uffd: Uffd, tree: _Tree) -> None:
        """Read ``proc``'s uffd from now on. OSError (out of memory for its row in the
        fence table) before anything changed."""
        if self._installer is not None:
            self._installer.watch(uffd)
        self._uffds[proc] = uffd
        self._tree_of[proc] = tree
        tree.members.add(proc)
        self._loop.add_reader(uffd.fd, self._readable, proc)

    def _readable(self, proc: ProcId) -> None:
        uffd = self._uffds.get(proc)
        if uffd is None:
            return
        now = time.monotonic()
        events: list[UffdEvent | FastServed] = []
        error = 0
        tree = self._tree_of[proc]
        table = None
        if tree.local is not None:
            table = self._local.table(self.tracker.process(proc), tree.local)
        with self._reading() as fence:
            if table is not None:
                drained, error = self._serve_fast(proc, uffd, table, events)
                now = time.monotonic()  # the rest was read just now, at the end of it
            else:
                drained = False
            layout = any(not isinstance(e, PageFault | FastServed) for e in events)
            while not drained and not layout and (batch := self._read(uffd)):
                read = decode_messages(batch)
                events.extend(read)
                # A batch with a layout event stays in the journal's slot until journaled:
                # no read may overwrite it, so the rest is read on the next turn.
                layout = any(not isinstance(e, PageFault) for e in read)
                if self.journal is not None:
                    self.journal.settle(uffd.fd, len(read), layout)
            if layout and fence is not None:
                fence(uffd)
        fd = uffd.fd
        if layout and self._installer is not None:
            actions = self.fenced_batch(proc, uffd, events, now)
        else:
            actions = self.hand_batch(proc, events, now) if events else []
        if layout:
            self._mark(fd, 0)  # what it read is journaled (hand_batch)
        self.run(actions)
        if error:
            raise UffdOpError("read", error)
        # Everything queued has been read: installs that met EAGAIN may go again.
        if proc in self._uffds:
            self.handle(EventsDrained(proc))
            self._hand_to_demander(proc)

    def _reading(self) -> contextlib.AbstractContextManager[Callable[[Uffd], None] | None]:
        if self._installer is None:
            return contextlib.nullcontext()
        return self._installer.reading()

    def fenced_batch(
        self, proc: ProcId, uffd: Uffd, events: list[UffdEvent | FastServed], now: float
    ) -> list[Action]:
        """The core's actions for a batch with a layout event, read with ``uffd`` fenced:
        first every background copy of the process ends and reports back."""
        assert self._installer is not None
        self._fenced.add(proc)
        self.handle(BatchHeld(proc))  # its outcomes must not release it before the batch
        try:
            self._installer.quiesce(uffd)
            self._take_completions()
            actions = self.hand_batch(proc, events, now)
            self._mark(uffd.fd, 0)  # (a demand thread's read: the layout is journaled)
            return actions
        finally:
            self._fenced.discard(proc)
            if not uffd.closed:  # (an outcome may have ended the process: fd closed)
                self._installer.unfence(uffd)

    def hand_batch(
        self, proc: ProcId, events: list[UffdEvent | FastServed], now: float
    ) -> list[Action]:
        """The core's actions for a batch read from ``proc``'s uffd. A FORK's new uffd
        that the core does not adopt (the process ended first) is closed here."""
        actions = self.tracker.handle_uffd(proc, events, now)
        if self.journal is not None and any(
            not isinstance(e, PageFault | FastServed) for e in events
        ):
            self._journal_layout(proc, events, actions)
        adopted = {a.child_fd for a in actions if isinstance(a, AdoptChild)}
        for event in events:
            if isinstance(event, Fork) and event.child_fd not in adopted:
                _log.info("fork of an ended process: its uffd is closed", proc=proc)
                os.close(event.child_fd)
        return actions

    def _journal_layout(
        self, proc: ProcId, events: list[UffdEvent | FastServed], actions: list[Action]
    ) -> None:
        """Write down what a layout batch changed (each new fork child, then the
        process's own layout) before the read's mark is cleared."""
        assert self.journal is not None
        crash_point("fork-read" if any(isinstance(e, Fork) for e in events) else "layout-read")
        tree = self._tree_of.get(proc)
        if tree is None:
            return
        for action in actions:
            if isinstance(action, AdoptChild):
                child = self.tracker.process(action.child)
                self.journal.add(
                    Record(
                        proc=str(action.child),
                        root=str(tree.root),
                        parent=str(proc),
                        dialect="",
                        image_id=child.image_id,
                        checkpoint=child.checkpoint(),
                        uffd=action.child_fd,
                    )
                )
        if proc in self.tracker.processes():
            self.journal.checkpoint(str(proc), self.tracker.process(proc).checkpoint())

    def checkpoint(self, proc: ProcId) -> Checkpoint:
        """What a resuming daemon needs of ``proc`` now."""
        return self.tracker.process(proc).checkpoint()

    def _journal_pointers(self, fd: int) -> tuple[Any, Any] | None:
        """The journal's mark and slot of ``fd`` as C pointers, for a C reader."""
        journal = self.journal
        if self._journal_c is None or journal is None or not 0 <= fd < journal.mark_slots:
            return None
        return self._journal_c + fd, self._journal_c + journal.mark_slots + fd * SLOT_SIZE

    def _mark(self, fd: int, value: int) -> None:
        if self.journal is not None:
            self.journal.mark(fd, value)

    def _hand_to_demander(self, proc: ProcId) -> None:
        """A remote process's uffd goes to a demand thread once its lane is up."""
        tree = self._tree_of.get(proc)
        uffd = self._uffds.get(proc)
        if self._demand is None or tree is None or tree.local is not None or uffd is None:
            return
        self._demand.hand_over(proc, uffd, tree.source)

    def uffd_of(self, proc: ProcId) -> Uffd | None:
        return self._uffds.get(proc)

    def read_on_loop(self, proc: ProcId) -> None:
        self._loop.add_reader(self._uffds[proc].fd, self._readable, proc)

    def _read(self, uffd: Uffd) -> bytes:
        """One read of ``uffd`` (journaled: ``keeper/journal.py:Generation.read_uffd``)."""
        if self.journal is None:
            return uffd.read_raw(_READ_BATCH)
        raw = self.journal.read_uffd(uffd.fd)
        crash_point("uffd-read")
        return raw

    def _serve_fast(
        self,
        proc: ProcId,
        uffd: Uffd,
        table: FastTable,
        events: list[UffdEvent | FastServed],
    ) -> tuple[bool, int]:
        """Answer what C can; append a FastServed and the rest's events, in order.
        Returns (the fd is drained, errno of a failed read)."""
        journal = self._journal_pointers(uffd.fd)
        while True:
            read_at = time.monotonic()
            result = uffd.fast_serve(table, journal)
            if result.faults or result.installs:
                installs = tuple((RunAddr(run), length) for run, length in result.installs)
                events.append(FastServed(proc, installs, result.faults, read_at))
            if result.rest:
                events.extend(decode_messages(result.rest))
            if result.error or result.status is not FastStatus.FULL:
                return result.status is FastStatus.DRAINED, result.error

    def _root_exited(self, root: ProcId) -> None:
        tree = self._trees.get(root)
        if tree is None:
            return
        self._loop.remove_reader(tree.pidfd)
        self.handle(Exited(root))

    # -- the core loop -----------------------------------------------------------------

    def handle(self, event: ShellEvent) -> None:
        self.run(self.tracker.handle(event, time.monotonic()))

    def run(self, actions: list[Action]) -> None:
        """Execute actions in order; outcomes go back to the core as they come.

        Re-entrant calls (an outcome producing actions while actions run) append to the
        one queue, so every action runs in the order the core produced it.
        """
        self._queue.extend(actions)
        if self._running:
            return
        self._running = True
        try:
            while self._queue:
                self._execute(self._queue.popleft())
        finally:
            self._running = False
        self._schedule_tick()

    def _execute(self, action: Action) -> None:
        if isinstance(action, Copy):
            if not self._submit_background(action):
                self._install(action, self._copy)
        elif isinstance(action, ZeroFill):
            self._install(action, self._zero)
        elif isinstance(action, Fetch):
            self._fetch(action)
        elif isinstance(action, Wake):
            uffd = self._uffds.get(action.proc)
            if uffd is not None:
                self._guard(action.proc, "wake", lambda: uffd.wake(action.run_addr, action.length))
        elif isinstance(action, CancelFetch):
            request = self._requests.pop(action.request_id, None)
            if request is not None:
                request.cancel()
        elif isinstance(action, AdoptChild):
            self._adopt(action)
        elif isinstance(action, Release):
            self._release(action)
        elif isinstance(action, Delegate):
            self._local.delegated(action.proc)
        elif isinstance(action, Expedite):
            waiting = self._uffds.get(action.proc)
            if self._installer is not None and waiting is not None:
                self._installer.expedite(waiting, action.run_addr)
        else:
            self._kill(action)

    def _submit_background(self, action: Copy) -> bool:
        """Hand a large bulk copy to the installer thread; False: install it here."""
        uffd = self._uffds.get(action.proc)
        if (
            self._installer is None
            or uffd is None
            or not action.dontwake
            or action.length < self.tracker.policy.thread_install_min
            or action.page_size != PAGE_SIZE  # pieces would split a huge page
            or action.proc in self._fenced
        ):
            return False
        data = memoryview(action.data)  # type: ignore[arg-type]
        view = data[action.data_offset : action.data_offset + action.length]
        job = self._installer.submit(uffd, action.run_addr, view, dontwake=True)
        if job is None:
            return False  # the queue is full: this one goes in here
        self._background[job] = (action.proc, action.install_id)
        self._tree_of[action.proc].thread_installs += 1
        return True

    def _take_completions(self) -> None:
        """Feed the installer's completions to the core."""
        crash_point("installing")
        assert self._installer is not None
        for done in self._installer.take():
            proc, install_id = self._background.pop(done.job)
            if proc not in self._uffds:
                continue  # released meanwhile: nothing waits for this outcome
            if done.result is None:
                self.run(self.tracker.kill_tree(proc, str(done.error), time.monotonic()))
                continue
            result = InstallResult(done.result.outcome.value)
            self.handle(InstallOutcome(proc, install_id, result, done.result.done))

    def _install(
        self, action: Copy | ZeroFill, operation: Callable[[Uffd, Copy | ZeroFill], OpResult]
    ) -> None:
        uffd = self._uffds.get(action.proc)
        if uffd is None:
            result = InstallResult.GONE
            done = 0
        elif action.proc in self._fenced:
            # Its layout event is read but not yet handled: as the kernel does until
            # the event is read, refuse; the core retries once the events are drained.
            result = InstallResult.RETRY
            done = 0
        else:
            try:
                outcome = operation(uffd, action)
            except UffdOpError as exc:
                # Not an outcome a handler expects: this process cannot be served safely.
                self.run(self.tracker.kill_tree(action.proc, str(exc), time.monotonic()))
                return
            result, done = InstallResult(outcome.outcome.value), outcome.done
        self.handle(InstallOutcome(action.proc, action.install_id, result, done))

    @staticmethod
    def _copy(uffd: Uffd, action: Copy | ZeroFill) -> OpResult:
        assert isinstance(action, Copy)
        data = memoryview(action.data)  # type: ignore[arg-type]
        view = data[action.data_offset : action.data_offset + action.length]
        return uffd.copy(action.run_addr, view, dontwake=action.dontwake)

    @staticmethod
    def _zero(uffd: Uffd, action: Copy | ZeroFill) -> OpResult:
        assert isinstance(action, ZeroFill)
        if action.page_size == PAGE_SIZE:
            return uffd.zeropage(action.run_addr, action.length)
        # hugetlbfs has no ZEROPAGE: install zeros from a buffer of the right size.
        return uffd.copy(action.run_addr, bytes(action.length))

    def _guard(self, proc: ProcId, what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except UffdOpError as exc:
            _log.warning("uffd operation failed", proc=proc, op=what, error=str(exc))

    # -- page server -------------------------------------------------------------------

    def _fetch(self, action: Fetch) -> None:
        tree = self._tree_of.get(action.proc)
        if tree is None:
            self.handle(FetchFailed(action.request_id, "the requesting process is gone"))
            return
        request_id = action.request_id

        def on_chunk(chunk: Chunk) -> None:
            data: object = chunk.data if chunk.data is not None else bytes(chunk.length)
            self.handle(PagesArrived(request_id, ImageAddr(chunk.address), chunk.length, data))

        def on_done(error: PageServerError | None) -> None:
            self._requests.pop(request_id, None)
            if error is not None:
                self.handle(FetchFailed(request_id, str(error)))

        self._requests[request_id] = tree.source.submit(
            action.image_id,
            action.image_addr,
            action.length,
            action.priority,
            on_chunk=on_chunk,
            on_done=on_done,
            # Each lane has its own deadline: a bulk request may wait in the client
            # behind megabytes of others (a sparse image makes thousands of small
            # ones); only a demand fault must be answered within the short one.
            deadline=self._deadlines[action.priority],
        )

    # -- process life cycle ------------------------------------------------------------

    def _adopt(self, action: AdoptChild) -> None:
        tree = self._tree_of.get(action.parent)
        uffd = Uffd.adopt(action.child_fd, nonblocking=True)
        if tree is None:  # the parent's tree ended while the fork event was queued
            uffd.close()
            return
        _log.info("following fork", parent=action.parent, child=action.child)
        try:
            self._watch(action.child, uffd, tree)
        except OSError as exc:  # nothing of the child was read: the tree is killed
            uffd.close()
            reason = f"cannot watch a fork child's uffd: {exc}"
            self.run(self.tracker.kill_tree(action.parent, reason, time.monotonic()))
            return
        self._hand_to_demander(action.child)

    def _release(self, action: Release) -> None:
        self._local.delegated(action.proc)
        if self._demand is not None:
            self._demand.release(action.proc)
        tree = self._tree_of.get(action.proc)
        uffd = self._uffds.pop(action.proc, None)
        if self.journal is not None:
            self.journal.remove(str(action.proc))  # before its descriptor number is freed
        if uffd is not None:
            self._loop.remove_reader(uffd.fd)
            if self._installer is not None:
                # No job may outlive the fd: its number could name another uffd next.
                self._installer.fence(uffd)
                self._installer.quiesce(uffd)
                self._installer.unfence(uffd)
                self._installer.unwatch(uffd)
            uffd.close()
        self._tree_of.pop(action.proc, None)
        if tree is None:
            return
        summary = self.tracker.summary(action.proc, time.monotonic())
        tree.summaries.append(summary)
        tree.latency.merge(self.tracker.process(action.proc).stats.latency)
        tree.members.discard(action.proc)
        if action.exited and action.proc == tree.root:
            tree.root_exited = True
        _log.info(
            "process released" if not action.exited else "process exited",
            proc=action.proc,
            pages=summary.bytes_resident // PAGE_SIZE,
            bytes=summary.bytes_resident,
            faults=summary.faults,
            fault_p50_us=_micros(summary.latency_p50),
            fault_p99_us=_micros(summary.latency_p99),
            seconds_to_resident=summary.time_to_resident,
        )
        if not tree.members:
            self._end_tree(tree, failure=tree.failure)

    def _kill(self, action: Kill) -> None:
        tree = self._tree_of.get(action.proc)
        if tree is None:
            return
        _log.error("killing restore tree", proc=action.proc, reason=action.reason)
        if tree.failure is None:
            tree.failure = f"{action.proc}: {action.reason}"
            kill_tree(tree.pid, tree.pidfd)
        # The process is dead or dying (SIGKILL cannot be caught): its uffd may close.
        self._release(Release(action.proc, exited=True))

    def _end_tree(self, tree: _Tree, failure: str | None) -> None:
        if self._trees.pop(tree.root, None) is None:
            return
        for proc in list(tree.members):
            self._release(Release(proc, exited=True))
        if tree.pidfd >= 0:
            self._loop.remove_reader(tree.pidfd)
        outcome = TreeOutcome(
            root=tree.root,
            failure=failure,
            exited=tree.root_exited and failure is None,
            processes=tuple(tree.summaries),
            faults=sum(s.faults for s in tree.summaries),
            fault_p50=tree.latency.quantile(0.5),
            fault_p99=tree.latency.quantile(0.99),
            bytes_resident=sum(s.bytes_resident for s in tree.summaries),
            seconds=time.monotonic() - tree.started,
            thread_installs=tree.thread_installs,
        )
        self.tracker.forget_tree(tree.root)
        tree.on_done(outcome)

    # -- timers --------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        """Arm the one timer for the core's next wakeup. Called after every batch: a
        timer already armed for about that moment stays (cancelling and re-arming it
        every time was 4.5 % of the loop's busy samples during a sweep)."""
        wakeup = self.tracker.next_wakeup()
        if wakeup is None:
            if self._tick is not None:
                self._tick.cancel()
                self._tick = None
            return
        when = self._loop.time() + max(wakeup - time.monotonic(), _TICK_MIN_DELAY)
        if self._tick is not None:
            if abs(self._tick.when() - when) <= _TICK_SLACK:
                return
            self._tick.cancel()
        self._tick = self._loop.call_at(when, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self.handle(Tick())

    def close(self) -> None:
        """Stop timers, readers and threads (the trees must have ended)."""
        if self._tick is not None:
            self._tick.cancel()
        if self._demand is not None:
            self._demand.close()
        for uffd in self._uffds.values():
            self._loop.remove_reader(uffd.fd)
        self._local.close()
        if self._installer is not None:
            self._loop.remove_reader(self._installer.fd)
            self._installer.close()
            self._installer = None
            self._background.clear()
        if self._journal_c is not None:  # after every C reader stopped
            ffi.release(self._journal_c)
            self._journal_c = None


def _micros(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)
