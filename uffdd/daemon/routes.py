"""Who reads each uffd, and the hand-offs between readers: the routes a fault takes.

Why apart from the executor: the executor runs the core's actions; which reader a
process's faults reach first is a question of its own, with its own state. Every
uffd is read by exactly one reader at a time (docs/architecture.md, section 6):

- the loop (``Executor._readable``), through :class:`LocalRoute` first when the image
  is on this host: the C fast serve answers faults on local, verified data from the
  table the core delegated, and hands the rest back for the core;
- :class:`DemandRoute`, once a remote process's page client has its demand lane up: the
  process's uffd goes to that lane's demand thread, which reads it, fetches and installs
  what the core delegated, and reports the rest in order; each layout event pauses the
  uffd until the core has handled it and delegated anew (the fence: section 5.3). When
  the lane breaks, every process goes back to the loop, after every report the thread
  made.

What a C reader may answer is the core's to say: its tables (a ``Delegate`` action
whenever they change) and the policy's ``FaultPlan``. The routes only choose readers.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from typing import Any, Protocol

from uffdd.client.demand_lane import DemandLane, DemandThread
from uffdd.core.actions import Action
from uffdd.core.addresses import RunAddr
from uffdd.core.events import EventsDrained, FastServed, Fork, ProcId, ShellEvent, UffdEvent
from uffdd.core.policy import FaultPlan
from uffdd.core.process import LazyProcess
from uffdd.core.tracker import Tracker
from uffdd.core.wire import decode_messages
from uffdd.daemon.sources import LocalData, PageSource, demand_lane_of
from uffdd.keeper.journal import SLOT_SIZE, Generation
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger
from uffdd.native.demander import DemandReport
from uffdd.native.fast_serve import FastTable
from uffdd.native.installer import Installer

_log = get_logger("uffdd.daemon.routes")


class Host(Protocol):
    """What the routes need of the executor: the core and the loop's reading of uffds."""

    tracker: Tracker

    def run(self, actions: list[Action]) -> None:
        """Execute the core's actions, in order."""

    def handle(self, event: ShellEvent) -> None:
        """Hand one event to the core and execute what it decides."""

    def hand_batch(
        self, proc: ProcId, events: list[UffdEvent | FastServed], now: float
    ) -> list[Action]:
        """The core's actions for a batch of ``proc``'s uffd."""

    def fenced_batch(
        self, proc: ProcId, uffd: Uffd, events: list[UffdEvent | FastServed], now: float
    ) -> list[Action]:
        """The core's actions for a batch holding a layout event, ``uffd`` fenced."""

    def uffd_of(self, proc: ProcId) -> Uffd | None:
        """The uffd of a process being served, or None."""

    def read_on_loop(self, proc: ProcId) -> None:
        """Let the loop read ``proc``'s uffd (again)."""


class LocalRoute:
    """The C fast serve's tables: one per process whose image is on this host."""

    def __init__(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._tables: dict[ProcId, FastTable] = {}

    def table(self, process: LazyProcess, local: LocalData) -> FastTable:
        """The process's table: what the core delegated last, cut to the image's
        extents (built once per delegation)."""
        table = self._tables.get(process.proc)
        if table is None:
            rows = _table_rows(process, local)
            table = FastTable(rows, local.data, local.verified, local.chunk_size, self._plan)
            self._tables[process.proc] = table
        return table

    def delegated(self, proc: ProcId) -> None:
        """The core delegated ``proc``'s tables anew: the next read builds its table."""
        table = self._tables.pop(proc, None)
        if table is not None:
            table.close()

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()


class DemandRoute:
    """Remote processes handed to the demand thread of their page client's demand lane."""

    def __init__(
        self,
        host: Host,
        loop: asyncio.AbstractEventLoop,
        installer: Installer,
        plan: FaultPlan,
        *,
        journal: Generation | None = None,
        journal_c: object = None,
    ) -> None:
        self._host = host
        self._journal = journal
        self._journal_c: Any = journal_c
        """The journal's mapping as C sees it (owned by the executor)."""
        """Whose read marks and held batches each thread keeps (``keeper/journal.py``)."""
        self._loop = loop
        self._installer = installer
        self._plan = plan
        self._demanders: dict[int, DemandThread] = {}
        """A demand thread per connected demand lane (by the lane's id)."""
        self._owned: dict[ProcId, tuple[DemandThread, int, int]] = {}
        """Processes whose uffd a demand thread reads: (thread, slot, token)."""
        self._tokens: dict[int, ProcId] = {}
        self._next_token = 0
        self._dropping: DemandThread | None = None
        """The thread whose reports are being handed over after its slots were removed."""

    def served(self) -> list[ProcId]:
        """Processes whose uffd a demand thread reads."""
        return list(self._owned)

    def owns(self, proc: ProcId) -> bool:
        return proc in self._owned

    def hand_over(self, proc: ProcId, uffd: Uffd, source: PageSource) -> None:
        """Give a remote process's uffd to the demand thread of its page client's demand
        lane, once that is connected; until then (or without room) the loop reads it."""
        if proc in self._owned:
            return
        lane = demand_lane_of(source)
        if lane is None:
            return
        thread = self._demander(lane)
        if thread is None:
            return
        process = self._host.tracker.process(proc)
        token = self._next_token = self._next_token + 1
        self._loop.remove_reader(uffd.fd)
        try:
            slot = thread.add(
                token, uffd.fd, process.image_id, process.fast_ranges(), process.zero_ranges()
            )
        except OSError as exc:
            _log.info("demand thread full; the loop reads this process", proc=proc, error=str(exc))
            self._host.read_on_loop(proc)
            return
        uffd.guard(self._installer.handle)
        self._owned[proc] = (thread, slot, token)
        self._tokens[token] = proc

    def _demander(self, lane: DemandLane) -> DemandThread | None:
        thread = self._demanders.get(id(lane))
        if thread is not None:
            return thread
        try:
            thread = DemandThread(lane, self._plan, self._installer)
        except OSError as exc:
            _log.warning("no demand thread", error=str(exc))
            lane.close()
            return None
        if self._journal_c is not None and self._journal is not None:
            slots = self._journal_c + self._journal.mark_slots
            thread.mark_reads(self._journal_c, self._journal.mark_slots, slots, SLOT_SIZE)
        self._demanders[id(lane)] = thread
        self._loop.add_reader(thread.fd, self._take_demand, thread)
        return thread

    def _take_demand(self, thread: DemandThread) -> None:
        """The demand thread's reports, each handed to the core as a read batch."""
        broken = self._hand_reports(thread, thread.take())
        if broken:
            self._drop_demander(thread, broken)

    def _hand_reports(self, thread: DemandThread, reports: list[DemandReport]) -> int:
        """Hand the reports to the core, in order; a process's run of plain reports
        (faults only) goes as one batch: with the thread answering a reading process
        as fast as it faults, a batch per report was most of the loop's work. Returns
        the errno that broke the lane, or 0."""
        broken = 0
        plain: dict[ProcId, list[DemandReport]] = {}
        for report in reports:
            broken = broken or report.lane_error
            proc = self._tokens.get(report.token)
            if proc is None or self._owned.get(proc, (None,))[0] is not thread:
                _close_fork_fds(report)  # the process was released meanwhile
            elif report.layout or report.read_error:
                self._hand_plain(proc, plain.pop(proc, []))
                self._hand_special(proc, report)
            else:
                plain.setdefault(proc, []).append(report)
        for proc, run in plain.items():
            self._hand_plain(proc, run)
        return broken

    def _hand_plain(self, proc: ProcId, reports: list[DemandReport]) -> None:
        if not reports or self._owned.get(proc) is None:
            return
        events = [e for report in reports for e in _report_events(proc, report)]
        if events:
            self._host.run(self._host.hand_batch(proc, events, reports[-1].done_at))
        if reports[-1].drained and self._host.uffd_of(proc) is not None:
            self._host.handle(EventsDrained(proc))

    def _hand_special(self, proc: ProcId, report: DemandReport) -> None:
        """A report with a layout event, or the end of the thread's reading of it."""
        if self._owned.get(proc) is None:
            _close_fork_fds(report)  # released by the reports before
            return
        if report.read_error:
            _close_fork_fds(report)
            reason = f"uffd read failed: errno {report.read_error}"
            self._host.run(self._host.tracker.kill_tree(proc, reason, report.done_at))
            return
        events = _report_events(proc, report)
        uffd = self._host.uffd_of(proc)
        assert uffd is not None
        self._host.run(self._host.fenced_batch(proc, uffd, events, report.done_at))
        owner = self._owned.get(proc)
        if owner is None:
            return  # released by the batch
        if owner[0] is self._dropping:
            return  # its slot is gone: the loop reads this uffd from now on
        process = self._host.tracker.process(proc)  # delegated anew by that batch
        owner[0].resume(owner[1], process.fast_ranges(), process.zero_ranges())
        self._host.handle(EventsDrained(proc))  # what is still queued, the thread reads

    def _drop_demander(self, thread: DemandThread, error: int) -> None:
        """The thread's lane broke, or it found no memory for a round (both a LANE
        report): its processes go back to the loop, after every report it made (the
        messages in them were read from the uffds: only these reports hold them)."""
        _log.warning("demand lane broken; the loop reads its processes", error=os.strerror(error))
        mine = [proc for proc, (owner, slot, _) in self._owned.items() if owner is thread]
        for proc in mine:
            thread.remove(self._owned[proc][1])  # read no more of it
        # A report of a layout event among these must not resume its (removed) slot.
        self._dropping = thread
        try:
            self._hand_reports(thread, thread.take())
        finally:
            self._dropping = None
        for proc in mine:
            if proc not in self._owned:
                continue  # released by a report
            self._forget_owner(proc)
            self._host.read_on_loop(proc)
        self._loop.remove_reader(thread.fd)
        self._demanders.pop(id(thread.lane), None)
        thread.close()

    def _forget_owner(self, proc: ProcId) -> None:
        """The demand thread no longer reads ``proc``'s uffd (the caller removed it)."""
        _, _, token = self._owned.pop(proc)
        self._tokens.pop(token, None)
        uffd = self._host.uffd_of(proc)
        if uffd is not None:
            uffd.guard(None)

    def release(self, proc: ProcId) -> None:
        """``proc`` ends: its demand thread (if any) reads it no more."""
        owner = self._owned.get(proc)
        if owner is not None:
            owner[0].remove(owner[1])
            self._forget_owner(proc)

    def close(self) -> None:
        for thread in list(self._demanders.values()):
            self._loop.remove_reader(thread.fd)
            thread.close()
        self._demanders.clear()
        self._owned.clear()


def _table_rows(process: LazyProcess, local: LocalData) -> list[tuple[int, int, int]]:
    """The process's fast ranges as (run-time address, length, data offset) rows: each
    cut where it crosses from one DATA extent of the image to the next."""
    extents = local.extents
    starts = [start for start, _, _ in extents]
    rows: list[tuple[int, int, int]] = []
    for run, image, length in process.fast_ranges():
        end = image + length
        index = max(bisect.bisect_right(starts, image) - 1, 0)
        while index < len(extents) and extents[index][0] < end:
            start, size, offset = extents[index]
            lo, hi = max(image, start), min(end, start + size)
            if lo < hi:
                rows.append((run + (lo - image), hi - lo, offset + (lo - start)))
            index += 1
    return rows


def _report_events(proc: ProcId, report: DemandReport) -> list[UffdEvent | FastServed]:
    """What a demand report tells the core: what C answered, then the rest, in order."""
    events: list[UffdEvent | FastServed] = []
    if report.faults or report.installs:
        installs = tuple((RunAddr(run), length) for run, length in report.installs)
        events.append(FastServed(proc, installs, report.faults, report.read_at, report.done_at))
    events.extend(decode_messages(report.messages))
    return events


def _close_fork_fds(report: DemandReport) -> None:
    """Close the new uffds of FORK events in a report nobody will hand to the core."""
    for event in decode_messages(report.messages):
        if isinstance(event, Fork):
            os.close(event.child_fd)
