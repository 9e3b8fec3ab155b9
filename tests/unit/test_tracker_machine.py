"""The core against a simulated kernel and page server, driven by hypothesis.

Why a state machine: the bugs of a lazy-restore handler live in interleavings (data
arriving after a remove, a remap while a fetch is out, a fork during an EAGAIN
deferral). Hypothesis generates those sequences; a naive per-page model says what every
run-time page must read, and a small fake kernel executes the core's actions the way
userfaultfd does:

- kernel events are queued when they happen and read in batches; while a
  non-cooperative event (fork, remap, remove, unmap) is unread, every install fails
  with EAGAIN (the kernel's ``mmap_changing``);
- a copy stops at a present page (EEXIST first, else EAGAIN with the bytes done);
- a woken thread whose page is still missing faults again; one on an unmapped page dies.

Checked after every step and at the end: (1) each Copy installs exactly the image page
the model names for that run-time page, never into a removed/zero page nor an unmapped
one, and a ZeroFill only where zeros are right; (2) every blocked thread is woken once
the data has arrived; (3) Release only when every data page is installed correctly;
(4) a process never asks for a page it already has in flight.

The ``fast_serve`` rule plays the executor's C fast path: with a table of
``fast_ranges`` taken after the core's last ``Delegate`` (as the executor takes it), it
answers the faults at the head of the queue by copying image data (the window the
core's plan gives, then the page alone, then a wake), stops at the first message it
cannot answer, leaves a queue holding a layout event to the core whole, and reports
``FastServed`` in the same batch as the rest; its copies are checked like the core's.

With ``background`` on, the machine plays the executor's installer thread too: a Copy
with ``dontwake`` becomes a job that runs page by page when the ``run_job`` rule says
(between reads, faults and arrivals), and its outcome reaches the core only when
``take_completions`` says; ``expedite`` moves a job first and makes it wake, as a
fault in its range does. A read whose batch holds a layout event fences the process
first, as the executor does: its jobs stop where they are (EAGAIN with the bytes done),
every completion is delivered, installs asked for meanwhile get EAGAIN, and only then
does the batch reach the core.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import (
    BatchHeld,
    EventsDrained,
    FastServed,
    Fork,
    HandoverComplete,
    InstallOutcome,
    InstallResult,
    PageFault,
    PagesArrived,
    ProcId,
    Remap,
    Remove,
    Tick,
    UffdEvent,
    Unmap,
)
from uffdd.core.policy import Policy, plan_fault
from uffdd.core.process import LazyRegion, State
from uffdd.core.tracker import Tracker

P = 4096
ROOT = ProcId("r")
# Two lazy regions; the run-time space has room to mremap into (0x10 .. 0x50 pages).
REGIONS = (
    LazyRegion(RunAddr(0x10 * P), ImageAddr(0x100 * P), 12 * P),
    LazyRegion(RunAddr(0x30 * P), ImageAddr(0x200 * P), 6 * P),
)
POLICY = Policy(
    fault_around=4 * P,
    bulk_min=2 * P,
    bulk_max=8 * P,
    max_in_flight=16 * P,
    urgent_deadline=1e9,
    bulk_deadline=1e9,
    retry_interval=0.01,
)
FAST_PLAN = POLICY.fault_plan(round_trip=False)


@dataclass(frozen=True, slots=True)
class Chunk:
    """What the fake page server sends: the image address its first byte comes from."""

    image: int


@dataclass
class Page:
    """The model of one mapped lazy run-time page."""

    image: int
    kind: str  # "data" (read the image page), "zero" (image zero), "removed" (zeros)


@dataclass
class Job:
    """A Copy on the fake installer thread: ``done`` bytes of it have run."""

    copy: Copy
    done: int = 0
    wakes: bool = False
    """Expedited for a fault: its pieces from now on wake, like a copy without DONTWAKE."""


@dataclass
class FakeProc:
    """The kernel's view of one process, plus the model of what it must read."""

    name: ProcId
    pages: dict[int, Page]
    present: dict[int, object] = field(default_factory=dict)
    blocked: dict[int, int] = field(default_factory=dict)
    queue: list[UffdEvent] = field(default_factory=list)
    adopted: bool = True
    done: bool = False

    @property
    def changing(self) -> bool:
        """An unread non-cooperative event: installs fail with EAGAIN."""
        return any(not isinstance(e, PageFault) for e in self.queue)

    def expected(self, run: int) -> object:
        page = self.pages[run]
        return ("image", page.image) if page.kind == "data" else "zero"


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tracker = Tracker(POLICY)
        self.now = 0.0
        self.procs: dict[ProcId, FakeProc] = {}
        self.by_fd: dict[int, FakeProc] = {}
        self.next_fd = 100
        # request id -> (image start, image end) still unanswered, and the processes
        # known to wait for it (the issuer, and fork children at fork time)
        self.outstanding: dict[int, tuple[int, int]] = {}
        self.waiting: dict[int, set[ProcId]] = {}
        self.undelivered: dict[int, set[int]] = {}
        self.issued: dict[int, tuple[int, int]] = {}
        self.lanes: dict[int, Priority] = {}
        self.handed_over = False
        # the fast path's table of each process: (layout generation, run ranges)
        self.tables: dict[ProcId, list[tuple[int, int, int]]] = {}
        # the installer thread: jobs running, outcomes not yet taken, fenced processes
        self.background = False
        self.jobs: list[Job] = []
        self.finished: list[InstallOutcome] = []
        self.fenced: set[ProcId] = set()

    # -- set-up ------------------------------------------------------------------------

    @initialize(
        data_pages=st.sets(st.integers(0, 17), min_size=4, max_size=18),
        handover=st.sampled_from([False, False, False, True]),
        background=st.booleans(),
    )
    def adopt(self, data_pages: set[int], handover: bool, background: bool) -> None:
        self.background = background
        pages: dict[int, Page] = {}
        data: list[tuple[int, int]] = []
        index = 0
        for region in REGIONS:
            for offset in range(0, region.length, P):
                image = region.image + offset
                kind = "data" if index in data_pages else "zero"
                pages[region.run + offset] = Page(image, kind)
                if kind == "data":
                    data.append((image, P))
                index += 1
        self.procs[ROOT] = FakeProc(ROOT, pages)
        self.handed_over = handover
        self.execute(
            self.tracker.add_process(ROOT, "img", REGIONS, data, self.now, handed_over=handover)
        )

    # -- executing actions like the kernel and the page server would -------------------

    def execute(self, actions: list[Action]) -> None:
        work: deque[Action] = deque(actions)
        while work:
            action = work.popleft()
            result = self.perform(action)
            if result is not None:
                work.extend(self.tracker.handle(result, self.now))

    def perform(self, action: Action) -> InstallOutcome | None:
        if isinstance(action, Copy):
            return self.copy(action)
        if isinstance(action, ZeroFill):
            return self.zero_fill(action)
        if isinstance(action, Wake):
            self.wake(self.procs[action.proc], action.run_addr, action.length)
        elif isinstance(action, Fetch):
            self.fetch(action)
        elif isinstance(action, CancelFetch):
            self.outstanding.pop(action.request_id, None)
        elif isinstance(action, AdoptChild):
            child = self.by_fd[action.child_fd]
            assert not child.adopted
            child.adopted = True
            child.name = action.child
            self.procs[action.child] = child
            assert self.tracker.parent(action.child) == action.parent
            # the child waits for what its parent waited for at the fork
            for request_id in self.tracker.process(action.child).requests:
                self.waiting.setdefault(request_id, set()).add(action.child)
        elif isinstance(action, Release):
            self.release(action)
        elif isinstance(action, Delegate):
            # the fast path takes the new tables from now on (the executor's rebuild)
            assert not self.procs[action.proc].done, "a delegation for an ended process"
            self.tables.pop(action.proc, None)
        elif isinstance(action, Expedite):
            self.expedite_at(action)
        else:
            assert not isinstance(action, Kill), f"unexpected kill: {action.reason}"
        return None

    def copy(self, action: Copy) -> InstallOutcome | None:
        proc = self.procs[action.proc]
        assert not proc.done, "an install for a process that was released"
        assert isinstance(action.data, Chunk)
        assert action.image_addr == action.data.image + action.data_offset
        if proc.name in self.fenced:
            return InstallOutcome(proc.name, action.install_id, InstallResult.RETRY, 0)
        if self.background and action.dontwake:
            self.jobs.append(Job(action))
            return None
        done, result = self.copy_pages(proc, action, 0, action.length)
        return InstallOutcome(proc.name, action.install_id, result, done)

    def copy_pages(
        self, proc: FakeProc, action: Copy, start: int, end: int
    ) -> tuple[int, InstallResult]:
        """UFFDIO_COPY of ``[start, end)`` of ``action`` like the kernel: (bytes done,
        result), the bytes counted from ``start``."""
        assert isinstance(action.data, Chunk)
        if proc.changing:
            return 0, InstallResult.RETRY
        done = 0
        result = InstallResult.DONE
        for offset in range(start, end, P):
            run = action.run_addr + offset
            assert run in proc.pages, f"Copy into unmapped page {run:#x}"
            if run in proc.present:
                result = InstallResult.RETRY if done else InstallResult.EXISTS
                break
            source = ("image", action.data.image + action.data_offset + offset)
            # (1): exactly the image page the model names; never into a zero page
            assert proc.expected(run) == source, (
                f"Copy of {source} into {run:#x} which must read {proc.expected(run)}"
            )
            proc.present[run] = source
            done += P
        if not action.dontwake:
            self.wake(proc, action.run_addr + start, done)
        return done, result

    def zero_fill(self, action: ZeroFill) -> InstallOutcome:
        """UFFDIO_ZEROPAGE as the kernel does it: page by page, stopping at the first
        present page (EEXIST, or EAGAIN with the bytes done before it)."""
        proc = self.procs[action.proc]
        assert not proc.done
        if proc.changing:
            return InstallOutcome(proc.name, action.install_id, InstallResult.RETRY, 0)
        if action.run_addr not in proc.pages:
            return InstallOutcome(proc.name, action.install_id, InstallResult.LAYOUT_CHANGED)
        done = 0
        result = InstallResult.DONE
        for offset in range(0, action.length, P):
            run = action.run_addr + offset
            if run not in proc.pages:
                result = InstallResult.RETRY if done else InstallResult.LAYOUT_CHANGED
                break
            if run in proc.present:
                result = InstallResult.RETRY if done else InstallResult.EXISTS
                break
            assert proc.expected(run) == "zero", f"ZeroFill of {run:#x}: must read image data"
            proc.present[run] = "zero"
            done += P
        self.wake(proc, action.run_addr, done)
        return InstallOutcome(proc.name, action.install_id, result, done)

    def wake(self, proc: FakeProc, start: int, length: int) -> None:
        for run in [r for r in proc.blocked if start <= r < start + length]:
            threads = proc.blocked.pop(run)
            if run in proc.pages and run not in proc.present:
                for _ in range(threads):  # still missing: the access faults again
                    self.block(proc, run)

    def block(self, proc: FakeProc, run: int) -> None:
        proc.blocked[run] = proc.blocked.get(run, 0) + 1
        proc.queue.append(PageFault(RunAddr(run)))

    def fetch(self, action: Fetch) -> None:
        lo, hi = action.image_addr, action.image_addr + action.length
        assert action.image_id == "img"
        # (4): the process (or its ancestors, before a fork) has none of it in flight,
        # except that a demand fault may ask again urgently for what only the
        # background sweep (bulk) has asked for
        for request_id, waiting in self.waiting.items():
            if action.proc in waiting and request_id in self.outstanding:
                if action.priority is Priority.URGENT and self.lanes[request_id] is Priority.BULK:
                    continue
                left = self.undelivered[request_id]
                assert not any(lo <= page < hi for page in left), (
                    f"{action.proc} fetches {lo:#x}..{hi:#x} twice on "
                    f"{action.priority.name} (request {request_id}: {self.lanes[request_id].name})"
                )
        self.outstanding[action.request_id] = (lo, hi)
        self.lanes[action.request_id] = action.priority
        self.issued[action.request_id] = (lo, hi)
        self.waiting[action.request_id] = {action.proc}
        self.undelivered[action.request_id] = set(range(lo, hi, P))

    def release(self, action: Release) -> None:
        proc = self.procs[action.proc]
        assert not proc.done
        assert not any(job.copy.proc == proc.name for job in self.jobs), "a copy still runs"
        assert not any(o.proc == proc.name for o in self.finished), "an outcome is untaken"
        proc.done = True
        if action.exited:
            return
        # (2) a thread may still block only if the core has not read its fault yet;
        # closing the uffd wakes it and the kernel fills zeros from now on
        for run, threads in proc.blocked.items():
            unread = sum(1 for e in proc.queue if isinstance(e, PageFault) and e.address == run)
            assert threads <= unread, f"released {proc.name} with a fault at {run:#x} unanswered"
            assert run not in proc.pages or proc.expected(run) == "zero" or run in proc.present
        proc.blocked.clear()
        # (3): everything the image holds data for is installed, and correctly
        for run, page in proc.pages.items():
            if page.kind == "data":
                assert proc.present.get(run) == ("image", page.image), (
                    f"released {proc.name} with {run:#x} not installed"
                )
        assert self.handed_over

    # -- rule helpers ------------------------------------------------------------------

    def live(self) -> list[FakeProc]:
        return [p for p in self.procs.values() if p.adopted and not p.done]

    def pick(self, index: int) -> FakeProc:
        live = self.live()
        return live[index % len(live)]

    def read(self, proc: FakeProc) -> None:
        """The shell reads the whole queue as one batch, acts, then reports the drain."""
        batch: list[UffdEvent | FastServed]
        batch, proc.queue = list(proc.queue), []
        self.hand_over(proc, batch)

    def hand_over(self, proc: FakeProc, batch: list[UffdEvent | FastServed]) -> None:
        """A batch just read to the core, fenced as the executor does when it holds a
        layout event; then the drain."""
        if any(not isinstance(e, PageFault | FastServed) for e in batch):
            self.fenced.add(proc.name)
            for job in [j for j in self.jobs if j.copy.proc == proc.name]:
                self.end_job(job, InstallResult.RETRY)  # stopped by the fence
            self.execute(self.tracker.handle(BatchHeld(proc.name), self.now))
            self.take_completions()
            actions = self.tracker.handle_uffd(proc.name, batch, self.now)
            self.fenced.discard(proc.name)
            self.execute(actions)
        elif batch:
            self.execute(self.tracker.handle_uffd(proc.name, batch, self.now))
        if not proc.done:
            self.execute(self.tracker.handle(EventsDrained(proc.name), self.now))

    def end_job(self, job: Job, result: InstallResult) -> None:
        self.jobs.remove(job)
        copy = job.copy
        self.finished.append(InstallOutcome(copy.proc, copy.install_id, result, job.done))

    def deliver(self, request_id: int, lo: int, hi: int) -> None:
        self.undelivered.get(request_id, set()).difference_update(range(lo, hi, P))
        # the buffer starts at the first byte delivered; Copy offsets index into it
        event = PagesArrived(request_id, ImageAddr(lo), hi - lo, Chunk(lo))
        self.execute(self.tracker.handle(event, self.now))

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: bool(self.live()))
    @rule(
        who=st.integers(0, 7),
        which=st.integers(0, 63),
        read_now=st.sampled_from(["no", "slow path", "fast path"]),
    )
    def fault(self, who: int, which: int, read_now: str) -> None:
        proc = self.pick(who)
        missing = sorted(r for r in proc.pages if r not in proc.present)
        if missing:
            self.block(proc, missing[which % len(missing)])
        if read_now == "slow path":
            self.read(proc)
        elif read_now == "fast path":
            self.fast_serve(who)

    @precondition(lambda self: bool(self.live()))
    @rule(who=st.integers(0, 7), which=st.integers(0, 63))
    def stale_fault(self, who: int, which: int) -> None:
        """A fault message read after the page was installed (the thread runs on)."""
        proc = self.pick(who)
        present = sorted(proc.present)
        if present:
            proc.queue.append(PageFault(RunAddr(present[which % len(present)])))

    # -- the shell's C fast path --------------------------------------------------------

    def fast_table(self, proc: FakeProc) -> list[tuple[int, int, int]]:
        """The table the fast path serves from: taken when the core last delegated."""
        table = self.tables.get(proc.name)
        if table is None:
            core = self.tracker.process(proc.name)
            table = [(int(run), int(image), length) for run, image, length in core.fast_ranges()]
            self.tables[proc.name] = table
        return table

    def fast_copy(
        self, proc: FakeProc, rng: tuple[int, int, int], lo: int, hi: int
    ) -> tuple[int, bool]:
        """UFFDIO_COPY of image data like the kernel: (bytes done, ended on a present page)."""
        run, image, _ = rng
        if proc.changing:
            return 0, False
        done = 0
        for page in range(lo, hi, P):
            if page in proc.present:
                self.wake(proc, lo, done)  # the kernel wakes what it did copy
                return done, True
            source = ("image", image + page - run)
            assert page in proc.pages, f"fast path copies into unmapped {page:#x}"
            assert proc.expected(page) == source, (
                f"fast path copies {source} into {page:#x}, which must read {proc.expected(page)}"
            )
            proc.present[page] = source
            done += P
        self.wake(proc, lo, done)
        return done, False

    def fast_one(
        self, proc: FakeProc, event: UffdEvent, installs: list[tuple[RunAddr, int]]
    ) -> bool:
        """One message on the fast path: True when answered there."""
        if not isinstance(event, PageFault):
            return False
        page = event.address - event.address % P
        table = self.fast_table(proc)
        spans = plan_fault(FAST_PLAN, [(r[0], r[0] + r[2]) for r in table], [], page)
        if not spans:
            return False
        rng, own = table[spans[0].table], spans[0]
        for start, end in ((own.start, own.end), (page, page + P)):
            done, present = self.fast_copy(proc, rng, start, end)
            if done:
                installs.append((RunAddr(start), done))
            if start <= page < start + done:
                return True
            if not present:
                return False  # EAGAIN: an event is pending
        self.wake(proc, page, P)  # EEXIST on the page itself: it is there
        return True

    @precondition(lambda self: bool(self.live()))
    @rule(who=st.integers(0, 7))
    def fast_serve(self, who: int) -> None:
        proc = self.pick(who)
        installs: list[tuple[RunAddr, int]] = []
        served = 0
        # a read holding a layout event goes to the core whole (uffd_msgs_hold_layout)
        layout = any(not isinstance(e, PageFault) for e in proc.queue)
        while not layout and proc.queue and self.fast_one(proc, proc.queue[0], installs):
            proc.queue.pop(0)
            served += 1
        rest, proc.queue = proc.queue, []
        batch: list[UffdEvent | FastServed] = []
        if served:
            batch.append(FastServed(proc.name, tuple(installs), served, self.now))
        batch.extend(rest)
        self.hand_over(proc, batch)

    # -- the shell's installer thread ---------------------------------------------------

    @precondition(lambda self: bool(self.jobs))
    @rule(which=st.integers(0, 7), pages=st.integers(1, 8))
    def run_job(self, which: int, pages: int) -> None:
        """The thread runs up to ``pages`` pages of a job (one ioctl)."""
        job = self.jobs[which % len(self.jobs)]
        self.step_job(job, pages)

    def expedite_at(self, action: Expedite) -> None:
        """The core asks: the job installing ``run_addr`` goes first, waking."""
        for job in self.jobs:
            copy = job.copy
            if copy.proc == action.proc and copy.run_addr <= action.run_addr < (
                copy.run_addr + copy.length
            ):
                job.wakes = True
                self.jobs.remove(job)
                self.jobs.insert(0, job)
                return

    @precondition(lambda self: bool(self.jobs))
    @rule(which=st.integers(0, 7))
    def expedite(self, which: int) -> None:
        """A fault read in a job's range: the executor has it run first, waking."""
        job = self.jobs.pop(which % len(self.jobs))
        job.wakes = True
        self.jobs.insert(0, job)

    def step_job(self, job: Job, pages: int) -> None:
        copy = replace(job.copy, dontwake=False) if job.wakes else job.copy
        proc = self.procs[copy.proc]
        end = min(job.done + pages * P, copy.length)
        done, result = self.copy_pages(proc, copy, job.done, end)
        job.done += done
        if result is not InstallResult.DONE:
            # as the thread reports it: this ioctl's errno, the bytes of the whole job
            self.end_job(job, result)
        elif job.done == copy.length:
            self.end_job(job, InstallResult.DONE)

    @precondition(lambda self: bool(self.finished))
    @rule()
    def take_completions(self) -> None:
        finished, self.finished = self.finished, []
        for outcome in finished:
            if not self.procs[outcome.proc].done:
                self.execute(self.tracker.handle(outcome, self.now))

    @precondition(lambda self: bool(self.live()))
    @rule(who=st.integers(0, 7))
    def read_events(self, who: int) -> None:
        self.read(self.pick(who))

    @precondition(lambda self: bool(self.outstanding))
    @rule(which=st.integers(0, 63), part=st.sampled_from(["all", "head", "tail"]))
    def arrive(self, which: int, part: str) -> None:
        request_id = sorted(self.outstanding)[which % len(self.outstanding)]
        lo, hi = self.outstanding[request_id]
        pages = (hi - lo) // P
        if part == "head" and pages > 1:
            hi = lo + (pages // 2) * P
        elif part == "tail" and pages > 1:
            lo = lo + (pages // 2) * P
        if part == "all" or pages > 1:
            self.deliver(request_id, lo, hi)
        if not self.undelivered[request_id]:
            del self.outstanding[request_id]

    @precondition(lambda self: bool(self.issued))
    @rule(which=st.integers(0, 63))
    def arrive_again(self, which: int) -> None:
        """Duplicated or late data (after a cancel, a remove, an unmap, a release)."""
        request_id = sorted(self.issued)[which % len(self.issued)]
        lo, hi = self.issued[request_id]
        self.deliver(request_id, lo, hi)
        if request_id in self.outstanding and not self.undelivered[request_id]:
            del self.outstanding[request_id]

    @staticmethod
    def near(proc: FakeProc, which: int) -> int:
        """A page number: often one a thread waits on, mostly one that is mapped."""
        blocked = sorted(proc.blocked)
        if which < 20 and blocked:
            return blocked[which % len(blocked)] // P
        mapped = sorted(proc.pages)
        if which >= 48 or not mapped:
            return 0x0E + which
        return mapped[which % len(mapped)] // P

    @precondition(lambda self: bool(self.live()))
    @rule(who=st.integers(0, 7), start=st.integers(0, 63), pages=st.integers(1, 4))
    def remove(self, who: int, start: int, pages: int) -> None:
        proc = self.pick(who)
        start = self.near(proc, start)
        lo, hi = start * P, (start + pages) * P
        for run in range(lo, hi, P):
            if run in proc.pages:
                proc.pages[run].kind = "removed"
                proc.present.pop(run, None)  # the zap (after the event is read)
        proc.queue.append(Remove(RunAddr(lo), RunAddr(hi)))

    @precondition(lambda self: bool(self.live()))
    @rule(who=st.integers(0, 7), start=st.integers(0, 63), pages=st.integers(1, 4))
    def unmap(self, who: int, start: int, pages: int) -> None:
        proc = self.pick(who)
        start = self.near(proc, start)
        lo, hi = start * P, (start + pages) * P
        for run in range(lo, hi, P):
            proc.pages.pop(run, None)
            proc.present.pop(run, None)
        proc.queue.append(Unmap(RunAddr(lo), RunAddr(hi)))

    @precondition(lambda self: bool(self.live()))
    @rule(
        who=st.integers(0, 7),
        old=st.integers(0, 63),
        new=st.integers(0x0E, 0x60),
        pages=st.integers(1, 4),
    )
    def remap(self, who: int, old: int, new: int, pages: int) -> None:
        proc = self.pick(who)
        old = self.near(proc, old)
        if old < new + pages and new < old + pages:
            return  # source and destination of mremap never overlap
        moving = {}
        for index in range(pages):
            run = (old + index) * P
            if run in proc.pages:
                moving[index] = (proc.pages.pop(run), proc.present.pop(run, None))
        for index in range(pages):
            run = (new + index) * P
            proc.pages.pop(run, None)
            proc.present.pop(run, None)
        for index, (page, content) in moving.items():
            run = (new + index) * P
            proc.pages[run] = page
            if content is not None:
                proc.present[run] = content
        proc.queue.append(Remap(RunAddr(old * P), RunAddr(new * P), pages * P))

    @precondition(lambda self: bool(self.live()) and len(self.procs) < 5)
    @rule(who=st.integers(0, 7))
    def fork(self, who: int) -> None:
        proc = self.pick(who)
        fd = self.next_fd
        self.next_fd += 1
        child = FakeProc(
            ProcId(f"?{fd}"),
            {run: Page(p.image, p.kind) for run, p in proc.pages.items()},
            dict(proc.present),
            adopted=False,
        )
        self.by_fd[fd] = child
        proc.queue.append(Fork(fd))

    @precondition(lambda self: not self.handed_over)
    @rule()
    def handover(self) -> None:
        self.handed_over = True
        self.execute(self.tracker.handle(HandoverComplete(ROOT), self.now))

    @rule(dt=st.sampled_from([0.001, 0.02]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.execute(self.tracker.handle(Tick(), self.now))

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def core_state_matches_the_model(self) -> None:
        for proc in self.live():
            if proc.queue:
                continue  # the core has not read what happened yet
            core = self.tracker.process(proc.name)
            assert core.state is State.LIVE
            mapped = {}
            for piece in core.map:
                for offset in range(0, piece.length, P):
                    mapped[piece.run + offset] = piece.image + offset
            assert mapped == {run: page.image for run, page in proc.pages.items()}
            for run, page in proc.pages.items():
                image = page.image
                if page.kind != "data":
                    assert image in core.zero
                elif run in proc.present:
                    assert image not in core.missing
                    assert image not in core.inflight
                else:
                    assert (
                        image in core.missing or image in core.inflight or image in core.installing
                    ), f"{run:#x} is missing but the core thinks it resident"

    def settle(self) -> None:
        """Read every queue, answer every request, let time pass, until quiet."""
        for _ in range(100):
            while self.jobs:
                self.step_job(self.jobs[0], 64)
            self.take_completions()
            for proc in self.live():
                self.read(proc)
            for request_id in sorted(self.outstanding):
                if request_id not in self.outstanding:
                    continue  # cancelled by an earlier delivery (a duplicate answered)
                lo, hi = self.outstanding.pop(request_id)
                self.deliver(request_id, lo, hi)
            self.tick(0.02)
            if not (self.outstanding or self.jobs or self.finished) and not any(
                p.queue for p in self.live()
            ):
                break

    def teardown(self) -> None:
        if not self.procs:
            return
        # (2) every blocked thread is answered once the data it needs has arrived,
        # even without the background sweep (before the handover there is none)
        self.settle()
        for proc in self.live():
            assert not proc.blocked, f"threads of {proc.name} still blocked: {proc.blocked}"
        if not self.handed_over:
            self.handover()
        self.settle()
        # (3) with the sweep, every process is eventually released
        for proc in self.procs.values():
            if proc.adopted:
                assert proc.done, f"{proc.name} never released: {self.tracker.process(proc.name)}"
                assert not proc.blocked, f"threads of {proc.name} still blocked"
        assert self.tracker.progress().fraction == 1.0
        assert self.tracker.requests_in_flight() == 0


CoreMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreMachine = CoreMachine.TestCase
