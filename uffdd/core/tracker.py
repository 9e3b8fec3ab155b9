"""Every lazy process of the daemon: fork lineage, request routing, deadlines, progress.

Why a tracker over the processes: a fetch may be awaited by several processes (a fork
child inherits its parent's requests), so answers are routed by request id to every
process still waiting, a request nobody waits for any more is cancelled, and a failed
request kills every process of the restore tree it belongs to (never silent zeros).

How a shell drives it (all calls take ``now``, monotonic seconds; nothing reads a clock):

- ``add_process(proc, image_id, regions, data, now)`` when a uffd is handed over;
- ``handle_uffd(proc, events, now)`` with each batch decoded from one read(), in order,
  stamped with the time of the read (fault latency is measured from it);
- ``handle(event, now)`` for everything else: PagesArrived, FetchFailed,
  InstallOutcome, FastServed, EventsDrained, BatchHeld, HandoverComplete, Exited, Tick;
- execute the returned actions in order (see ``actions.py`` for the contract), and
  call ``handle(Tick(), now)`` by ``next_wakeup()`` at the latest.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from uffdd.core.actions import Action, AdoptChild, CancelFetch, Fetch, Priority
from uffdd.core.addresses import PAGE_SIZE, ImageAddr
from uffdd.core.events import (
    BatchHeld,
    EventsDrained,
    Exited,
    FastServed,
    FetchFailed,
    HandoverComplete,
    InstallOutcome,
    PagesArrived,
    ProcId,
    ShellEvent,
    Tick,
    TreeData,
    UffdEvent,
)
from uffdd.core.policy import Policy
from uffdd.core.process import (
    Checkpoint,
    IdSource,
    LazyProcess,
    LazyRegion,
    ProcessInput,
    State,
)
from uffdd.core.ranges import RangeSet
from uffdd.core.stats import ProcessSummary, Progress


@dataclass(slots=True)
class _Request:
    image_id: str
    start: ImageAddr
    end: int
    priority: Priority
    deadline: float
    tree: ProcId
    waiting: set[ProcId] = field(default_factory=set)
    arrived: RangeSet[ImageAddr] = field(default_factory=RangeSet)


class Tracker:
    """All processes, keyed by :data:`ProcId`; the shells' single entry point."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self._ids = IdSource()
        self._procs: dict[ProcId, LazyProcess] = {}
        self._root: dict[ProcId, ProcId] = {}
        self._parent: dict[ProcId, ProcId] = {}
        self._members: dict[ProcId, list[LazyProcess]] = {}
        """Each restore tree's processes (root first), by root."""
        self._requests: dict[int, _Request] = {}
        self._deadlines: list[tuple[float, int]] = []
        """(deadline, request id) of every request, a heap; entries of requests that
        ended stay until they reach the top (next_wakeup drops them there)."""
        self._subscribed: dict[ProcId, set[int]] = {}

    # -- entry points ------------------------------------------------------------------

    def add_process(
        self,
        proc: ProcId,
        image_id: str,
        regions: list[LazyRegion] | tuple[LazyRegion, ...],
        data: list[tuple[int, int]] | tuple[tuple[int, int], ...],
        now: float,
        *,
        handed_over: bool = False,
    ) -> list[Action]:
        """Adopt a process whose lazy ``regions`` are registered with its uffd.

        ``data``: the image extents that hold data (everything else reads zeros).
        ``handed_over``: the handover is complete already (Firecracker: one message);
        otherwise send ``HandoverComplete`` when it is (CRIU: RSTF).
        """
        if proc in self._procs:
            raise ValueError(f"process {proc!r} is already tracked")
        process = LazyProcess(
            proc,
            image_id,
            regions,
            data,
            now,
            policy=self.policy,
            ids=self._ids,
            handed_over=handed_over,
        )
        self._register(process, root=proc)
        return self._absorb(process, process.pump(now), now)

    def resume_process(
        self,
        proc: ProcId,
        image_id: str,
        checkpoint: Checkpoint,
        now: float,
        *,
        root: ProcId | None = None,
        parent: ProcId | None = None,
        resident: Sequence[tuple[int, int]] = (),
    ) -> list[Action]:
        """Take back a process a daemon that died was serving (``root``: its tree's
        root, itself when None). It sweeps for itself: what its parent was sweeping for
        it is not known any more."""
        if proc in self._procs:
            raise ValueError(f"process {proc!r} is already tracked")
        process = LazyProcess.resumed(
            proc,
            image_id,
            checkpoint,
            now,
            resident=resident,
            policy=self.policy,
            ids=self._ids,
        )
        self._register(process, root=root or proc, parent=parent)
        return self._absorb(process, process.pump(now), now)

    def handle_uffd(
        self, proc: ProcId, events: Sequence[UffdEvent | FastServed], now: float
    ) -> list[Action]:
        """Apply a batch of kernel events read from ``proc``'s uffd, in order (with
        ``FastServed`` where the shell's fast path answered the faults read before)."""
        process = self._procs.get(proc)
        if process is None:
            return []
        process.unseen_batch = False  # (see BatchHeld) this is the batch
        return self._absorb(process, process.handle_batch(events, now), now)

    def handle(self, event: ShellEvent, now: float) -> list[Action]:
        """Apply one shell event."""
        if isinstance(event, PagesArrived):
            return self._arrived(event, now)
        if isinstance(event, FetchFailed):
            return self._failed(event.request_id, event.reason, now)
        if isinstance(event, Tick):
            return self._tick(event, now)
        process = self._procs.get(event.proc)
        if process is None:
            return []
        if isinstance(event, BatchHeld):
            process.unseen_batch = True
            return []
        if isinstance(event, HandoverComplete):
            # The handover names the whole restore: every process of the tree sweeps.
            out: list[Action] = []
            for member in self._tree(self._root[event.proc]):
                out.extend(self._run(member, HandoverComplete(member.proc), now))
            return out
        assert isinstance(event, InstallOutcome | FastServed | EventsDrained | Exited)
        return self._run(process, event, now)

    def kill_tree(self, proc: ProcId, reason: str, now: float) -> list[Action]:
        """Kill every live process of ``proc``'s restore tree (a restorer or image
        failure the shell saw itself), cancelling what only they waited for."""
        out: list[Action] = []
        for member in self._tree(self._root[proc]):
            out.extend(self._absorb(member, member.kill(reason, now), now))
        return out

    # -- queries -----------------------------------------------------------------------

    def process(self, proc: ProcId) -> LazyProcess:
        return self._procs[proc]

    def processes(self) -> list[ProcId]:
        return list(self._procs)

    def parent(self, proc: ProcId) -> ProcId | None:
        return self._parent.get(proc)

    def root(self, proc: ProcId) -> ProcId:
        return self._root[proc]

    def live(self) -> list[ProcId]:
        return [p for p, process in self._procs.items() if process.state is State.LIVE]

    def complete(self, root: ProcId) -> bool:
        """True when no process of ``root``'s tree is still being served."""
        return all(p.state is not State.LIVE for p in self._tree(root))

    def summary(self, proc: ProcId, now: float) -> ProcessSummary:
        return self._procs[proc].summary(now)

    def progress(self, root: ProcId | None = None) -> Progress:
        """Bytes installed over bytes needed, for one tree or for everything."""
        members = self._procs.values() if root is None else self._tree(root)
        resident = total = 0
        for p in members:
            resident += p.stats.data_installed
            total += p.stats.data_total - p.stats.data_dropped
        return Progress(resident, max(total, resident))

    def requests_in_flight(self) -> int:
        return len(self._requests)

    def next_wakeup(self) -> float | None:
        """The latest time the shell should send a Tick (a deadline or a retry)."""
        # Not a scan of every request: with a sparse image thousands are in flight, and
        # this runs after every batch of actions.
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._requests:
            heapq.heappop(deadlines)
        times = [t for p in self._procs.values() if (t := p.next_retry) is not None]
        if deadlines:
            times.append(deadlines[0][0])
        return min(times, default=None)

    # -- internals ---------------------------------------------------------------------

    def _register(self, process: LazyProcess, root: ProcId, parent: ProcId | None = None) -> None:
        self._procs[process.proc] = process
        self._root[process.proc] = root
        if parent is not None:
            self._parent[process.proc] = parent
        self._subscribed[process.proc] = set()
        self._members.setdefault(root, []).append(process)

    def _tree(self, root: ProcId) -> list[LazyProcess]:
        return list(self._members.get(root, ()))

    def forget_tree(self, root: ProcId) -> None:
        """Drop a tree the shell no longer serves (its uffds are closed), so a
        long-running daemon keeps no state per finished restore; later events for
        its processes are ignored."""
        for process in self._members.pop(root, []):
            self._procs.pop(process.proc, None)
            self._root.pop(process.proc, None)
            self._parent.pop(process.proc, None)
            for request_id in self._subscribed.pop(process.proc, set()):
                request = self._requests.get(request_id)
                if request is not None:
                    request.waiting.discard(process.proc)
                    if not request.waiting:
                        del self._requests[request_id]

    def _run(self, process: LazyProcess, event: ProcessInput, now: float) -> list[Action]:
        actions = process.handle(event, now)
        return self._absorb(process, actions, now)

    def _absorb(self, process: LazyProcess, actions: list[Action], now: float) -> list[Action]:
        """Book-keep what a process decided (requests, children); reconcile waiting."""
        out: list[Action] = []
        for action in actions:
            out.append(action)
            if isinstance(action, Fetch):
                deadline = now + (
                    self.policy.urgent_deadline
                    if action.priority is Priority.URGENT
                    else self.policy.bulk_deadline
                )
                self._requests[action.request_id] = _Request(
                    action.image_id,
                    action.image_addr,
                    action.image_addr + action.length,
                    action.priority,
                    deadline,
                    self._root[process.proc],
                    {process.proc},
                )
                self._subscribed[process.proc].add(action.request_id)
                heapq.heappush(self._deadlines, (deadline, action.request_id))
            elif isinstance(action, AdoptChild):
                child = process.take_child(action.child)
                self._register(child, self._root[process.proc], process.proc)
                # The parent's sweep brings what the child misses (TreeData) until the
                # parent is done; then the child sweeps what is left (a range the parent
                # removed or unmapped meanwhile).
                child.sweep_held = True
                for request_id in child.requests:
                    self._requests[request_id].waiting.add(child.proc)
                    self._subscribed[child.proc].add(request_id)
                # Installs the fork made fail are the child's to do too; its uffd is
                # fresh, so they can go at once (after the AdoptChild).
                out.extend(self._run(child, EventsDrained(child.proc), now))
        out.extend(self._reconcile(process))
        if process.state is not State.LIVE:
            out.extend(self._resume_children(process, now))
        return out

    def _resume_children(self, process: LazyProcess, now: float) -> list[Action]:
        """``process`` is done: its fork children sweep for themselves from now on."""
        out: list[Action] = []
        for member in self._tree(self._root[process.proc]):
            if member.sweep_held and self._parent.get(member.proc) == process.proc:
                member.sweep_held = False
                out.extend(self._absorb(member, member.pump(now), now))
        return out

    def _reconcile(self, process: LazyProcess) -> list[Action]:
        """Drop the process from requests it no longer waits for; cancel orphans."""
        out: list[Action] = []
        subscribed = self._subscribed[process.proc]
        # Only what the process dropped since last time, not a comparison of every
        # request: this runs after every event, and a sparse image keeps thousands of
        # requests in flight.
        ended, process.ended_requests = process.ended_requests, []
        for request_id in ended:
            if request_id not in subscribed:
                continue  # answered in full already (see _arrived)
            subscribed.discard(request_id)
            request = self._requests.get(request_id)
            if request is None:
                continue
            request.waiting.discard(process.proc)
            if not request.waiting:
                del self._requests[request_id]
                if request.arrived.total < request.end - request.start:
                    out.append(CancelFetch(request_id))
        return out

    def _arrived(self, event: PagesArrived, now: float) -> list[Action]:
        request = self._requests.get(event.request_id)
        if request is None:
            return []  # late data for a request nobody waits for any more
        lo, hi = event.image_addr, event.image_addr + event.length
        if (
            event.length <= 0
            or lo < request.start
            or hi > request.end
            or lo % PAGE_SIZE
            or hi % PAGE_SIZE
        ):
            return self._failed(
                event.request_id,
                f"page server answered {lo:#x}+{event.length:#x}, outside the pages asked for",
                now,
            )
        request.arrived.add(lo, hi)
        out: list[Action] = []
        for proc in sorted(request.waiting):
            out.extend(self._run(self._procs[proc], event, now))
        # The rest of the tree takes what it misses too: one transfer per tree.
        for member in self._tree(request.tree):
            if (
                member.proc not in request.waiting
                and member.state is State.LIVE
                and member.missing.overlaps(lo, hi)
            ):
                out.extend(self._run(member, TreeData(lo, event.length, event.data), now))
        # Fully answered: nobody can still wait for it (each waiter took its pages).
        if request.arrived.total >= request.end - request.start:
            self._requests.pop(event.request_id, None)
            for proc in request.waiting:
                self._subscribed[proc].discard(event.request_id)
        return out

    def _failed(self, request_id: int, reason: str, now: float) -> list[Action]:
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        why = (
            f"fetch {request_id} of {request.image_id} "
            f"{request.start:#x}+{request.end - request.start:#x} failed: {reason}"
        )
        out: list[Action] = []
        for root in sorted({self._root[p] for p in request.waiting}):
            out.extend(self.kill_tree(root, why, now))
        return out

    def _tick(self, event: Tick, now: float) -> list[Action]:
        out: list[Action] = []
        for request_id, request in list(self._requests.items()):
            if now >= request.deadline and request_id in self._requests:
                out.extend(self._failed(request_id, "deadline exceeded", now))
        for process in list(self._procs.values()):
            out.extend(self._run(process, event, now))
        return out
