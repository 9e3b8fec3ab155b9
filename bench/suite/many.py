"""Scenario *many at once*: 1, 8 and 64 concurrent restores on one daemon.

The same total (2 GiB; 512 MiB with --quick) split over N restored processes of one
image of total/N bytes, all started together (each waits for a go file after its
imports), each reading ``count`` random pages and then waiting for the daemon's
Resident message. A fresh daemon per N, so its CPU time (utime + stime from
/proc/<pid>/stat) and peak RSS (VmHWM) belong to that level alone. Reference: N = 1,
same run. No starvation: every restore must become resident; the spread of their
times to residency shows fairness.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from suite import services
from suite.build import Built
from suite.images import random_image
from suite.procs import usage
from suite.report import fmt, fx, table
from suite.stats import Summary, format_histogram, ratio

GiB = 1 << 30
LEVELS = (1, 8, 64)


def run(built: Built, workdir: Path, images: Path, quick: bool) -> str:
    total = (512 if quick else 2048) << 20
    count = 100
    rows: list[list[str]] = []
    histograms: list[str] = []
    reference_gibs = reference_p99 = float("nan")
    for level in LEVELS:
        image = random_image(images, total // level)
        timing = services.stages_file(workdir, f"many-{level}")
        with (
            services.page_server(workdir, image) as target,
            services.daemon(
                workdir, page_server=target, name=f"d-many{level}", stages=timing
            ) as daemon,
        ):
            go = workdir / f"go-{level}"
            go.unlink(missing_ok=True)
            before = usage(daemon.process.pid).cpu_seconds
            started: list[tuple[subprocess.Popen[str], Path]] = []
            try:
                for index in range(level):
                    command, lat = services.faulter_command(
                        built, image, workdir, f"many-{level}-{index}", handler="daemon",
                        daemon=daemon, count=count, seed=index, wait_resident=600,
                        start_file=go,
                    )  # fmt: skip
                    started.append((services.spawn(command), lat))
                go.touch()
                runs = [services.collect(process, lat, timeout=700) for process, lat in started]
            finally:
                for process, _ in started:
                    if process.poll() is None:
                        process.kill()
                        process.wait(10)
            used = usage(daemon.process.pid)
        first = min(r.result["t0"] for r in runs)
        last = max(r.result["t0"] + r.result["resident_s"] for r in runs)
        each = sorted(r.result["resident_s"] for r in runs)
        gibs = total / GiB / (last - first)
        faults = [us for r in runs for us in r.latencies_us if us >= 5.0]
        firsts = sorted(r.latencies_us[0] / 1000 for r in runs if r.latencies_us)
        summary = Summary.of(faults)
        if level == 1:
            reference_gibs, reference_p99 = gibs, summary.p99
        rows.append(
            [
                str(level),
                f"{image.length >> 20}",
                fmt(gibs, 2),
                fx(ratio(gibs, reference_gibs)),
                fmt(summary.p99 / 1000, 1),
                fx(ratio(summary.p99, reference_p99)),
                f"{firsts[len(firsts) // 2]:.1f} / {firsts[-1]:.1f}",
                f"{each[0]:.2f} / {each[len(each) // 2]:.2f} / {each[-1]:.2f}",
                f"{len(runs)}/{level}",
                fmt((used.cpu_seconds - before) / (total / GiB), 2),
                fmt(used.peak_rss_bytes / 2**20, 0),
            ]
        )
        histograms.append(f"N = {level}:\n{format_histogram(faults)}")
        histograms.append(services.stages_table(timing, f"N = {level}"))
    header = (
        f"## many at once ({total >> 20} MiB in total per level, page server on loopback "
        f"TCP, sweep on; {count} random reads per restore, then wait for Resident; "
        "reference: N = 1, same run)"
    )
    body = table(
        ["N", "MiB each", "aggregate GiB/s", "vs N=1", "demand p99 ms", "vs N=1",
         "first read med/max ms", "resident s min/med/max", "resident", "daemon CPU s/GiB",
         "daemon peak RSS MiB"],
        rows,
    )  # fmt: skip
    return "\n\n".join(part for part in [header, body, *histograms] if part)
