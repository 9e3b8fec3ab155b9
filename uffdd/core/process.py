"""One lazily restored process: ``LazyProcess.handle(event, now) -> list[Action]``.

Why here: this is where the ordering rules live, and only here. Page states are kept
per image address (the map from run-time to image addresses is injective within one
process), as interval sets that partition the mapped lazy pages:

- ``missing``    DATA in the image, not requested yet;
- ``inflight``   DATA requested (a fetch is outstanding and this process still wants it);
- ``installing`` DATA arrived; a Copy is outstanding or deferred (EAGAIN);
- ``zero``       ZERO in the image, or REMOVED by madvise: faults get a ZeroFill, and
                 snapshot data is never installed there again (terminal state);
- resident       everything else that is mapped (installed, or found present).

Unmapped pages (GONE) are not in the map at all, and drop out of every set.

A shell may also answer faults itself, in C: the core delegates (a ``Delegate`` action
whenever the tables change) ``fast_ranges()``, where image data is the right answer,
and ``zero_ranges()``, where zeros are, to be answered under ``Policy.fault_plan``; the
shell never answers a fault read together with a layout event, and reports what it
installed as ``FastServed``.

The shell contract (see ``actions.py``): actions of a process are executed in order and
every install outcome is fed back before that process's next uffd batch with a layout
event in it. So when a kernel event is handled no install is half-way; only *deferred*
installs exist, and they are re-derived from the current state when retried, which is
what makes REMOVE, UNMAP and REMAP during an EAGAIN deferral safe. Faults read while a
copy is outstanding find its pages ``installing`` and wait for its outcome, which
wakes them.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from uffdd.core.actions import (
    Action,
    AdoptChild,
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
from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr, page_floor
from uffdd.core.events import (
    EventsDrained,
    Exited,
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
    TreeData,
    Unmap,
)
from uffdd.core.policy import Policy
from uffdd.core.ranges import Piece, RangeSet, RegionMap
from uffdd.core.stats import ProcessStats, ProcessSummary

ProcessInput = (
    PageFault
    | Fork
    | Remap
    | Remove
    | Unmap
    | PagesArrived
    | TreeData
    | Tick
    | InstallOutcome
    | FastServed
    | EventsDrained
    | HandoverComplete
    | Exited
)
"""Every event one process reacts to."""


class State(enum.Enum):
    LIVE = "live"
    RELEASED = "released"
    """Fully resident; the uffd was released."""
    EXITED = "exited"
    KILLED = "killed"


@dataclass(frozen=True, slots=True)
class LazyRegion:
    """A lazy range of a process as handed over: where it is now, where in the image."""

    run: RunAddr
    image: ImageAddr
    length: int
    page_size: int = PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a restarted daemon must know to serve a process right, written down after
    every layout change: where each lazy piece is now and where it is in the image, and
    which image pages read zeros for good (the image's ZERO extents and every range a
    REMOVE dropped). What is resident is not kept: the kernel knows it (a copy over a
    present page answers EEXIST), and the shell may say so up front (``resident``)."""

    pieces: tuple[LazyRegion, ...]
    zero: tuple[tuple[int, int], ...]
    handed_over: bool
    forks: int = 0
    """Fork children named so far (a later child's name must not repeat one)."""


class IdSource:
    """Request and install ids, unique across a tracker (shared by its processes)."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        self._next += 1
        return self._next


class _Kind(enum.Enum):
    COPY = "copy"
    ZERO = "zero"


@dataclass(frozen=True, slots=True)
class _Install:
    """An install the core asked for (outstanding) or must ask for again (deferred)."""

    kind: _Kind
    run: int
    length: int
    page_size: int
    image: int = 0
    data: object = None
    data_base: int = 0
    """The image address of ``data[0]``."""
    dontwake: bool = False
    attempts: int = 0
    """Consecutive LAYOUT_CHANGED answers (a kill after ``Policy.max_layout_retries``)."""


class LazyProcess:
    """The state and rules of one process; drive it through :class:`~.tracker.Tracker`.

    Standalone use (tests) works too; then fetch cancellation and routing of arrivals
    to fork children are the caller's business.
    """

    def __init__(
        self,
        proc: ProcId,
        image_id: str,
        regions: tuple[LazyRegion, ...] | list[LazyRegion],
        data: tuple[tuple[int, int], ...] | list[tuple[int, int]],
        now: float,
        *,
        policy: Policy | None = None,
        ids: IdSource | None = None,
        handed_over: bool = False,
    ) -> None:
        """``data``: the (image address, length) extents the image stores; every other
        page of ``regions`` reads as zeros."""
        self.proc = proc
        self.image_id = image_id
        self.policy = policy or Policy()
        self._ids = ids or IdSource()
        self.state = State.LIVE
        self.handed_over = handed_over
        self.map = RegionMap()
        self.missing: RangeSet[ImageAddr] = RangeSet()
        self.inflight: RangeSet[ImageAddr] = RangeSet()
        self.installing: RangeSet[ImageAddr] = RangeSet()
        self.zero: RangeSet[ImageAddr] = RangeSet()
        self.requests: dict[int, tuple[ImageAddr, int]] = {}
        """Requests this process waits for: id -> (image start, image end)."""
        self._by_start: list[tuple[int, int]] = []
        """(start, request id) of every request in ``requests``, sorted: which requests
        a span touches, without a scan (the demand thread reports a span per fault)."""
        self._longest = 0
        """The longest request so far: how far before a span one may start."""
        self.ended_requests: list[int] = []
        """Ids dropped from ``requests`` since the tracker last took this list (so it
        need not compare every request after every event)."""
        self._urgent: set[int] = set()
        """Ids of ``requests`` sent on the urgent lane."""
        self._installs: dict[int, _Install] = {}
        # Zero fills outside every piece that failed as a whole (they crossed the end of
        # the mapping, which the core cannot see): run -> the shorter length to try next.
        self._gap_retry: dict[int, int] = {}
        self._deferred: list[_Install] = []
        self._deferred_since: float | None = None
        self._waiters: dict[int, list[float]] = {}
        """Run-time page -> times of the faults blocked on it (stamped by the shell)."""
        self._chunk = self.policy.bulk_min
        self._forks = 0
        self._born: list[LazyProcess] = []
        self._delegation_stale = True
        """The tables a shell answers faults from in C changed (a Delegate is owed)."""
        self.unseen_batch = False
        """Set by the tracker while the shell holds a batch read from this process's
        uffd that the core has not seen (no release until it has)."""
        self.sweep_held = False
        """Set by the tracker while the parent sweeps what this fork child misses too
        (its arrivals reach the child as TreeData): one transfer for the whole tree."""
        self.stats = ProcessStats(started=now)
        stored: RangeSet[ImageAddr] = RangeSet((start, start + length) for start, length in data)
        for region in regions:
            self._add_region(region, stored)
        self.stats.data_total = self.missing.total

    @classmethod
    def resumed(
        cls,
        proc: ProcId,
        image_id: str,
        checkpoint: Checkpoint,
        now: float,
        *,
        resident: Sequence[tuple[int, int]] = (),
        policy: Policy | None = None,
        ids: IdSource | None = None,
    ) -> LazyProcess:
        """A process taken back from a daemon that died: ``checkpoint``'s layout and
        zeros; every other mapped page is missing unless ``resident`` (run-time spans
        the shell found present) covers it."""
        process = cls(
            proc, image_id, (), (), now, policy=policy, ids=ids, handed_over=checkpoint.handed_over
        )
        for region in checkpoint.pieces:
            process._add_region(region, RangeSet([(region.image, region.image + region.length)]))
        zero: RangeSet[ImageAddr] = RangeSet(checkpoint.zero)
        for lo, hi in list(zero.spans()):
            process.missing.discard(lo, hi)
        process.zero = zero
        for start, end in resident:
            for piece in process.map.pieces_in_run(start, end):
                process.missing.discard(piece.image, piece.image_end)
        process.stats.data_total = process.missing.total
        process._forks = checkpoint.forks
        return process

    def checkpoint(self) -> Checkpoint:
        """The layout and the zeros a restarted daemon needs (see :class:`Checkpoint`)."""
        return Checkpoint(
            pieces=tuple(
                LazyRegion(piece.run, piece.image, piece.length, piece.page_size)
                for piece in self.map
            ),
            zero=tuple((int(lo), int(hi)) for lo, hi in self.zero.spans()),
            handed_over=self.handed_over,
            forks=self._forks,
        )

    def _add_region(self, region: LazyRegion, stored: RangeSet[ImageAddr]) -> None:
        size = region.page_size
        if size <= 0 or size % PAGE_SIZE or size & (size - 1):
            raise ValueError(f"page size {size} is not a power-of-two multiple of {PAGE_SIZE}")
        if region.run % size or region.image % size or region.length % size:
            raise ValueError(f"region {region} is not aligned to its page size")
        if self.map.pieces_in_image(region.image, region.image + region.length):
            raise ValueError(f"region {region} overlaps another region's image range")
        self.map.insert(Piece(region.run, region.image, region.length, size))
        start, end = region.image, region.image + region.length
        cursor = start  # built in ascending order: appends, no hole punching
        for lo, hi in stored.intersect(start, end):
            if lo % size or hi % size:
                raise ValueError(f"data {lo:#x}..{hi:#x} splits a page of {region}")
            self.zero.add(cursor, lo)
            self.missing.add(lo, hi)
            cursor = hi
        self.zero.add(cursor, end)

    # -- the entry point ---------------------------------------------------------------

    def handle(self, event: ProcessInput, now: float) -> list[Action]:
        """Apply one event; return what the shell must do, in order."""
        return self.handle_batch([event], now)

    def handle_batch(self, events: Sequence[ProcessInput], now: float) -> list[Action]:
        """Apply events read together (one read() of the uffd), in order.

        Faults are recorded in order but *answered* after the whole batch: the shell
        executes the actions only after the batch, when every later event of the batch
        has happened in the kernel. A ZeroFill decided for a fault before a REMAP read in
        the same batch could otherwise land on data the remap moved there.
        """
        out: list[Action] = []
        faulted: list[int] = []
        for event in events:
            if self.state is not State.LIVE:
                break  # late events for a finished process are moot
            if isinstance(event, PageFault):
                faulted.append(self._fault(event.address, now))
            else:
                self._apply(event, now, out)
        if self.state is State.LIVE:
            # Waiters woken meanwhile (remap, unmap, remove) fault again if they must.
            for page in dict.fromkeys(faulted):
                if page in self._waiters:
                    self._resolve(page, now, out)
            self._pump(now, out)
        self._delegate(out)
        return out

    def _delegate(self, out: list[Action]) -> None:
        """Give the shell its new tables (once per batch, after every event of it). A
        process that ended is released or killed: the shell drops what it delegated."""
        if self._delegation_stale and self.state is State.LIVE:
            self._delegation_stale = False
            out.append(Delegate(self.proc))

    def _apply(self, event: ProcessInput, now: float, out: list[Action]) -> None:
        if isinstance(event, Remove | Unmap | Remap | Fork):
            self._delegation_stale = True
        if isinstance(event, PagesArrived):
            self._arrived(event, out)
        elif isinstance(event, TreeData):
            self._tree_data(event, out)
        elif isinstance(event, InstallOutcome):
            self._outcome(event, now, out)
        elif isinstance(event, FastServed):
            self._fast_served(event, now, out)
        elif isinstance(event, Remove):
            self._remove(event.start, event.end, out)
        elif isinstance(event, Unmap):
            self._wake_waiters(event.start, event.end, out)
            self._forget(self.map.drop(event.start, event.end))
        elif isinstance(event, Remap):
            # Threads blocked at the old (or displaced) addresses wait on addresses
            # that no longer hold these pages: wake them so they retry and fault anew.
            self._wake_waiters(event.old, event.old + event.length, out)
            self._wake_waiters(event.new, event.new + event.length, out)
            _, displaced = self.map.move(event.old, event.new, event.length)
            self._forget(displaced)
        elif isinstance(event, Fork):
            child = self._spawn(now)
            self._born.append(child)
            out.append(AdoptChild(self.proc, child.proc, event.child_fd))
        elif isinstance(event, EventsDrained):
            self._retry_deferred(now, out)
        elif isinstance(event, Tick):
            if (
                self._deferred_since is not None
                and now - self._deferred_since >= self.policy.retry_interval
            ):
                self._retry_deferred(now, out)
        elif isinstance(event, HandoverComplete):
            self.handed_over = True
        elif isinstance(event, Exited):
            self._finish(State.EXITED, now)
            out.append(Release(self.proc, exited=True))

    def kill(self, reason: str, now: float) -> list[Action]:
        """Give up on this process: it must die rather than read wrong memory."""
        if self.state is not State.LIVE:
            return []
        self._finish(State.KILLED, now)
        return [Kill(self.proc, reason)]

    def pump(self, now: float) -> list[Action]:
        """Start background fetches the budget allows; release when fully resident."""
        out: list[Action] = []
        if self.state is State.LIVE:
            self._pump(now, out)
        self._delegate(out)
        return out

    def take_child(self, child: ProcId) -> LazyProcess:
        """The child that a Fork event created (once; for the tracker to adopt)."""
        for index, born in enumerate(self._born):
            if born.proc == child:
                return self._born.pop(index)
        raise KeyError(child)

    def fast_ranges(self) -> list[tuple[RunAddr, ImageAddr, int]]:
        """Where a fault's right answer is the image's data: (run, image, length), in
        run-time order.

        Mapped 4 KiB pages outside ``zero`` (not known-zero, not removed); the shell's
        fast path installs image data for faults there without asking the core.
        Resident pages are included: the kernel never reports a fault on a present
        page, and a stale fault only finds it present (EEXIST). It changes only where
        a ``Delegate`` action says so.
        """
        if self.state is not State.LIVE:
            return []
        out: list[tuple[RunAddr, ImageAddr, int]] = []
        for piece in self.map:
            if piece.page_size != PAGE_SIZE:
                continue
            cursor = piece.image
            for lo, hi in self.zero.intersect(piece.image, piece.image_end):
                if cursor < lo:
                    out.append((piece.to_run(cursor), ImageAddr(cursor), lo - cursor))
                cursor = hi
            if cursor < piece.image_end:
                out.append((piece.to_run(cursor), ImageAddr(cursor), piece.image_end - cursor))
        return out

    def zero_ranges(self) -> list[tuple[RunAddr, int]]:
        """Where a fault's right answer is zeros: (run, length), in run-time order.

        Mapped 4 KiB pages inside ``zero`` (ZERO in the image, or removed by madvise);
        a shell's fast path may zero-fill faults there, as the core's ZeroFill would,
        and report them in ``FastServed``. Recompute it with :meth:`fast_ranges`.
        """
        if self.state is not State.LIVE:
            return []
        return [
            (piece.to_run(lo), hi - lo)
            for piece in self.map
            if piece.page_size == PAGE_SIZE
            for lo, hi in self.zero.intersect(piece.image, piece.image_end)
        ]

    def _fast_served(self, event: FastServed, now: float, out: list[Action]) -> None:
        """The shell's fast path installed image data: those pages are resident now."""
        self.stats.faults += event.faults
        for _ in range(event.faults):
            self.stats.latency.record((event.answered_at or now) - event.read_at)
        dropped: list[tuple[int, int]] = []
        for run, length in event.installs:
            for piece in self.map.pieces_in_run(run, run + length):
                lo, hi = piece.image, piece.image_end
                taken = self.inflight.discard(lo, hi) + self.installing.discard(lo, hi)
                self.stats.data_installed += self.missing.discard(lo, hi) + taken
                if taken:
                    dropped.append((lo, hi))
            # The copy woke every thread blocked in the range.
            self._wake_waiters(run, run + length, out, now=now, emit=False)
        if dropped:
            self._prune_requests(dropped)  # arrivals for these pages are moot now

    # -- faults ------------------------------------------------------------------------

    def _fault(self, address: int, now: float) -> int:
        """Record a blocked thread (answered at the end of the batch); its page."""
        self.stats.faults += 1
        piece = self.map.lookup(address)
        size = piece.page_size if piece else PAGE_SIZE
        page = page_floor(address, size)
        self._waiters.setdefault(page, []).append(now)
        return page

    def _resolve(self, page: int, now: float, out: list[Action]) -> None:
        """Decide for a run-time page a thread waits on, by the page's state."""
        piece = self.map.lookup(page)
        if piece is None:
            # Not a lazy page (any more): a stale fault on an unmapped address (the
            # ZeroFill fails with ENOENT and we wake it), or memory that grew (mremap,
            # brk) and was never in the image (zeros are right, as for CRIU). Grown
            # memory is read page after page too, so fill forward to the end of the
            # fault-around block, short of the next lazy piece.
            if not self._zero_fill_covers(page):
                self._zero_fill(page, PAGE_SIZE, out, length=self._gap_end(page) - page)
            return
        image = piece.to_image(page)
        if image in self.zero:
            if self._zero_fill_covers(page):
                return  # a fill on its way wakes this thread too
            # Fault-around for zeros too: a madvise'd or sparse span is read page after
            # page, and one fill per fault cost the 1 GiB demo seconds.
            lo, hi = self.policy.fault_window(
                image, piece.page_size, piece.image, piece.image_end, self.zero
            )
            self._zero_fill(piece.to_run(lo), piece.page_size, out, length=hi - lo)
        elif image in self.missing:
            lo, hi = self.policy.fault_window(
                image, piece.page_size, piece.image, piece.image_end, self.missing
            )
            self._fetch(lo, hi, Priority.URGENT, out)
        elif image in (bulk_only := self._bulk_only()):
            # Only the background sweep asked for it, and a bulk answer may sit behind
            # megabytes of queued data: ask again on the urgent lane (never for pages an
            # urgent request covers already). Whichever answer comes first is
            # installed; the other finds the pages no longer in flight.
            lo, hi = self.policy.fault_window(
                image, piece.page_size, piece.image, piece.image_end, bulk_only
            )
            self._request(lo, hi, Priority.URGENT, out)
        elif image in self.installing:
            # The pending copy wakes it; if a thread of the shell runs that copy behind
            # others, it goes first.
            out.append(Expedite(self.proc, RunAddr(page)))
        elif image in self.inflight:
            pass  # the arrival's copy wakes it; a duplicate fault never fetches twice
        else:
            # Resident already: the fault was queued before our copy landed.
            self._wake_waiters(page, page + piece.page_size, out, now=now)

    def _gap_end(self, page: int) -> int:
        """Where a zero fill from ``page``, outside every piece, stops."""
        if page in self._gap_retry:
            return page + self._gap_retry[page]
        block = max(self.policy.fault_around, PAGE_SIZE)
        end = page - page % block + block
        following = self.map.pieces_in_run(page, end)
        if following:
            end = min(end, following[0].run)
        return max(end, page + PAGE_SIZE)

    def _zero_fill_covers(self, page: int) -> bool:
        return any(
            i.kind is _Kind.ZERO and i.run <= page < i.run + i.length
            for i in self._installs.values()
        )

    def _zero_fill(
        self, page: int, size: int, out: list[Action], *, length: int | None = None
    ) -> None:
        """Fill ``length`` bytes (default: one page of ``size``) from run ``page``."""
        length = size if length is None else length
        install = _Install(_Kind.ZERO, page, length, size)
        install_id = self._ids()
        self._installs[install_id] = install
        out.append(ZeroFill(self.proc, install_id, RunAddr(page), length, size))

    # -- fetching ----------------------------------------------------------------------

    def _fetch(self, start: int, end: int, priority: Priority, out: list[Action]) -> None:
        self.missing.discard(start, end)
        self.inflight.add(start, end)
        self._request(start, end, priority, out)

    def _request(self, start: int, end: int, priority: Priority, out: list[Action]) -> None:
        request_id = self._ids()
        self.requests[request_id] = (ImageAddr(start), end)
        bisect.insort(self._by_start, (start, request_id))
        self._longest = max(self._longest, end - start)
        if priority is Priority.URGENT:
            self._urgent.add(request_id)
        self.stats.fetched += end - start
        out.append(
            Fetch(request_id, self.image_id, ImageAddr(start), end - start, priority, self.proc)
        )

    def _bulk_only(self) -> RangeSet[ImageAddr]:
        """Pages in flight that no outstanding urgent request covers."""
        self._urgent &= self.requests.keys()  # forget answered or dropped requests
        pages = self.inflight.copy()
        for request_id in self._urgent:
            pages.discard(*self.requests[request_id])
        return pages

    def _pump(self, now: float, out: list[Action]) -> None:
        """Background sweep: lowest missing image pages first, within the budget."""
        while self.policy.sweep and self.handed_over and not self.sweep_held and self.missing:
            first = self.missing.first()
            assert first is not None
            piece = self.map.lookup_image(first[0])
            assert piece is not None, "a missing page outside the map"
            # The walk stops a chunk on: past it is work the next request redoes, and
            # after a madvise over a sparse span the walk would cross thousands of
            # gaps on every arrival (the 1 GiB demo's sweep stalled on it).
            limit = min(piece.image_end, first[0] + self._chunk)
            in_flight = self.inflight.total + self.installing.total
            if in_flight:
                # A span longer than the budget's room gets no window (bulk_window),
                # so the walk need not look further: with the budget spent, every
                # event walked a whole chunk of zero gaps only to learn that (a sparse
                # image, or pages around a madvise; the 1 GiB demo's madvise phase).
                room = self.policy.max_in_flight - in_flight
                if room < piece.page_size:
                    break
                limit = min(limit, first[0] + room + piece.page_size)
            span = (first[0], self._sweep_end(first[0], limit))
            window = self.policy.bulk_window(span, piece.page_size, self._chunk, in_flight)
            if window is None:
                break
            # Only the missing pages go in flight; the zero pages between them come
            # back as zero runs, which no install takes.
            parts = self.missing.intersect(*window)
            for start, end in parts:
                self.missing.discard(start, end)
                self.inflight.add(start, end)
            self._request(window[0], parts[-1][1], Priority.BULK, out)
            self._chunk = self.policy.next_chunk(self._chunk)
        self._maybe_release(now, out)

    def _sweep_end(self, start: int, limit: int) -> int:
        """How far one bulk request from missing ``start`` may reach: across gaps the
        image knows to be zero (a sparse image would otherwise cost a request per
        isolated page) and short runs of resident pages (``Policy.resident_gap``),
        never over pages in flight or installing."""
        end = start
        while end < limit:
            span = self.missing.span_at(end)
            if span is not None:
                end = min(span[1], limit)
                continue
            gap = self.zero.span_at(end)
            if gap is not None and gap[1] < limit and gap[1] in self.missing:
                end = gap[1]
                continue
            ahead = self.missing.intersect(end, min(limit, end + self.policy.resident_gap + 1))
            if not ahead:
                break
            after = ahead[0][0]
            if self.inflight.overlaps(end, after) or self.installing.overlaps(end, after):
                break
            end = after
        return end

    def _maybe_release(self, now: float, out: list[Action]) -> None:
        # Only when nothing is missing, in flight, being installed or deferred: closing
        # the uffd makes every later fault read zeros, which is right only for pages
        # that the image says are zero or that were removed.
        if (
            self.handed_over
            and not self.unseen_batch
            and not self.missing
            and not self.inflight
            and not self.installing
            and not self._installs
            and not self._deferred
        ):
            self._finish(State.RELEASED, now)
            out.append(Release(self.proc))

    # -- data arrives ------------------------------------------------------------------

    def _arrived(self, event: PagesArrived, out: list[Action]) -> None:
        request = self.requests.get(event.request_id)
        if request is None:
            return  # late or duplicate data: nothing waits for it here
        lo, hi = event.image_addr, event.image_addr + event.length
        if lo < request[0] or hi > request[1]:
            raise ValueError(f"data {lo:#x}+{event.length:#x} outside request {event.request_id}")
        # Only pages still in flight take the data: a page removed, unmapped, or already
        # installed by an earlier (duplicate) arrival keeps what it has.
        for start, end in self.inflight.intersect(lo, hi):
            self.inflight.discard(start, end)
            self.installing.add(start, end)
            self._install_copy(start, end, event.data, lo, attempts=0, out=out)
        if not self.inflight.overlaps(*request):
            self._end_request(event.request_id)

    def _tree_data(self, event: TreeData, out: list[Action]) -> None:
        """Install a relative's data into the pages this process still misses."""
        lo, hi = event.image_addr, event.image_addr + event.length
        for start, end in self.missing.intersect(lo, hi):
            for piece in self.map.pieces_in_image(start, end):
                if piece.page_size != PAGE_SIZE:
                    continue  # a huge page may be cut by the chunk: its own fetch does it
                self.missing.discard(piece.image, piece.image_end)
                self.installing.add(piece.image, piece.image_end)
                self._install_copy(
                    piece.image, piece.image_end, event.data, lo, attempts=0, out=out
                )

    def _install_copy(
        self,
        start: int,
        end: int,
        data: object,
        data_base: int,
        *,
        attempts: int,
        out: list[Action],
    ) -> None:
        # Translate at issue time, so data for a range moved by mremap goes to its new
        # run-time address; one Copy per mapping piece.
        for piece in self.map.pieces_in_image(start, end):
            dontwake = not self._has_waiters(piece.run, piece.run_end)
            install = _Install(
                _Kind.COPY,
                piece.run,
                piece.length,
                piece.page_size,
                piece.image,
                data,
                data_base,
                dontwake,
                attempts,
            )
            install_id = self._ids()
            self._installs[install_id] = install
            out.append(
                Copy(
                    self.proc,
                    install_id,
                    piece.run,
                    piece.image,
                    piece.length,
                    data,
                    piece.image - data_base,
                    dontwake,
                    piece.page_size,
                )
            )

    # -- install outcomes --------------------------------------------------------------

    def _outcome(self, event: InstallOutcome, now: float, out: list[Action]) -> None:
        install = self._installs.pop(event.install_id, None)
        if install is None:
            return
        if event.result is InstallResult.GONE:
            self._finish(State.EXITED, now)
            out.append(Release(self.proc, exited=True))
            return
        size = install.page_size
        done = install.length if event.result is InstallResult.DONE else event.done
        done = max(0, min(done, install.length))
        done -= done % size
        if done:
            self._installed(install, 0, done, now, out)
        if done == install.length:
            return
        if event.result is InstallResult.EXISTS:
            # The first page not done is present already: resident; go on after it.
            self._installed(install, done, size, now, out, woken=False)
            if done + size < install.length:
                self._reissue(install, done + size, out)
        elif event.result is InstallResult.RETRY:
            if done:
                self._reissue(install, done, out)  # progress made: retry the rest now
            else:
                self._defer(install, done, now)  # queued events: after they are read
        elif install.kind is _Kind.ZERO:
            # LAYOUT_CHANGED for a zero fill: the address is not ours any more; let the
            # thread retry (it faults again if the address is still registered).
            if not done and install.length > PAGE_SIZE and self.map.lookup(install.run) is None:
                # past the mapping's end: half as far next time (a page at least)
                half = install.length // 2
                self._gap_retry[install.run] = max(half - half % PAGE_SIZE, PAGE_SIZE)
            self._wake_waiters(install.run + done, install.run + install.length, out)
        elif install.attempts + 1 > self.policy.max_layout_retries:
            self._finish(State.KILLED, now)
            out.append(
                Kill(
                    self.proc,
                    f"UFFDIO_COPY to {install.run + done:#x} keeps failing with ENOENT",
                )
            )
        else:
            self._defer(replace(install, attempts=install.attempts + 1), done, now)

    def _installed(
        self,
        install: _Install,
        offset: int,
        length: int,
        now: float,
        out: list[Action],
        *,
        woken: bool = True,
    ) -> None:
        """``length`` bytes from ``offset`` of ``install`` are in place."""
        run = install.run + offset
        if install.kind is _Kind.COPY:
            image = install.image + offset
            self.stats.data_installed += self.installing.discard(image, image + length)
        else:
            self.stats.zero_fills += 1
        # The kernel woke the range unless DONTWAKE (or the page was found present).
        kernel_woke = woken and not install.dontwake
        self._wake_waiters(run, run + length, out, now=now, emit=not kernel_woke)

    def _reissue(self, install: _Install, offset: int, out: list[Action]) -> None:
        if install.kind is _Kind.COPY:
            image = install.image + offset
            for start, end in self.installing.intersect(image, install.image + install.length):
                self._install_copy(start, end, install.data, install.data_base, attempts=0, out=out)
        else:
            self._zero_fill(
                install.run + offset, install.page_size, out, length=install.length - offset
            )

    def _defer(self, install: _Install, offset: int, now: float) -> None:
        if install.kind is _Kind.COPY:
            install = replace(
                install,
                run=install.run + offset,
                image=install.image + offset,
                length=install.length - offset,
            )
        if self._deferred_since is None:
            self._deferred_since = now
        self._deferred.append(install)

    def _retry_deferred(self, now: float, out: list[Action]) -> None:
        deferred, self._deferred = self._deferred, []
        self._deferred_since = None
        for install in deferred:
            if install.kind is _Kind.COPY:
                # Re-derive from the current state: pages removed or unmapped meanwhile
                # are no longer installing, and a remap changed where they go.
                for start, end in self.installing.intersect(
                    install.image, install.image + install.length
                ):
                    self._install_copy(
                        start,
                        end,
                        install.data,
                        install.data_base,
                        attempts=install.attempts,
                        out=out,
                    )
            else:
                # A zero fill spans a fault-around window: every thread waiting in it
                # gets its page resolved again (overlapping fills meet EEXIST, which is
                # fine); a window with no waiter left is dropped.
                stop = install.run + install.length
                for page in sorted(p for p in self._waiters if install.run <= p < stop):
                    self._resolve(page, now, out)

    # -- layout changes ----------------------------------------------------------------

    def _remove(self, start: int, end: int, out: list[Action]) -> None:
        # Blocked threads retry and fault again: the page then reads zeros.
        self._wake_waiters(start, end, out)
        for piece in self.map.pieces_in_run(start, end):
            lo, hi = piece.image, piece.image_end
            self.stats.data_dropped += (
                self.missing.discard(lo, hi)
                + self.inflight.discard(lo, hi)
                + self.installing.discard(lo, hi)
            )
            self.zero.add(lo, hi)
        self._prune_requests()

    def _forget(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            lo, hi = piece.image, piece.image_end
            self.stats.data_dropped += (
                self.missing.discard(lo, hi)
                + self.inflight.discard(lo, hi)
                + self.installing.discard(lo, hi)
            )
            self.zero.discard(lo, hi)
        self._prune_requests()

    def _prune_requests(self, dropped: list[tuple[int, int]] | None = None) -> None:
        """End the requests none of whose pages is in flight any more; with
        ``dropped`` (the spans just taken out of flight) only requests touching one of
        them can have changed."""
        if dropped is None:
            candidates = list(self.requests)
        else:
            candidates = []
            for a, b in dropped:
                index = bisect.bisect_left(self._by_start, (a - self._longest, -1))
                while index < len(self._by_start) and self._by_start[index][0] < b:
                    request_id = self._by_start[index][1]
                    if self.requests[request_id][1] > a:
                        candidates.append(request_id)
                    index += 1
        for request_id in dict.fromkeys(candidates):
            if request_id in self.requests and not self.inflight.overlaps(
                *self.requests[request_id]
            ):
                self._end_request(request_id)

    def _end_request(self, request_id: int) -> None:
        start, _ = self.requests.pop(request_id)
        del self._by_start[bisect.bisect_left(self._by_start, (start, request_id))]
        self.ended_requests.append(request_id)

    # -- fork --------------------------------------------------------------------------

    def _spawn(self, now: float) -> LazyProcess:
        """The child of a fork: the parent's remaining lazy state, its own uffd.

        Pages installed before the fork are in the child too; pages whose install is
        deferred are not (the fork made it fail), so the child gets its own deferred
        copies of them. It waits for the parent's requests as well.
        """
        self._forks += 1
        child = LazyProcess(
            ProcId(f"{self.proc}.{self._forks}"),
            self.image_id,
            (),
            (),
            now,
            policy=self.policy,
            ids=self._ids,
            handed_over=self.handed_over,
        )
        child.map = self.map.copy()
        child.missing = self.missing.copy()
        child.inflight = self.inflight.copy()
        child.installing = self.installing.copy()
        child.zero = self.zero.copy()
        child.requests = dict(self.requests)
        child._by_start = list(self._by_start)
        child._longest = self._longest
        child._urgent = set(self._urgent)
        pending = [*self._deferred, *self._installs.values()]
        child._deferred = [
            replace(i, attempts=0, dontwake=False) for i in pending if i.kind is _Kind.COPY
        ]
        child._deferred_since = now if child._deferred else None
        child._chunk = self._chunk
        child.stats.data_total = child.missing.total + child.inflight.total + child.installing.total
        return child

    # -- helpers -----------------------------------------------------------------------

    def _has_waiters(self, start: int, end: int) -> bool:
        return any(start <= page < end for page in self._waiters)

    def _wake_waiters(
        self,
        start: int,
        end: int,
        out: list[Action],
        *,
        now: float | None = None,
        emit: bool = True,
    ) -> None:
        """Forget the waiters in ``[start, end)``; record their latency when resolved
        (``now`` given); emit a Wake unless the kernel already woke them."""
        pages = [page for page in self._waiters if start <= page < end]
        if not pages:
            return
        for page in pages:
            stamps = self._waiters.pop(page)
            if now is not None:
                for stamp in stamps:
                    self.stats.latency.record(now - stamp)
        if emit:
            lo = min(pages)
            hi = max(pages) + (self.map.lookup(max(pages)) or _DEFAULT).page_size
            out.append(Wake(self.proc, RunAddr(lo), hi - lo))

    def _finish(self, state: State, now: float) -> None:
        self.state = state
        self._delegation_stale = True
        self.stats.finished = now
        dropped = self.missing.total + self.inflight.total + self.installing.total
        if state is not State.RELEASED:
            self.stats.data_dropped += dropped
            self.stats.data_missing_at_end = dropped
        for ranges in (self.missing, self.inflight, self.installing):
            ranges.clear()
        self.ended_requests.extend(self.requests)
        self.requests.clear()
        self._by_start.clear()
        self._installs.clear()
        self._deferred.clear()
        self._deferred_since = None
        self._waiters.clear()

    @property
    def deferred(self) -> int:
        """How many installs wait for the uffd's event queue to drain."""
        return len(self._deferred)

    @property
    def next_retry(self) -> float | None:
        """When a Tick should retry deferred installs, if any are waiting."""
        if self._deferred_since is None:
            return None
        return self._deferred_since + self.policy.retry_interval

    def summary(self, now: float) -> ProcessSummary:
        stats = self.stats
        mapped = sum(p.length // p.page_size for p in self.map)
        missing = self.missing.total + self.inflight.total + self.installing.total
        if self.state is not State.LIVE:
            missing = stats.data_missing_at_end
        return ProcessSummary(
            proc=self.proc,
            state=self.state.value,
            pages=mapped,
            bytes_total=stats.data_total,
            bytes_resident=stats.data_installed,
            bytes_missing=missing,
            faults=stats.faults,
            zero_fills=stats.zero_fills,
            bytes_fetched=stats.fetched,
            latency_p50=stats.latency.quantile(0.5),
            latency_p99=stats.latency.quantile(0.99),
            latency_buckets=tuple(stats.latency.buckets),
            time_to_resident=(
                stats.finished - stats.started
                if self.state is State.RELEASED and stats.finished is not None
                else None
            ),
        )

    def __repr__(self) -> str:
        return (
            f"LazyProcess({self.proc!r}, {self.state.value}, missing={self.missing.total:#x}, "
            f"inflight={self.inflight.total:#x}, installing={self.installing.total:#x})"
        )


_DEFAULT = Piece(RunAddr(0), ImageAddr(0), 0, PAGE_SIZE)
