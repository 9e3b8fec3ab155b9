"""End-to-end harness: a dumped demo image, a page server, a daemon, restored workloads.

Everything runs as separate processes through the CLI, as an operator would run it:
``uffdd dump`` of a real source process, ``uffdd page-server``, ``uffdd daemon``, and
the demo workload (``python -m uffdd.demo.workload restored``) as the restored process,
which checks every byte it reads against the pattern the source was built from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from uffdd.demo.services import service, uffdd_command, wait_for_path
from uffdd.image.dump import dump_process

SIZE_MIB = 32
SEED = 11


def make_demo_image(images: Path, image_id: str, size_mib: int = SIZE_MIB) -> None:
    """Build the demo layout in a real source process and dump it (its demo regions)."""
    with subprocess.Popen(
        [sys.executable, "-m", "uffdd.demo.workload", "source", "--size-mib", str(size_mib),
         "--seed", str(SEED)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as source:  # fmt: skip
        assert source.stdout is not None
        assert source.stdin is not None
        try:
            pid = json.loads(source.stdout.readline())["pid"]
            dump_process(pid, images, image_id, include=("[anon]",))
        finally:
            source.stdin.close()
            source.wait(30)


@dataclass
class Services:
    """A running page server and daemon, with their logs."""

    base: Path
    page_server: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    pages_target: str
    handover: Path

    @property
    def daemon_log(self) -> Path:
        return self.base / "daemon.log"

    def daemon_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far."""
        events = []
        for line in self.daemon_log.read_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events


@contextmanager
def page_server(
    base: Path, images: Path, *extra: str, name: str = "pages"
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A page server on a Unix socket under ``base``."""
    sock = base / f"{name}.sock"
    ready = base / f"{name}.ready"
    log = base / f"{name}.log"
    command = uffdd_command(
        "page-server", "--images", str(images), "--listen", f"unix:{sock}",
        "--ready-file", str(ready), *extra,
    )  # fmt: skip
    with service(command, log) as process:
        wait_for_path(ready, "the page server", process, log)
        yield process, f"unix:{sock}"


@contextmanager
def daemon(base: Path, pages_target: str, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon with its handover socket at ``base/handover.sock``, JSON logs."""
    handover = base / "handover.sock"
    log = base / "daemon.log"
    command = uffdd_command(
        "daemon", "--handover", str(handover), "--page-server", pages_target,
        "--log-format", "json", *extra,
    )  # fmt: skip
    with service(command, log) as process:
        wait_for_path(handover, "the daemon", process, log)
        yield process


@contextmanager
def services(
    base: Path,
    images: Path,
    *,
    server_args: tuple[str, ...] = (),
    daemon_args: tuple[str, ...] = (),
) -> Iterator[Services]:
    with (
        page_server(base, images, *server_args) as (server, target),
        daemon(base, target, *daemon_args) as running,
    ):
        yield Services(base, server, running, target, base / "handover.sock")


@dataclass
class Restored:
    """A restored workload process and the JSON events it printed."""

    process: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)

    def read_until(self, name: str, timeout: float = 60.0) -> dict[str, Any] | None:
        """Read events until one named ``name`` (None if the process ended first)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            event: dict[str, Any] = json.loads(line)
            self.events.append(event)
            if event["event"] == name:
                return event
            if time.monotonic() > deadline:
                break
        return None

    def finish(self, timeout: float = 120.0) -> int:
        """Read everything left, wait for the exit code, close the pipe."""
        self.read_until("\0never")
        code = self.process.wait(timeout)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code

    def last(self, name: str) -> dict[str, Any]:
        matches = [e for e in self.events if e["event"] == name]
        assert matches, f"no {name!r} event in {self.events}"
        return matches[-1]


def start_restored(
    handover: Path,
    image_id: str,
    *,
    mode: str = "exercise",
    size_mib: int = SIZE_MIB,
    page_server: str = "",
    extra: tuple[str, ...] = (),
    stderr: IO[bytes] | None = None,
) -> Restored:
    """Start the demo workload restored through ``handover``; ``extra``: more of its
    options (``--storm-seed``...); ``stderr``: where its stderr goes (default: ours)."""
    command = [
        sys.executable, "-m", "uffdd.demo.workload", "restored",
        "--size-mib", str(size_mib), "--seed", str(SEED),
        "--handover", str(handover), "--image", image_id, "--mode", mode,
        "--resident-timeout", "60", "--page-server", page_server, *extra,
    ]  # fmt: skip
    return Restored(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True))
