"""What to fetch, in what order and how big: the one home of uffdd's policy.

Why separate from process.py: the ordering rules (what is correct) live there; this is
the tuning (what is fast), pure and deterministic so it can be changed and benchmarked
without touching correctness. Bulk chunks grow 64 KiB -> 4 MiB as CRIU's lazy-pages
daemon's do, but a fault does not shrink them (CRIU resets to 64 KiB because its faults
share the one connection; ours have their own lane, as QEMU's post-copy does).

The C paths execute this policy; they never make their own. A C reader of a uffd gets
a :class:`FaultPlan` and the core's tables (``LazyProcess.fast_ranges`` and
``zero_ranges``, handed over at each ``Delegate`` action) and answers a
fault exactly as :func:`plan_fault` says (``csrc/plan.c`` is its C twin, and a test
holds the two to the same answers); the page server's C thread cuts answers into chunks
as :func:`chunk_length` says. docs/architecture.md shows where each rule runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from uffdd.core.addresses import ImageAddr
from uffdd.core.ranges import RangeSet

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Policy:
    """Tuning knobs of the core; every size is in bytes, every time in seconds."""

    fault_around: int = 64 * KiB
    """Urgent fetch window: the aligned block of this size holding the fault."""
    bulk_min: int = 64 * KiB
    bulk_max: int = 4 * MiB
    max_in_flight: int = 16 * MiB
    """Bytes a process may have requested and not yet installed, before bulk waits.
    Demand fetches are always sent (a blocked thread must not wait for the budget)."""
    resident_gap: int = 256 * KiB
    """A bulk request reaches across at most this much of resident data (demand
    windows the sweep had not got to): those bytes come again, but one request
    replaces two. Without it, a process that reads everything while its faults are
    answered fast cuts the sweep into requests of ~100 KiB."""
    urgent_deadline: float = 10.0
    bulk_deadline: float = 60.0
    """A request not answered within its deadline kills the processes waiting for it."""
    retry_interval: float = 0.05
    """Deferred installs (EAGAIN) are retried after a drain, or on a Tick this late."""
    max_layout_retries: int = 3
    """ENOENT on the same data this many times without a layout event: kill."""
    sweep: bool = True
    """Stream what no fault asked for in the background. Off: pages arrive only on
    demand and a process is never released (for benchmarks and experiments)."""
    whole_block: bool = True
    """Where an answer costs a round trip (a remote fault read in C), a data fault
    brings the rest of its ``fault_around`` block too: its other data runs fetched in
    the same round trip, its zero runs filled. Sparse memory (data pages between zero
    ones) is then one fault a block, not one a page. (:meth:`fault_plan`)"""
    thread_install_min: int = 128 * KiB
    """A background copy (no thread waits on it) this large is run by a thread of its
    own while the loop goes on reading faults; a smaller one costs less than the
    hand-off (a completion wakes the loop across CPUs)."""

    def __post_init__(self) -> None:
        for name in ("fault_around", "bulk_min", "bulk_max", "max_in_flight"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.bulk_min > self.bulk_max:
            raise ValueError("bulk_min must not exceed bulk_max")

    def fault_window(
        self, page: int, page_size: int, lo: int, hi: int, missing: RangeSet[ImageAddr]
    ) -> tuple[ImageAddr, ImageAddr]:
        """The image range to fetch urgently for a fault on missing image ``page``.

        The aligned ``fault_around`` block holding the page (at least one page), clipped
        to ``[lo, hi)`` (the mapping piece: the same region) and to the run of missing
        pages holding the fault, so nothing in flight or resident is fetched again.
        """
        size = max(self.fault_around, page_size)
        start = max(page - page % size, lo)
        end = min(start + size, hi)
        span = missing.span_at(page)
        assert span is not None, "fault_window on a page that is not missing"
        return ImageAddr(max(start, span[0])), ImageAddr(min(end, span[1]))

    def fault_plan(self, *, round_trip: bool) -> FaultPlan:
        """How a C reader answers a fault on its own: the fault's ``fault_around``
        block, and with ``whole_block`` (only where an answer costs a round trip: data
        in this host's memory comes at memory speed, the sweep brings the rest) the
        block's other runs too."""
        return FaultPlan(max(self.fault_around, 4096), self.whole_block and round_trip)

    def next_chunk(self, chunk: int) -> int:
        """The bulk chunk size after a bulk fetch: double, up to ``bulk_max``.

        Faults leave it alone. Shrinking it on faults (CRIU's reset, later a halving)
        kept the sweep of a process that reads all the time at small requests, and
        that process's residency several times slower than an idle one's."""
        return min(chunk * 2, self.bulk_max)

    def bulk_window(
        self, span: tuple[int, int], page_size: int, chunk: int, in_flight: int
    ) -> tuple[ImageAddr, ImageAddr] | None:
        """The next bulk fetch from the lowest missing ``span`` (ascending image order).

        ``span`` is already clipped to one mapping piece. None when the in-flight budget
        is spent; the first request of an idle process always goes, even if big.
        """
        start, end = span
        length = min(chunk, end - start)
        length = max(length - length % page_size, page_size)
        if in_flight and in_flight + length > self.max_in_flight:
            return None
        return ImageAddr(start), ImageAddr(start + length)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """How a fault is answered where the core is not asked: the plan a C reader of a
    uffd executes with the core's tables (see :func:`plan_fault`)."""

    block: int
    """The aligned block a fault's answer is cut from (a power of two, >= a page)."""
    whole_block: bool
    """A data fault brings its block's other data runs (fetched) and zero runs
    (filled) too, not only its own run's part of the block."""


@dataclass(frozen=True, slots=True)
class Span:
    """One part of a fault's answer: run-time ``[start, end)``, zeros or image data
    (``table``: the index of the data or zeros table row it lies in)."""

    start: int
    end: int
    zero: bool
    table: int


def plan_fault(
    plan: FaultPlan,
    data: Sequence[tuple[int, int]],
    zeros: Sequence[tuple[int, int]],
    page: int,
) -> list[Span]:
    """What a fault on run-time ``page`` gets under ``plan``, from the core's tables of
    where image data (``data``) and where zeros (``zeros``) are the right answer:
    sorted, disjoint ``(start, end)`` run-time ranges, the two tables disjoint too.

    Empty when the page is in neither table (the core decides). Otherwise the fault's
    own span comes first: its block clipped to the table row holding the page. For a
    data fault with ``whole_block``, the block's other data rows follow, each clipped
    to the block, in address order, then its zero rows likewise. A zero fault gets its
    own span only (zeros cost no round trip).
    """
    lo = page - page % plan.block
    hi = lo + plan.block
    own = _row_of(data, page)
    zero = own is None
    if zero:
        own = _row_of(zeros, page)
    if own is None:
        return []
    table = zeros if zero else data
    start, end = table[own]
    spans = [Span(max(lo, start), min(hi, end), zero, own)]
    if zero or not plan.whole_block:
        return spans
    for kind_zero, rows in ((False, data), (True, zeros)):
        # from the last row starting before the block (it may reach into it)
        for index in range(max(bisect.bisect_right(rows, (lo, lo)) - 1, 0), len(rows)):
            start, end = rows[index]
            if start >= hi:
                break
            if end <= lo or (not kind_zero and index == own):
                continue
            spans.append(Span(max(lo, start), min(hi, end), kind_zero, index))
    return spans


def _row_of(rows: Sequence[tuple[int, int]], address: int) -> int | None:
    """The index of the row of ``rows`` (sorted, disjoint) holding ``address``."""
    index = bisect.bisect_right(rows, (address, 2**64)) - 1
    if index >= 0 and rows[index][0] <= address < rows[index][1]:
        return index
    return None


def chunk_length(remaining: int, chunk_size: int, *, zero: bool) -> int:
    """How much of an extent's ``remaining`` bytes the next chunk of an answer holds:
    a ZERO extent goes whole (a chunk without data costs nothing), DATA at most
    ``chunk_size``. A chunk never crosses an extent, so every chunk is one kind and,
    for DATA, one slice of the image's data file."""
    return remaining if zero else min(chunk_size, remaining)
