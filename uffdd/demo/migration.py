"""``uffdd demo``: one command, one real post-copy migration on this host, verified.

Why it exists: a newcomer (and CI) should see uffdd do its whole job with nothing set
up: a real process builds a few hundred MiB of state; ``uffdd dump`` captures it; a
local ``uffdd page-server`` serves the image; a ``uffdd daemon`` takes the handover;
a new process maps the same addresses empty, hands its userfaultfd to the daemon and
runs on while its memory arrives: it reads in random order, forks three levels deep,
drops pages with madvise, moves memory with mremap and unmaps some mid-transfer,
checking every byte. Each piece runs as its own process, as in production.

``--kill-daemon-at SECONDS`` shows what the daemon's death costs (nothing): the demo
SIGKILLs its daemon that long into the restore. With ``--restart`` it starts a new one on
the same state directory, which takes the workload back and serves it to full residency
(0 wrong); without, the keeper kills the workload at the resume deadline, and the demo
shows the keeper's reason (no byte was read wrong, nothing ran on zeros).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from uffdd.demo.pattern import demo_layout
from uffdd.demo.services import (
    ServiceError,
    kill_reasons,
    log_tail,
    service,
    start,
    stop,
    uffdd_command,
    wait_for_path,
)
from uffdd.image.dump import dump_process

_PYTHON = sys.executable
GIVE_UP_DEADLINE = 2.0
"""--resume-deadline of a demo whose daemon is killed and not started again."""


@dataclass
class _Run:
    """What the restored process reported, gathered into the final report."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def _say(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _bar(done: int, total: int, width: int = 32) -> str:
    fraction = 0.0 if total <= 0 else min(done / total, 1.0)
    filled = int(fraction * width)
    mib = f"{done / 2**20:7.1f}/{total / 2**20:.1f} MiB"
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%} {mib}"


class _Progress:
    """A residency bar: redrawn in place on a terminal, a line per 25% otherwise."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._reported = -1

    def update(self, done: int, total: int) -> None:
        if self._tty:
            self._stream.write(f"\r  resident {_bar(done, total)}")
            self._stream.flush()
            return
        quarter = 0 if total <= 0 else int(4 * done / total)
        if quarter > self._reported:
            self._reported = quarter
            self._stream.write(f"  resident {_bar(done, total)}\n")

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")


class _Crash:
    """The crash switch at work: a timer SIGKILLs the daemon, and maybe starts another."""

    def __init__(
        self, kill: DaemonKill, daemon: subprocess.Popen[bytes], command: list[str], base: Path
    ) -> None:
        self.kill = kill
        self.daemon = daemon
        self.command = command
        self.base = base
        self.fired = False
        self.second: subprocess.Popen[bytes] | None = None
        self._timer = threading.Timer(kill.at, self._fire)

    def start(self) -> None:
        self._timer.start()

    def _fire(self) -> None:
        if self.daemon.poll() is not None:
            return
        self.daemon.kill()
        self.daemon.wait()
        self.fired = True
        _say(f"\n  !! SIGKILL to the daemon {self.kill.at:g} s into the restore")
        if self.kill.restart:
            self.second = start(self.command, self.base / "daemon-2.log")
            _say("  !! a new daemon starts on the same state directory and takes the workload back")
        else:
            _say(
                "  !! no daemon starts again: the keeper holds the workload's memory, and kills "
                f"it if none resumes within {GIVE_UP_DEADLINE:g} s"
            )

    def stop(self) -> None:
        self._timer.cancel()
        self._timer.join()
        if self.second is not None:
            stop(self.second)


def _restore(command: list[str], run: _Run, crash: _Crash | None = None) -> int:
    """Run the restored workload, drawing its progress and echoing its phases."""
    progress = _Progress(sys.stdout)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if crash is not None:
        crash.start()
    assert process.stdout is not None
    for line in process.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            _say(f"  (workload) {line.rstrip()}")
            continue
        name = event.get("event")
        run.events[name] = event
        if name == "progress":
            progress.update(event["resident"], event["total"])
        elif name == "resident":
            progress.update(event["bytes"], event["bytes"])
        elif name == "phase":
            run.phases.append(event)
            progress.finish()
            mark = "ok" if event["mismatches"] == 0 else f"{event['mismatches']} WRONG"
            _say(
                f"  {event['name']:<46} {event['pages']:>7} pages  "
                f"{event['seconds']:7.3f} s  {mark}"
            )
        elif name == "failed":
            progress.finish()
            _say(f"  restore failed: {event['reason']}")
    progress.finish()
    return process.wait()


def _report_killed(run: _Run, code: int, base: Path, expected: bool) -> bool:
    """The report when the workload did not finish after the daemon's death: it must have
    been killed, with the keeper's reason, and every phase it finished must have been
    right. ``expected``: no daemon was started again (with one, a kill is a failure of
    the demo, though never a wrong byte)."""
    phases_right = all(p["mismatches"] == 0 for p in run.phases)
    reasons = kill_reasons(sorted(base.glob("daemon*.log")))
    _say("\nreport")
    _say(f"  phases finished before the kill  {len(run.phases)}, all right: {phases_right}")
    if code < 0:
        _say(f"  the workload was killed (signal {-code})")
    else:
        _say(f"  the workload exited with {code}")
    for reason in reasons:
        _say(f"  reason: {reason}")
    killed = code == -signal.SIGKILL and bool(reasons) and phases_right
    if killed and expected:
        _say("result: the workload was killed rather than served from lost memory")
    elif killed:
        _say("result: FAILED: the new daemon did not resume the workload (it was killed)")
    else:
        _say("result: FAILED: the workload should have been killed, with its reason")
    ok = killed and expected
    if not ok:
        _say(f"daemon log:\n{log_tail(base / 'daemon.log')}", err=True)
    return ok


def _report(run: _Run, dump_seconds: float, image_bytes: int) -> bool:
    done = run.events.get("done", {})
    resident = run.events.get("resident")
    first = run.events.get("first_access", {})
    _say("\nreport")
    _say(f"  image                 {image_bytes / 2**20:.1f} MiB dumped in {dump_seconds:.2f} s")
    _say(f"  handover              {run.events.get('handed_over', {}).get('seconds', '?')} s")
    _say(f"  time to first access  {first.get('microseconds', '?')} us")
    if resident is not None:
        _say(f"  time to full residency {resident['seconds']:.3f} s")
        _say(
            f"  bytes made resident   {resident['bytes'] / 2**20:.1f} MiB "
            "(all processes of the tree)"
        )
        _say(f"  demand faults         {resident['faults']}")
        _say(
            f"  fault latency         p50 <= {resident['fault_p50_us']:g} us, "
            f"p99 <= {resident['fault_p99_us']:g} us (power-of-two buckets)"
        )
    ok = bool(done.get("ok"))
    verified = done.get("verified_bytes", 0)
    _say(
        f"  verified              {verified / 2**20:.1f} MiB read back, "
        f"{done.get('mismatches', '?')} wrong"
    )
    for where in done.get("first_wrong", []):
        _say(f"    wrong: {where}")
    _say(f"result: {'every byte verified' if ok else 'FAILED'}")
    return ok


@dataclass(frozen=True)
class DaemonKill:
    """The crash switch: SIGKILL the daemon ``at`` seconds into the restore; ``restart``:
    then start a new daemon on the same state directory."""

    at: float
    restart: bool = False


def run_demo(
    size_mib: int = 256,
    seed: int = 7,
    workdir: Path | None = None,
    engine: Sequence[str] = (),
    kill: DaemonKill | None = None,
) -> bool:
    """Run the whole demo in ``workdir`` (default: a temporary directory, removed after);
    True when every byte was verified (with ``kill`` and no restart: when the workload
    was killed with the keeper's reason and no byte it read was wrong). ``engine``:
    ``NAME=VALUE`` knobs passed on to the page server and the daemon. Raises DemoError
    when a step fails."""
    temporary = workdir is None
    base = Path(tempfile.mkdtemp(prefix="uffdd-demo-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    try:
        knobs = [a for pair in engine for a in ("--engine", pair)]
        return _run_demo(base, size_mib, seed, knobs, kill)
    except ServiceError as exc:
        raise DemoError(str(exc)) from exc
    finally:
        if temporary:
            shutil.rmtree(base, ignore_errors=True)


def _run_demo(
    base: Path, size_mib: int, seed: int, engine: list[str], kill: DaemonKill | None
) -> bool:
    images, pages_sock, handover = base / "images", base / "pages.sock", base / "handover.sock"
    image_id = f"demo-{os.getpid()}"
    layout = demo_layout(size_mib)
    sizes = ["--size-mib", str(size_mib), "--seed", str(seed)]
    size = sum(r.length for r in layout) / 2**20
    _say(f"uffdd demo: {size:.0f} MiB in {len(layout)} regions, workdir {base}")

    _say("1/5 source process builds its memory")
    source = subprocess.Popen(
        [_PYTHON, "-m", "uffdd.demo.workload", "source", *sizes],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert source.stdout is not None
        ready = source.stdout.readline()
        if not ready:
            raise DemoError(f"the source process exited with {source.wait()}")
        pid = json.loads(ready)["pid"]
        _say(f"2/5 uffdd dump {pid}")
        started = time.monotonic()
        result = dump_process(pid, images, image_id, include=("[anon]",))
        dump_seconds = time.monotonic() - started
    finally:
        if source.stdin is not None:
            source.stdin.close()
        source.wait(30)
    _say(f"    {result.read_bytes / 2**20:.1f} MiB read, image {result.path}")

    _say(f"3/5 uffdd page-server on unix:{pages_sock}")
    with service(
        uffdd_command(
            "page-server",
            "--images",
            str(images),
            "--listen",
            f"unix:{pages_sock}",
            "--ready-file",
            str(base / "pages.ready"),
            *engine,
        ),
        base / "page-server.log",
    ) as server:
        wait_for_path(base / "pages.ready", "the page server", server, base / "page-server.log")
        _say(f"4/5 uffdd daemon on {handover}")
        # The state directory is the default one (next to the handover socket): a new
        # daemon on the same socket finds it. JSON logs: the keeper's reason is read back.
        crash_options = [] if kill is None else ["--log-format", "json"]
        if kill is not None and not kill.restart:
            crash_options += ["--resume-deadline", f"{GIVE_UP_DEADLINE:g}"]
        daemon_command = uffdd_command(
            "daemon",
            "--handover",
            str(handover),
            "--page-server",
            f"unix:{pages_sock}",
            *crash_options,
            *engine,
        )
        with service(daemon_command, base / "daemon.log") as daemon:
            wait_for_path(handover, "the daemon", daemon, base / "daemon.log")
            _say("5/5 a new process restores lazily and checks every byte")
            run = _Run()
            crash = _Crash(kill, daemon, daemon_command, base) if kill is not None else None
            try:
                code = _restore(
                    [
                        _PYTHON,
                        "-m",
                        "uffdd.demo.workload",
                        "restored",
                        *sizes,
                        "--handover",
                        str(handover),
                        "--image",
                        image_id,
                    ],
                    run,
                    crash,
                )
            finally:
                if crash is not None:
                    crash.stop()
    if crash is not None and crash.fired and "done" not in run.events:
        return _report_killed(run, code, base, expected=not crash.kill.restart)
    ok = _report(run, dump_seconds, result.total_bytes) and code == 0
    if not ok:
        _say(f"daemon log:\n{log_tail(base / 'daemon.log')}", err=True)
    return ok
