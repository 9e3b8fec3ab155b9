"""Fault latency histograms and per-process counters, for status reports and benchmarks.

Why power-of-two buckets: like QEMU's postcopy latency histogram, a fixed set of ~40
counters covers 1 us to hours with bounded error, costs O(1) per fault and merges by
addition; percentiles are reported as the upper bound of the bucket that holds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_BUCKETS = 40  # bucket i holds [2**i, 2**(i+1)) microseconds; bucket 0 also holds < 1 us


@dataclass(slots=True)
class LatencyHistogram:
    """Fault latencies (seconds in, microsecond power-of-two buckets inside)."""

    buckets: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    count: int = 0
    total: float = 0.0

    def record(self, seconds: float) -> None:
        micros = int(max(seconds, 0.0) * 1e6)
        index = min(max(micros.bit_length() - 1, 0), _BUCKETS - 1)
        self.buckets[index] += 1
        self.count += 1
        self.total += max(seconds, 0.0)

    def quantile(self, q: float) -> float | None:
        """Upper bound (seconds) of the bucket holding quantile ``q``; None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return float(2 ** (index + 1)) / 1e6
        return float(2**_BUCKETS) / 1e6  # pragma: no cover - unreachable: seen == count

    def merge(self, other: LatencyHistogram) -> None:
        for index, n in enumerate(other.buckets):
            self.buckets[index] += n
        self.count += other.count
        self.total += other.total


@dataclass(slots=True)
class ProcessStats:
    """Counters of one process, updated by the core as it decides."""

    started: float
    data_total: int = 0
    """Bytes of image data the process needed when adopted (or forked)."""
    data_installed: int = 0
    """Bytes of image data installed by Copy."""
    data_dropped: int = 0
    """Bytes no longer needed before they were installed (removed or unmapped)."""
    data_missing_at_end: int = 0
    """Bytes still missing when the process exited or was killed (0 once released)."""
    faults: int = 0
    """Page faults read (duplicates included)."""
    zero_fills: int = 0
    fetched: int = 0
    """Bytes requested from the page server."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    finished: float | None = None


@dataclass(frozen=True, slots=True)
class ProcessSummary:
    """A snapshot of one process's progress, for logs, status and benchmarks."""

    proc: str
    state: str
    pages: int
    """Lazy pages still mapped (any state)."""
    bytes_total: int
    bytes_resident: int
    bytes_missing: int
    """Image data not yet installed; once the process ended, what it still missed then."""
    faults: int
    zero_fills: int
    bytes_fetched: int
    latency_p50: float | None
    latency_p99: float | None
    latency_buckets: tuple[int, ...]
    time_to_resident: float | None
    """Seconds from adoption to release, once released (None before)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Bytes of image data installed over bytes needed, across processes."""

    bytes_resident: int
    bytes_total: int

    @property
    def fraction(self) -> float:
        return 1.0 if self.bytes_total == 0 else self.bytes_resident / self.bytes_total
