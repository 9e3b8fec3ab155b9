"""The benchmark suite's own pieces: statistics, and the C references build and serve.

Why in CI: the full benchmark is too long and too noisy for the test suite, but its
statistics must be right and its C sources must compile (-Werror) on a fresh machine;
one tiny faulting run against the C reference checks the whole measuring chain.
"""

from __future__ import annotations

import array
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from suite import services
from suite.build import build
from suite.images import random_image
from suite.procs import Memory
from suite.restart import _measure
from suite.stats import Summary, percentile, pow2_histogram, ratio


def test_percentiles_are_nearest_rank() -> None:
    ordered = [float(v) for v in range(1, 101)]
    assert percentile(ordered, 50) == 50.0
    assert percentile(ordered, 99) == 99.0
    assert percentile(ordered, 100) == 100.0
    assert math.isnan(percentile([], 50))
    summary = Summary.of([3.0, 1.0, 2.0])
    assert (summary.count, summary.p50, summary.max, summary.total) == (3, 2.0, 3.0, 6.0)


def test_histogram_uses_power_of_two_microsecond_buckets() -> None:
    # Bucket bound b holds [b/2, b); below 1 us goes to bound 1.
    assert pow2_histogram([0.3, 1.0, 1.9, 2.0, 3.9, 4.0, 100.0]) == {1: 1, 2: 2, 4: 2, 8: 1, 128: 1}
    assert math.isnan(ratio(1.0, 0.0))
    assert ratio(3.0, 1.5) == 2.0


@pytest.mark.timeout(60)
def test_c_references_build_and_serve_a_tiny_run(tmp_path: Path) -> None:
    built = build(tmp_path / "build")
    assert built.refhandler.exists()
    assert built.faulter.exists()
    image = random_image(tmp_path / "images", 1 << 20)
    command, lat = services.faulter_command(
        built, image, tmp_path, "smoke", handler="serve", count=8
    )
    run = services.run_faulter(command, lat, timeout=30)
    assert len(run.latencies_us) == 8
    assert run.result["reference"]["faults"] == 8
    assert run.result["mismatches"] == 0


def test_a_restart_pause_ends_with_the_first_demand_fault_after_the_reaping(
    tmp_path: Path,
) -> None:
    # (start s, latency us): a fault before the kill; one the dying daemon served after
    # the kill but before it was reaped; a resident read; the blocked fault; one more.
    accesses = [(9.0, 100.0), (9.99, 15000.0), (10.006, 1.0), (10.007, 493000.0), (10.6, 50.0)]
    stamps = tmp_path / "stamps.bin"
    stamps.write_bytes(array.array("Q", (round(s * 1e9) for s, _ in accesses)).tobytes())
    memory = Memory(rss=3, pss=2, private=1)
    measured = _measure(
        stamps, [us for _, us in accesses], killed=10.0, dead=10.006,
        socket_ms=1.0, resumed_ms=2.0, keeper_ms=3.0, daemon=memory, twin=memory,
    )  # fmt: skip
    assert measured.pause_ms == pytest.approx(500.0, abs=0.01)
    assert measured.longest_ms == pytest.approx(493.0)
    assert measured.read_before_kill == 1
    assert (measured.before.count, measured.before.p50) == (1, 100.0)
    assert (measured.after.count, measured.after.p50) == (1, 50.0)
