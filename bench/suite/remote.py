"""Scenario *remote demand faults*: random pages of a 1 GiB image over loopback gRPC.

A faulting process reads one random page in each of ``count`` random 64 KiB blocks of
a 1 GiB image, served by the daemon from ``uffdd page-server`` on 127.0.0.1 (TCP), with
the background sweep running (production behaviour) and without it (demand only).
Accesses that took under ``FAULT_US`` found their page already resident (the sweep got
there first): they count toward time blocked but are not demand faults. Rounds
alternate between the two daemons so machine noise hits both alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from suite import services
from suite.build import Built
from suite.images import random_image
from suite.procs import usage
from suite.report import fmt, fx, table
from suite.stats import Summary, format_histogram, ratio

FAULT_US = 5.0
"""A timed read of a resident page takes ~0.5 us here; a served fault >= 20 us."""


@dataclass
class Side:
    accesses: list[float] = field(default_factory=list)
    blocked_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def faults(self) -> list[float]:
        return [us for us in self.accesses if us >= FAULT_US]


def run(built: Built, workdir: Path, images: Path, quick: bool) -> str:
    image = random_image(images, (256 if quick else 1024) << 20)
    count = 500 if quick else 2000
    rounds = 2 if quick else 3
    sides = {"no sweep": Side(), "with sweep": Side()}
    timings = {name: services.stages_file(workdir, name) for name in ("d-nosweep", "d-sweep")}
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(services.page_server(workdir, image))
        plain = stack.enter_context(
            services.daemon(
                workdir, page_server=target, sweep=False, name="d-nosweep",
                stages=timings["d-nosweep"],
            )
        )  # fmt: skip
        sweeping = stack.enter_context(
            services.daemon(workdir, page_server=target, name="d-sweep", stages=timings["d-sweep"])
        )
        for index in range(rounds):
            for label, via in (("no sweep", plain), ("with sweep", sweeping)):
                before = usage(via.process.pid).cpu_seconds
                command, lat = services.faulter_command(
                    built, image, workdir, f"remote-{index}", handler="daemon",
                    daemon=via, count=count, seed=100 + index,
                )  # fmt: skip
                done = services.run_faulter(command, lat)
                side = sides[label]
                side.accesses += done.latencies_us
                side.blocked_s += sum(done.latencies_us) / 1e6
                side.wall_s += done.result["touch_s"]
                side.cpu_s += usage(via.process.pid).cpu_seconds - before
    plain_side, sweep_side = sides["no sweep"], sides["with sweep"]
    ref, ours = Summary.of(plain_side.faults), Summary.of(sweep_side.faults)
    rows = [
        ["demand faults", str(ours.count), str(ref.count), "", ""],
        ["p50 us", fmt(ours.p50), fmt(ref.p50), fx(ratio(ours.p50, ref.p50)), "<= 300 us"],
        ["p99 us", fmt(ours.p99), fmt(ref.p99), fx(ratio(ours.p99, ref.p99)), "<= 2000 us"],
        ["max us", fmt(ours.max), fmt(ref.max), fx(ratio(ours.max, ref.max)), ""],
        ["time blocked s", fmt(sweep_side.blocked_s, 3), fmt(plain_side.blocked_s, 3),
         fx(ratio(sweep_side.blocked_s, plain_side.blocked_s)), ""],
        ["blocked per access us", fmt(1e6 * sweep_side.blocked_s / len(sweep_side.accesses)),
         fmt(1e6 * plain_side.blocked_s / len(plain_side.accesses)), "", ""],
        ["daemon CPU s", fmt(sweep_side.cpu_s, 2), fmt(plain_side.cpu_s, 2), "", ""],
    ]  # fmt: skip
    header = (
        f"## remote demand faults ({image.length >> 20} MiB image over loopback TCP, "
        f"{count} random accesses x {rounds} rounds; a fault is an access >= {FAULT_US:g} us)"
    )
    body = table(["metric", "with sweep", "no sweep (reference)", "ratio", "target"], rows)
    return "\n\n".join(
        part
        for part in [
            header,
            body,
            f"with sweep:\n{format_histogram(sweep_side.faults)}",
            f"no sweep:\n{format_histogram(plain_side.faults)}",
            services.stages_table(timings["d-sweep"], "with sweep"),
            services.stages_table(timings["d-nosweep"], "no sweep"),
        ]
        if part
    )
