"""Scenario *full residency*: time until every page of a 2 GiB restore is in.

Two workloads through the daemon (page server on loopback TCP, background sweep on):
the restored process reading every page once in random order, and an idle process.
The clock runs in the restored process from before the handover to the daemon's
Resident message. Reference (the local limit): ``refhandler bulk``, C reading the same
image data file and installing it with UFFDIO_COPY in 4 MiB chunks into an identical
registered mapping, with and without the same random reader. Fresh process per run.

Before its clock starts, every run (uffdd's and the reference's alike) touches and frees
as much fresh memory as it restores (``faulter.warm_memory``): on this kind of VM a page
the host has not backed costs several microseconds on first write, and without the
warm-up whichever side ran after a pause paid it for the whole 2 GiB (the reference,
run right after uffdd, installed into the pages uffdd's run had just freed). The
warm-up's own rate is printed as "fresh memory GiB/s": the floor of any handler.
"""

from __future__ import annotations

from pathlib import Path

from suite import services
from suite.build import Built
from suite.images import random_image
from suite.procs import usage
from suite.report import fmt, fx, table
from suite.stats import Summary, format_histogram, ratio

GiB = 1 << 30


def run(built: Built, workdir: Path, images: Path, quick: bool) -> str:
    image = random_image(images, (512 if quick else 2048) << 20)
    gib = image.length / GiB
    rows: list[list[str]] = []
    histograms: list[str] = []
    with services.page_server(workdir, image) as target:
        for workload, pattern, target_gibs in (
            ("reading all, random order", "all", 1.5),
            ("idle", "none", 1.7),
        ):
            timing = services.stages_file(workdir, f"res-{pattern}")
            with services.daemon(
                workdir, page_server=target, name=f"d-res-{pattern}", stages=timing
            ) as daemon:
                before = usage(daemon.process.pid).cpu_seconds
                command, lat = services.faulter_command(
                    built, image, workdir, "res", handler="daemon", daemon=daemon,
                    pattern=pattern, wait_resident=600, warm_memory=image.length,
                )  # fmt: skip
                ours = services.run_faulter(command, lat, timeout=700)
                cpu = usage(daemon.process.pid).cpu_seconds - before
                peak = usage(daemon.process.pid).peak_rss_bytes
            command, lat = services.faulter_command(
                built, image, workdir, "res-ref", handler="bulk", pattern=pattern,
                warm_memory=image.length,
            )  # fmt: skip
            theirs = services.run_faulter(command, lat, timeout=700)
            histograms.append(services.stages_table(timing, f"full residency, {workload}"))
            our_s, their_s = ours.result["resident_s"], theirs.result["reference"]["seconds"]
            rows.append(
                [
                    workload,
                    fmt(our_s, 2),
                    fmt(gib / our_s, 2),
                    fmt(their_s, 2),
                    fmt(gib / their_s, 2),
                    fx(ratio(our_s, their_s)),
                    f">= {target_gibs} GiB/s" + (", <= 3x" if pattern == "none" else ""),
                    fmt(cpu / gib, 2),
                    fmt(peak / 2**20, 0),
                    f"{gib / ours.result['warm_s']:.2f} / {gib / theirs.result['warm_s']:.2f}",
                ]
            )
            if pattern == "all":
                faults = [us for us in ours.latencies_us if us >= 5.0]
                summary = Summary.of(faults)
                histograms.append(
                    f"reading all through uffdd: {summary.count} demand faults, p50 "
                    f"{summary.p50:.0f} us, p99 {summary.p99:.0f} us, max {summary.max:.0f} us, "
                    f"time blocked {summary.total / 1e6:.2f} s of {ours.result['touch_s']:.2f} s"
                    f" reading\n{format_histogram(faults)}"
                )
    header = (
        f"## full residency ({image.length >> 20} MiB, page server on loopback TCP, sweep on;"
        " reference: C read() + UFFDIO_COPY 4 MiB chunks, same run)"
    )
    body = table(
        ["workload", "uffdd s", "uffdd GiB/s", "C limit s", "C GiB/s", "time ratio",
         "target", "daemon CPU s/GiB", "daemon peak RSS MiB",
         "fresh memory GiB/s (uffdd / C run)"],
        rows,
    )  # fmt: skip
    return "\n\n".join(part for part in [header, body, *histograms] if part)
