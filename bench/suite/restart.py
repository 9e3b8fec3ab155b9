"""Scenario *restart*: what a daemon's death and restart cost the process it serves.

Why: a SIGKILLed daemon's uffds stay held by its keeper, and a daemon started again
with the same state directory takes them back; the restored process only waits. This
measures that wait, and how long a resuming daemon takes beside a cold start.

Each restart round runs the CLI (``uffdd daemon``, whose doors resume, not the bench
front door) with ``--state-dir`` in the work directory against a real ``uffdd
page-server`` on loopback TCP whose sweep is capped (``--bulk-rate-limit``), so the
restore is still in progress when the daemon is SIGKILLed about a second after the
handover. A new daemon is started at once with the same state directory. The faulting
process (``faulter.py``, separate) reads every page of a random-data image once in
random order, each access timed in C with its CLOCK_MONOTONIC start, and checks every
page it read against the image. Printed per round and over all rounds:

- the pause: from the kill to the end of the first demand fault (an access of at least
  5 us) that ends after the killed daemon was reaped, and the longest access;
- the new daemon's exec to its handover socket and to its "resumed" log line;
- references from the same run: a cold start of ``uffdd daemon`` (exec to handover
  socket, a fresh state directory, alternating with the restart rounds), and the
  demand faults' p50/p99 before the kill (and after the resume, beside them);
- RSS and PSS (``/proc/PID/smaps_rollup``) of the daemon and of its keeper twin (a
  copy-on-write image of the daemon) just before the kill.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from suite import services
from suite.build import Built
from suite.images import BenchImage, random_image
from suite.procs import Memory, memory, running
from suite.report import fmt, fx, table
from suite.stats import Summary, ratio
from uffdd.kernel.proc import process_alive

MiB = 1 << 20
DEMAND_NS = 5000
"""An access of at least 5 us waited for its page (bench/README.md)."""
KILL_AFTER_S = 1.0
KILL_AFTER_QUICK_S = 0.25
"""--quick's image (64 MiB) can be read whole within a second on a quiet machine."""
BULK_RATE = "16M"
"""The page server's cap on the sweep: the restore is far from resident at the kill."""
FAULT_AROUND = 4096
"""One page per demand fault: with the default 64 KiB the random reads alone fetch the
whole image in a fraction of a second (a 64 KiB block per fault), before any kill."""


@dataclass(frozen=True)
class Restart:
    """One restart round's figures (ms unless named otherwise)."""

    pause_ms: float
    longest_ms: float
    socket_ms: float
    resumed_ms: float
    keeper_ms: float
    """From the kill to the keeper's log line saying it holds the processes."""
    before: Summary
    after: Summary
    read_before_kill: int
    pages: int
    daemon: Memory
    twin: Memory


def run(built: Built, workdir: Path, images: Path, quick: bool) -> str:
    size = (64 if quick else 256) * MiB
    rounds = 2 if quick else 4
    kill = KILL_AFTER_QUICK_S if quick else KILL_AFTER_S
    image = random_image(images, size)
    cold_ms: list[float] = []
    restarts: list[Restart] = []
    with services.page_server(workdir, image, "--bulk-rate-limit", BULK_RATE) as target:
        for index in range(rounds):
            # Alternate which side goes first, so a slow spell hits both alike.
            if index % 2 == 0:
                cold_ms.append(_cold_start(workdir / f"cold-{index}", target))
                restarts.append(_restart(built, image, workdir / f"restart-{index}", target, kill))
            else:
                restarts.append(_restart(built, image, workdir / f"restart-{index}", target, kill))
                cold_ms.append(_cold_start(workdir / f"cold-{index}", target))
    return _report(image, rounds, kill, cold_ms, restarts)


def _daemon_command(base: Path, target: str) -> list[str]:
    return [
        sys.executable, "-m", "uffdd", "daemon", "--handover", str(base / "handover.sock"),
        "--page-server", target, "--state-dir", str(base / "state"), "--log-format", "json",
        "--fault-around", str(FAULT_AROUND), *services.DAEMON_ARGS,
    ]  # fmt: skip


def _wait_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> float:
    """Poll (every ms, bounded) until ``path`` exists; returns time.monotonic() then."""
    deadline = time.monotonic() + 60
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"daemon not listening (exit {process.returncode}):\n{tail}")
        time.sleep(0.001)
    return time.monotonic()


def _cold_start(base: Path, target: str) -> float:
    """Exec of ``uffdd daemon`` (fresh state directory) to its handover socket, in ms."""
    base.mkdir()
    log = base / "daemon.log"
    started = time.monotonic()
    with running(_daemon_command(base, target), log) as process:
        listening = _wait_socket(base / "handover.sock", process, log)
    return (listening - started) * 1000


def _events(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _logged_at(log: Path, event: str, process: subprocess.Popen[bytes]) -> float:
    """The wall-clock time of the first line in ``log`` whose event starts with
    ``event`` (waits, bounded)."""
    deadline = time.monotonic() + 60
    while True:
        for entry in _events(log):
            if str(entry.get("event")).startswith(event):
                return datetime.fromisoformat(entry["timestamp"]).timestamp()
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"no {event!r} in {log} (exit {process.returncode}):\n{tail}")
        time.sleep(0.01)


@dataclass(frozen=True)
class _Process:
    """A process by pid and start time (``/proc/PID/stat``), as the journal notes it."""

    pid: int
    started: str

    def alive(self) -> bool:
        return process_alive(self.pid, self.started)


def _twin_of(pid: int, state: Path) -> _Process:
    """The keeper twin of daemon ``pid``, as its journal names it."""
    (noted,) = state.glob(f"gen-{pid}-*/twin")
    twin, started = noted.read_text().split()
    found = _Process(int(twin), started)
    if not found.alive():
        raise RuntimeError(f"daemon {pid}: its twin {twin} is not running")
    return found


@contextlib.contextmanager
def _reaped_keeper(keeper: _Process) -> Iterator[None]:
    """The killed daemon's twin (the keeper, reparented: not ours to wait for) must be
    gone when the round ends; if it is not, it is killed and the round fails."""
    try:
        yield
    finally:
        deadline = time.monotonic() + 30
        while keeper.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if keeper.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(keeper.pid, signal.SIGKILL)
            raise RuntimeError(f"the keeper {keeper.pid} was still running after the round")


def _restart(built: Built, image: BenchImage, base: Path, target: str, kill: float) -> Restart:
    base.mkdir()
    first_log, second_log = base / "first.log", base / "daemon.log"
    handover = base / "handover.sock"
    handed = base / "handed-over"
    with running(_daemon_command(base, target), first_log) as first:
        _wait_socket(handover, first, first_log)
        twin = _twin_of(first.pid, base / "state")
        command, lat = services.faulter_command(
            built, image, base, "restart", handler="daemon",
            daemon=services.Daemon(first, handover, first_log), pattern="all",
        )  # fmt: skip
        stamps = base / "stamps.bin"
        command += ["--stamps-out", str(stamps), "--verify", "all"]
        command += ["--handed-over-file", str(handed)]
        faulter = services.spawn(command)
        try:
            deadline = time.monotonic() + 60
            while not handed.exists():
                if faulter.poll() is not None:
                    raise RuntimeError(f"no handover: {faulter.communicate()[1][-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("no handover within 60 s")
                time.sleep(0.005)
            time.sleep(kill)  # the experiment's own timing: the kill point
            if any(e.get("event") == "fully resident" for e in _events(first_log)):
                raise RuntimeError("the restore was resident before the kill: a bigger image")
            daemon_memory, twin_memory = memory(first.pid), memory(twin.pid)
            killed, killed_wall = time.monotonic(), time.time()
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            dead = time.monotonic()
            handover.unlink()  # a stale file: its return marks the new daemon listening
            with _reaped_keeper(twin):
                exec_wall, exec_mono = time.time(), time.monotonic()
                with running(_daemon_command(base, target), second_log) as second:
                    listening = _wait_socket(handover, second, second_log)
                    resumed_wall = _logged_at(second_log, "resumed", second)
                    done = services.collect(faulter, lat, timeout=600)
                    holding_wall = _logged_at(first_log, "the daemon died: holding", second)
        finally:
            if faulter.poll() is None:
                faulter.kill()
                faulter.wait(10)
    # collect() failed the round if any page read differed from the image.
    return _measure(
        stamps, done.latencies_us, killed, dead,
        socket_ms=(listening - exec_mono) * 1000,
        resumed_ms=(resumed_wall - exec_wall) * 1000,
        keeper_ms=(holding_wall - killed_wall) * 1000,
        daemon=daemon_memory, twin=twin_memory,
    )  # fmt: skip


def _measure(
    stamps: Path,
    latencies_us: list[float],
    killed: float,
    dead: float,
    *,
    socket_ms: float,
    resumed_ms: float,
    keeper_ms: float,
    daemon: Memory,
    twin: Memory,
) -> Restart:
    starts_ns = [int(x) for x in memoryview(stamps.read_bytes()).cast("Q")]
    stamps.unlink()
    ends = [start / 1e9 + us / 1e6 for start, us in zip(starts_ns, latencies_us, strict=True)]
    if ends[-1] <= killed:
        raise RuntimeError("every page was read before the kill: lower the sweep's rate")
    before = [us for us, end in zip(latencies_us, ends, strict=True) if end < killed]
    served = next(
        (i for i, end in enumerate(ends) if end > dead and latencies_us[i] * 1000 >= DEMAND_NS),
        None,
    )
    if served is None:
        raise RuntimeError("no demand fault after the kill: the restore was already resident")
    after = latencies_us[served + 1 :]
    return Restart(
        pause_ms=(ends[served] - killed) * 1000,
        longest_ms=max(latencies_us) / 1000,
        socket_ms=socket_ms,
        resumed_ms=resumed_ms,
        keeper_ms=keeper_ms,
        before=Summary.of([us for us in before if us * 1000 >= DEMAND_NS]),
        after=Summary.of([us for us in after if us * 1000 >= DEMAND_NS]),
        read_before_kill=len(before),
        pages=len(latencies_us),
        daemon=daemon,
        twin=twin,
    )


def _median(values: list[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    return ordered[len(ordered) // 2] if ordered else math.nan


def _spread(values: list[float], digits: int = 1) -> str:
    """median (min-max)."""
    return f"{fmt(_median(values), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def _report(
    image: BenchImage, rounds: int, kill: float, cold_ms: list[float], runs: list[Restart]
) -> str:
    header = (
        f"## restart ({image.length // MiB} MiB random data, every page read once in random "
        f"order; page server on loopback TCP, sweep capped at {BULK_RATE}/s; `uffdd daemon` "
        f"SIGKILLed {kill:g} s after the handover and started again at once with "
        f"the same state directory; {rounds} rounds alternating with a cold start; every "
        "page read verified)"
    )
    per_round = table(
        ["round", "pause ms", "longest ms", "exec->socket ms", "exec->resumed ms",
         "keeper ms", "cold start ms", "demand p50/p99 before us", "after us", "read before kill"],
        [
            [str(i), fmt(r.pause_ms), fmt(r.longest_ms), fmt(r.socket_ms), fmt(r.resumed_ms),
             fmt(r.keeper_ms), fmt(cold), f"{fmt(r.before.p50, 0)}/{fmt(r.before.p99, 0)}",
             f"{fmt(r.after.p50, 0)}/{fmt(r.after.p99, 0)}", f"{r.read_before_kill}/{r.pages}"]
            for i, (r, cold) in enumerate(zip(runs, cold_ms, strict=True))
        ],
    )  # fmt: skip
    cold = _median(cold_ms)
    p50_before = _median([r.before.p50 for r in runs])
    p99_before = _median([r.before.p99 for r in runs])
    daemon_rss = _median([r.daemon.rss / MiB for r in runs])
    daemon_pss = _median([r.daemon.pss / MiB for r in runs])
    daemon_private = _median([r.daemon.private / MiB for r in runs])

    def row(figure: str, values: list[float], reference: str, against: float) -> list[str]:
        return [figure, _spread(values), reference, fx(ratio(_median(values), against))]

    rows = [
        row("pause: kill -> first fault served again", [r.pause_ms for r in runs],
            f"cold start {fmt(cold)}", cold),
        row('new daemon: exec -> "resumed"', [r.resumed_ms for r in runs],
            f"cold start {fmt(cold)}", cold),
        row("new daemon: exec -> handover socket", [r.socket_ms for r in runs],
            f"cold start {fmt(cold)}", cold),
        row("keeper: kill -> holding the processes", [r.keeper_ms for r in runs],
            f"cold start {fmt(cold)}", cold),
        row("longest access", [r.longest_ms for r in runs],
            f"demand p99 before the kill {fmt(p99_before / 1000, 2)}", p99_before / 1000),
        row("demand p50 after the resume (us)", [r.after.p50 for r in runs],
            f"before the kill {fmt(p50_before, 0)}", p50_before),
        row("demand p99 after the resume (us)", [r.after.p99 for r in runs],
            f"before the kill {fmt(p99_before, 0)}", p99_before),
        row("keeper twin RSS (MiB, before the kill)", [r.twin.rss / MiB for r in runs],
            f"daemon RSS {fmt(daemon_rss)}", daemon_rss),
        row("keeper twin PSS (MiB, before the kill)", [r.twin.pss / MiB for r in runs],
            f"daemon PSS {fmt(daemon_pss)}", daemon_pss),
        row("keeper twin private (MiB, before the kill)", [r.twin.private / MiB for r in runs],
            f"daemon private {fmt(daemon_private)}", daemon_private),
    ]  # fmt: skip
    summary = table(["figure (ms unless named)", "median (min-max)", "reference", "ratio"], rows)
    return "\n\n".join([header, summary, per_round])
