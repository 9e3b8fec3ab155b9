"""Processes of a benchmark: start them pinned, bound every wait, reap, read /proc.

Why one place: every scenario runs several processes (page server, daemon, faulters,
C handlers); each must end when the scenario ends, whatever happens, and its CPU time
and peak RSS are read from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def bench_script(name: str, *args: str) -> list[str]:
    """Command line running ``bench/NAME.py ARGS`` with this interpreter."""
    return [sys.executable, str(BENCH / f"{name}.py"), *args]


def pin_all_threads(pid: int, cpus: Sequence[int]) -> None:
    """Set the CPU affinity of every thread of ``pid`` (sched_setaffinity is per thread)."""
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), set(cpus))


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL and reap."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def running(
    command: list[str], log: Path, cpus: Sequence[int] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A background process for the block (output to ``log``), stopped and reaped after."""
    prefix = ["taskset", "-c", ",".join(map(str, cpus))] if cpus is not None else []
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*prefix, *command], stdout=sink, stderr=sink, stdin=subprocess.DEVNULL
        )
    try:
        yield process
    finally:
        stop(process)


def wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Wait until ``path`` exists; fail with the log's tail if the process died first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{process.args!r} not ready (exit {process.returncode}):\n{tail}")
        time.sleep(0.02)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system, all threads) and peak RSS of a live process."""

    cpu_seconds: float
    peak_rss_bytes: int


def usage(pid: int) -> Usage:
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name (which may hold spaces): utime is the 14th field.
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    peak = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return Usage(cpu, peak)


@dataclass(frozen=True)
class Memory:
    """Resident, proportional and private set size of a live process
    (``smaps_rollup``), bytes.

    PSS splits each page shared with other processes (a copy-on-write twin's, say)
    between them; private pages (USS) are what the process's death would free.
    """

    rss: int
    pss: int
    private: int


def memory(pid: int) -> Memory:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                fields[name] = int(rest.split()[0]) * 1024
    return Memory(fields["Rss"], fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"])
