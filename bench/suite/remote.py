"""Scenario *remote demand faults*: random pages of a 1 GiB image over loopback TCP.

A faulting process reads one random page in each of ``count`` random 64 KiB blocks of
a 1 GiB image, served by the daemon from ``uffdd page-server`` on 127.0.0.1 (TCP), with
the background sweep running (production behaviour) and without it (demand only).

The reference is the remote C reference (``bench/c/remoteref.c``) doing the same: its
C handler fetches the same 64 KiB windows from its C page server, with a C sweep of
1 MiB requests and without. That is what this machine allows a remote fault to cost,
and what a sweep competing for the same two CPUs costs it. A third side, the C handler
fetching from ``uffdd page-server``'s fast lane, splits uffdd's excess between the
daemon and the page server. Accesses that took under ``FAULT_US`` found their page
already resident (the sweep got there first): they count toward time blocked but are
not demand faults. Rounds alternate among all sides so machine noise hits all alike.
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


C_SWEEP_REQUEST = 1 << 20
"""The C sweep's request size: the daemon's bulk chunk."""


@dataclass(frozen=True)
class Setup:
    """One way of serving the faults: who handles them, who serves the pages."""

    name: str
    handler: str  # "uffdd" (the daemon) or "C"
    server: str  # "uffdd" or "C"
    sweep: bool


SETUPS = [
    Setup(f"{handler} handler, {server} page server", handler, server, sweep)
    for sweep in (False, True)
    for handler, server in (("C", "C"), ("C", "uffdd"), ("uffdd", "uffdd"))
]


def run(built: Built, workdir: Path, images: Path, quick: bool) -> str:
    image = random_image(images, (256 if quick else 1024) << 20)
    count = 500 if quick else 2000
    rounds = 2 if quick else 3
    sides = {setup: Side() for setup in SETUPS}
    timings = {name: services.stages_file(workdir, name) for name in ("d-nosweep", "d-sweep")}
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(services.page_server(workdir, image))
        ports = {
            "C": stack.enter_context(services.c_page_server(built, image)),
            "uffdd": services.fast_lane_port(workdir),
        }
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
            for setup in SETUPS:
                via = (sweeping if setup.sweep else plain) if setup.handler == "uffdd" else None
                before = usage(via.process.pid).cpu_seconds if via else 0.0
                command, lat = services.faulter_command(
                    built, image, workdir, f"remote-{index}",
                    handler="daemon" if via else "remote", daemon=via, count=count,
                    seed=100 + index, ref_port=ports[setup.server],
                    ref_sweep=C_SWEEP_REQUEST if setup.sweep else 0,
                    ref_image=image.image_id if setup.server == "uffdd" else None,
                )  # fmt: skip
                done = services.run_faulter(command, lat)
                side = sides[setup]
                side.accesses += done.latencies_us
                side.blocked_s += sum(done.latencies_us) / 1e6
                side.wall_s += done.result["touch_s"]
                side.cpu_s += usage(via.process.pid).cpu_seconds - before if via else 0.0
    header = (
        f"## remote demand faults ({image.length >> 20} MiB image over loopback TCP, "
        f"{count} random accesses x {rounds} rounds; a fault is an access >= {FAULT_US:g} us; "
        "reference: C handler and C page server, same workload, same sweep setting)"
    )
    body = table(
        ["sweep", "handler, page server", "demand faults", "p50 us", "p99 us", "max us",
         "p50 / p99 vs C", "time blocked s", "daemon CPU s", "target"],
        [_row(setup, sides) for setup in SETUPS],
    )  # fmt: skip
    histograms = [
        f"{setup.name}, {'with' if setup.sweep else 'no'} sweep:\n"
        f"{format_histogram(sides[setup].faults)}"
        for setup in SETUPS
    ]
    return "\n\n".join(
        part
        for part in [
            header,
            body,
            *histograms,
            services.stages_table(timings["d-sweep"], "uffdd with sweep"),
            services.stages_table(timings["d-nosweep"], "uffdd no sweep"),
        ]
        if part
    )


def _row(setup: Setup, sides: dict[Setup, Side]) -> list[str]:
    side = sides[setup]
    ours = Summary.of(side.faults)
    reference = next(s for s in SETUPS if s.sweep == setup.sweep and s.handler == s.server == "C")
    ref = Summary.of(sides[reference].faults)
    production = setup.handler == "uffdd" and setup.sweep
    return [
        "with" if setup.sweep else "no",
        setup.name,
        str(ours.count),
        fmt(ours.p50),
        fmt(ours.p99),
        fmt(ours.max),
        ""
        if setup == reference
        else f"{fx(ratio(ours.p50, ref.p50))} / {fx(ratio(ours.p99, ref.p99))}",
        fmt(side.blocked_s, 3),
        fmt(side.cpu_s, 2) if setup.handler == "uffdd" else "",
        "p50 <= 300 us, p99 <= 2000 us" if production else "",
    ]
