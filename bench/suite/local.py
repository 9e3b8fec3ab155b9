"""Scenario *local faults*: the daemon serving pages it already holds, beside C.

The daemon (``daemon_host.py --image-dir``: ``LocalImageSource``, no sweep, so every
access is a demand fault) and the C reference handler (``refhandler serve``) serve the
same workload: one random page in each of ``count`` random 64 KiB blocks (the daemon's
fault-around window, used by both, so both resolve the same faults with the same
copies). Same CPU placement for both: the handler (all daemon threads) on one CPU and
the faulting process on the same CPU or the other one. Fresh faulting process per
round; the two handlers alternate rounds so machine noise hits both alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from suite import services
from suite.build import Built
from suite.images import random_image
from suite.report import fmt, fx, table
from suite.stats import Summary, format_histogram, ratio

WINDOW = 64 << 10


@dataclass
class Side:
    latencies: list[float] = field(default_factory=list)
    faults: int = 0
    seconds: float = 0.0
    overhead_ns: list[int] = field(default_factory=list)

    def add(self, run: services.FaulterRun) -> None:
        self.latencies += run.latencies_us
        self.faults += len(run.latencies_us)
        self.seconds += run.result["touch_s"]
        self.overhead_ns.append(run.result["resident_read_ns_p50"])


def placements() -> list[tuple[str, int, int]]:
    cpus = sorted(os.sched_getaffinity(0))
    plans = [("same CPU", cpus[0], cpus[0])]
    if len(cpus) > 1:
        plans.append(("cross CPU", cpus[0], cpus[1]))
    return plans


def run(built: Built, workdir: Path, images: Path, quick: bool) -> str:
    image = random_image(images, (64 if quick else 256) << 20)
    count = 500 if quick else 2000
    rounds = 2 if quick else 4
    rows: list[list[str]] = []
    histograms: list[str] = []
    for name, fault_cpu, handler_cpu in placements():
        uffdd, ref = Side(), Side()
        timing = services.stages_file(workdir, f"local-{handler_cpu}-{fault_cpu}")
        with services.daemon(
            workdir, image_dir=image.directory, sweep=False, cpus=[handler_cpu], stages=timing
        ) as daemon:
            for index in range(rounds):
                for side, via in ((ref, None), (uffdd, daemon)):
                    command, lat = services.faulter_command(
                        built, image, workdir, f"local-{index}",
                        handler="daemon" if via else "serve", daemon=via, cpu=fault_cpu,
                        handler_cpu=None if via else handler_cpu, count=count, seed=index,
                    )  # fmt: skip
                    side.add(services.run_faulter(command, lat))
        ours, theirs = Summary.of(uffdd.latencies), Summary.of(ref.latencies)
        ours_rate, their_rate = uffdd.faults / uffdd.seconds, ref.faults / ref.seconds
        rows += [
            [name, "faults/s", fmt(ours_rate, 0), fmt(their_rate, 0),
             fx(ratio(ours_rate, their_rate)), ""],
            [name, "p50 us", fmt(ours.p50), fmt(theirs.p50),
             fx(ratio(ours.p50, theirs.p50)), "<= 2x"],
            [name, "p99 us", fmt(ours.p99), fmt(theirs.p99), fx(ratio(ours.p99, theirs.p99)), ""],
        ]  # fmt: skip
        histograms.append(f"{name}, uffdd daemon:\n{format_histogram(uffdd.latencies)}")
        histograms.append(f"{name}, C reference:\n{format_histogram(ref.latencies)}")
        overhead = sorted(uffdd.overhead_ns + ref.overhead_ns)[len(ref.overhead_ns)]
        histograms.append(f"{name}: timed read of a resident page (timer overhead) {overhead} ns")
        histograms.append(services.stages_table(timing, f"local, {name}"))
    header = (
        f"## local faults ({image.length >> 20} MiB image, {count} faults x {rounds} rounds "
        f"per side, 64 KiB fault-around, daemon serving from a local image, no sweep)"
    )
    body = table(["placement", "metric", "uffdd", "C reference", "ratio", "target"], rows)
    return "\n\n".join(part for part in [header, body, *histograms] if part)
