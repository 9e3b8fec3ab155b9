"""Running uffdd's own services as child processes: start, wait until ready, stop.

Why shared: ``uffdd demo`` and the end-to-end tests both start a page server and a
daemon exactly as an operator would (separate processes, logs to files) and must stop
them cleanly whatever happens, and both read back why a tree was killed; one
implementation keeps both honest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

READY_TIMEOUT = 30.0


class ServiceError(Exception):
    """A service did not come up; the message carries the end of its log."""


def uffdd_command(*args: str) -> list[str]:
    """The command line running ``uffdd ARGS`` with this interpreter."""
    return [sys.executable, "-m", "uffdd", *args]


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_path(
    path: Path,
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = READY_TIMEOUT,
) -> None:
    """Wait until ``path`` exists (a socket bound, a ready file written)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise ServiceError(f"{what} exited with {process.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} not ready after {timeout:g} s:\n{log_tail(log)}")
        time.sleep(0.02)


def start(
    command: list[str], log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a service, output to ``log``; ``env``: variables added to ours."""
    environment = None if env is None else {**os.environ, **env}
    with log.open("wb") as sink:
        return subprocess.Popen(
            command, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, env=environment
        )


@contextlib.contextmanager
def service(
    command: list[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a service for the block (see :func:`start`); SIGTERM (then SIGKILL) after."""
    process = start(command, log, env)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


KILLED_TREE = "killed restore tree"
"""The log event of the keeper (or a daemon) that killed a restored tree, with ``reason``."""


def kill_reasons(logs: Iterable[Path]) -> list[str]:
    """The reason of every tree kill that these JSON logs of daemons and keepers hold."""
    reasons = []
    for log in logs:
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and KILLED_TREE in line:
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if event.get("event") == KILLED_TREE:
                            reasons.append(str(event.get("reason", "")))
    return reasons
