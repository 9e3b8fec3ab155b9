"""A scenario's moving parts: page servers, daemon under test, faulting processes.

Why here: every scenario starts the same kinds of process, each bounded (ready
timeouts, run timeouts) and stopped and reaped when the scenario ends, whatever
happens. The page server is the real ``uffdd page-server`` on loopback TCP; the daemon
is ``bench/daemon_host.py`` (the production ``Daemon`` with a bench front door); the
remote C reference has its own page server (``remoteref server``).
"""

from __future__ import annotations

import array
import contextlib
import json
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite import profile
from suite.build import Built
from suite.images import BenchImage
from suite.procs import bench_script, running, wait_for
from suite.report import fmt, table
from suite.stats import Summary

DAEMON_ARGS: list[str] = []
"""Extra daemon_host.py flags for every daemon (``run.py --max-inflight``, ``--engine``:
experiments)."""
PAGE_SERVER_ARGS: list[str] = []
"""Extra ``uffdd page-server`` flags (``run.py --engine``: experiments)."""
PROFILE: dict[str, Path] = {}
"""``PROFILE["dir"]``, when set (``run.py --profile DIR``): py-spy records every daemon."""


def stages_file(workdir: Path, name: str) -> Path | None:
    """Where a daemon dumps its stage timings, when profiling (else None: no timing)."""
    return workdir / f"stages-{name}.json" if "dir" in PROFILE else None


def stages_table(path: Path | None, title: str) -> str:
    """Stage timings a daemon dumped: calls, p50, p99, total (empty when not profiling)."""
    if path is None or not path.exists():
        return ""
    samples: dict[str, list[float]] = json.loads(path.read_text())
    rows = []
    for stage, values in samples.items():
        summary = Summary.of(values)
        rows.append([stage, str(summary.count), fmt(summary.p50), fmt(summary.p99),
                     fmt(summary.total / 1e6, 3)])  # fmt: skip
    return f"stage timings, {title} (us; total in s):\n\n" + table(
        ["stage", "calls", "p50", "p99", "total s"], rows
    )


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    handover: Path
    log: Path


@contextlib.contextmanager
def page_server(workdir: Path, image: BenchImage, *extra: str) -> Iterator[str]:
    """``uffdd page-server`` serving ``image.root`` on 127.0.0.1; yields its address."""
    ready, log = workdir / "pages.ready", workdir / "pages.log"
    ready.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "uffdd", "page-server", "--images", str(image.root),
        "--listen", "127.0.0.1:0", "--ready-file", str(ready), *PAGE_SERVER_ARGS, *extra,
    ]  # fmt: skip
    with running(command, log) as process:
        wait_for(ready, process, log)
        address: str = json.loads(ready.read_text())["addresses"][0]
        yield address


def fast_lane_port(workdir: Path) -> int:
    """The TCP port of the fast lane of the page server ``page_server`` started."""
    addresses: list[str] = json.loads((workdir / "pages.ready").read_text())["fast_lane_addresses"]
    return int(addresses[0].rpartition(":")[2])


@contextlib.contextmanager
def c_page_server(built: Built, image: BenchImage, timeout: float = 30) -> Iterator[int]:
    """The remote C reference's page server on 127.0.0.1; yields its TCP port."""
    server = subprocess.Popen(
        [str(built.remoteref), "server", str(image.data_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        line = server.stdout.readline() if ready else ""
        if not line.startswith("port "):
            raise RuntimeError(f"the C page server did not start (exit {server.poll()})")
        yield int(line.split()[1])
    finally:
        server.stdin.close()  # its signal to stop
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


@contextlib.contextmanager
def daemon(
    workdir: Path,
    *,
    image_dir: Path | None = None,
    page_server: str = "",
    sweep: bool = True,
    cpus: Sequence[int] | None = None,
    name: str = "daemon",
    stages: Path | None = None,
) -> Iterator[Daemon]:
    """The daemon under test, all its threads on ``cpus`` (taskset at start)."""
    handover, ready, log = (workdir / f"{name}{s}" for s in (".sock", ".ready", ".log"))
    ready.unlink(missing_ok=True)
    args = ["--handover", str(handover), "--ready-file", str(ready)]
    args += ["--image-dir", str(image_dir)] if image_dir else ["--page-server", page_server]
    if stages is not None:
        args += ["--stages", str(stages)]
    args += DAEMON_ARGS
    if not sweep:
        args += ["--engine", "sweep=off"]  # the scenario's own, after the run's
    with running(bench_script("daemon_host", *args), log, cpus) as process:
        wait_for(ready, process, log)
        with _profiled(process.pid, name):
            yield Daemon(process, handover, log)


@contextlib.contextmanager
def _profiled(pid: int, name: str) -> Iterator[None]:
    """py-spy record of ``pid`` for the block (collapsed stacks, idle included)."""
    directory = PROFILE.get("dir")
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}-{pid}.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
               "--idle", "--threads", "--native", "-o", str(out)]  # fmt: skip
    with (directory / f"{name}-{pid}.log").open("wb") as sink:
        recorder = subprocess.Popen(command, stdout=sink, stderr=sink)
    cpu_before = profile.thread_cpu(pid)
    try:
        time.sleep(0.5)  # py-spy attaches
        yield
    finally:
        (directory / f"{name}-{pid}.cpu").write_text(
            profile.thread_cpu_delta(cpu_before, profile.thread_cpu(pid)) + "\n"
        )
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            recorder.wait(60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(10)


@dataclass
class FaulterRun:
    """What one faulting process reported, and its per-access latencies in us."""

    result: dict[str, Any]
    latencies_us: list[float]


def faulter_command(
    built: Built,
    image: BenchImage,
    workdir: Path,
    tag: str,
    *,
    handler: str,
    daemon: Daemon | None = None,
    cpu: int | None = None,
    handler_cpu: int | None = None,
    pattern: str = "blocks",
    count: int = 2000,
    wait_resident: float = 0.0,
    seed: int = 5,
    start_file: Path | None = None,
    warm_memory: int = 0,
    ref_port: int | None = None,
    ref_sweep: int = 0,
    ref_image: str | None = None,
) -> tuple[list[str], Path]:
    lat = workdir / f"lat-{tag}.bin"
    command = bench_script(
        "faulter", "--handler", handler, "--timer-lib", str(built.faulter),
        "--address", hex(image.address), "--length", str(image.length),
        "--data", str(image.data_file), "--pattern", pattern, "--count", str(count),
        "--seed", str(seed), "--lat-out", str(lat),
    )  # fmt: skip
    if daemon is not None:
        command += ["--handover", str(daemon.handover), "--image", image.image_id]
    elif handler == "remote":
        command += ["--refhandler", str(built.remoteref), "--ref-port", str(ref_port)]
        command += ["--ref-sweep", str(ref_sweep)]
        command += ["--ref-image", ref_image] if ref_image else []
    else:
        command += ["--refhandler", str(built.refhandler)]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    if handler_cpu is not None:
        command += ["--handler-cpu", str(handler_cpu)]
    if start_file is not None:
        command += ["--start-file", str(start_file)]
    if wait_resident:
        command += ["--wait-resident", str(wait_resident)]
    if warm_memory:
        command += ["--warm-memory", str(warm_memory)]
    return command, lat


def collect(process: subprocess.Popen[str], lat: Path, timeout: float) -> FaulterRun:
    """Wait (bounded) for a faulter, parse its JSON line and its latencies."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)
        raise RuntimeError(f"faulter {process.pid} timed out after {timeout:g} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"faulter failed ({process.returncode}):\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result.get("mismatches"):
        raise RuntimeError(f"faulter read wrong data: {result}")
    samples = array.array("Q")
    with lat.open("rb") as source:
        samples.frombytes(source.read())
    lat.unlink()
    return FaulterRun(result, [ns / 1000 for ns in samples])


def spawn(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_faulter(command: list[str], lat: Path, timeout: float = 300) -> FaulterRun:
    return collect(spawn(command), lat, timeout)
