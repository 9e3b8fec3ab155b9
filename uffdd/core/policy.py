"""What to fetch next: fault-around, the background sweep, and the memory bound.

Why separate from process.py: the ordering rules (what is correct) live there; this is
the tuning (what is fast), pure and deterministic so it can be changed and benchmarked
without touching correctness. Bulk chunks grow 64 KiB -> 4 MiB as CRIU's lazy-pages
daemon's do, but a fault does not shrink them (CRIU resets to 64 KiB because its faults
share the one connection; ours have their own lane, as QEMU's post-copy does).
"""

from __future__ import annotations

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
    answered fast cut the sweep into requests of ~100 KiB (bench/README, session 7)."""
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

    def next_chunk(self, chunk: int) -> int:
        """The bulk chunk size after a bulk fetch: double, up to ``bulk_max``.

        Faults leave it alone. Shrinking it on faults (CRIU's reset, later a halving)
        kept the sweep of a process that reads all the time at small requests, and
        that process's residency 2.5x slower than an idle one's (bench/README.md)."""
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
