"""Latency summaries: percentiles and power-of-two microsecond histograms.

Why power-of-two buckets: QEMU's post-copy reports its fault latency that way, so
numbers from uffdd compare with other tools at a glance. Bucket ``k`` holds latencies
in ``[2^(k-1), 2^k)`` us (bucket 0: below 1 us), printed by their upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Latencies of one run, in microseconds."""

    count: int
    p50: float
    p99: float
    max: float
    total: float
    """Sum of all latencies: the time the faulting thread spent blocked."""

    @classmethod
    def of(cls, latencies_us: Sequence[float]) -> Summary:
        if not latencies_us:
            return cls(0, math.nan, math.nan, math.nan, 0.0)
        ordered = sorted(latencies_us)
        return cls(
            len(ordered),
            percentile(ordered, 50),
            percentile(ordered, 99),
            ordered[-1],
            math.fsum(ordered),
        )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def pow2_histogram(latencies_us: Sequence[float]) -> dict[int, int]:
    """Counts per bucket, keyed by the bucket's upper bound in us (1, 2, 4, ...)."""
    counts: dict[int, int] = {}
    for value in latencies_us:
        bound = 1 if value < 1 else 1 << (int(value).bit_length())
        counts[bound] = counts.get(bound, 0) + 1
    return dict(sorted(counts.items()))


def format_histogram(latencies_us: Sequence[float], width: int = 40) -> str:
    """One line per non-empty bucket: ``<= 64 us   1234  12.3 %  #####``."""
    histogram = pow2_histogram(latencies_us)
    total = sum(histogram.values()) or 1
    peak = max(histogram.values(), default=1)
    lines = []
    for bound, count in histogram.items():
        bar = "#" * max(1, round(width * count / peak))
        lines.append(f"  < {bound:>7} us {count:>8} {100 * count / total:5.1f} %  {bar}")
    return "\n".join(lines)


def ratio(measured: float, reference: float) -> float:
    """measured / reference (nan if the reference is zero or missing)."""
    if not reference or math.isnan(reference) or math.isnan(measured):
        return math.nan
    return measured / reference
