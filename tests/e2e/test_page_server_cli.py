"""``uffdd page-server`` as a real process: serves, reports its ports, exits 0 on SIGTERM
(and takes its bulk worker with it).

Readiness is an event, not a poll: each server is started as systemd would start it,
with ``$NOTIFY_SOCKET`` naming a datagram socket of the test's, and says READY=1 there
once it accepts calls and its ready file is written.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from uffdd.cli import page_server
from uffdd.client.page_client import PageClient
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.image.writer import ImageWriter

pytestmark = pytest.mark.timeout(60)

LAUNCH = [sys.executable, "-m", "uffdd", "page-server"]
PAGE = 4096
HANG_GUARD = 20.0
"""Seconds before a wait that should end gives up (a hang fails the test, not a clock)."""


@pytest.fixture
def image_root(tmp_path: Path) -> tuple[Path, bytes]:
    content = random.Random(7).randbytes(16 * PAGE) + bytes(4 * PAGE)
    root = tmp_path / "images"
    with ImageWriter(root, "vm1") as writer:
        writer.add_region(ImageAddr(0x100000), len(content), name="ram")
        writer.write(ImageAddr(0x100000), content)
        writer.commit()
    return root, content


class Launched:
    """A page server process with the notify socket it reports readiness on."""

    def __init__(self, process: subprocess.Popen[str], ready: Path, notify: socket.socket) -> None:
        self.process = process
        self.ready = ready
        self.notify = notify

    def wait_ready(self) -> dict[str, object]:
        """Block until the server says READY=1 (or hang-guard out); its ready file."""
        self.notify.settimeout(HANG_GUARD)
        try:
            message = self.notify.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"page server never ready: {self._output()}") from None
        assert "READY=1" in message.splitlines(), message
        loaded = json.loads(self.ready.read_text())
        assert isinstance(loaded, dict)
        return loaded

    def _output(self) -> tuple[str, str]:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.communicate(timeout=10)


@pytest.fixture
def launched(image_root: tuple[Path, bytes], tmp_path: Path) -> Iterator[Launched]:
    root, _ = image_root
    ready = tmp_path / "ready.json"
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        process = subprocess.Popen(
            [
                *LAUNCH,
                "--images", str(root),
                "--listen", "127.0.0.1:0",
                "--listen", f"unix:{tmp_path}/run/pages.sock",
                "--ready-file", str(ready),
                "--grace", "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )  # fmt: skip
        try:
            yield Launched(process, ready, notify)
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def slice_of(tid: int) -> int:
    """The EEVDF slice of a thread, in ns (/proc/TID/sched)."""
    for line in Path(f"/proc/{tid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    raise AssertionError(f"no se.slice for {tid}")


def test_serves_on_tcp_and_unix_and_exits_0_on_sigterm(
    launched: Launched, image_root: tuple[Path, bytes]
) -> None:
    process = launched.process
    _, content = image_root
    info = launched.wait_ready()
    addresses = info["addresses"]
    assert isinstance(addresses, list)
    assert info["pid"] == process.pid
    tcp, unix = addresses
    assert tcp.startswith("127.0.0.1:")
    assert not tcp.endswith(":0")
    assert unix.startswith("unix:")
    # its one child is the bulk worker, at a lower CPU priority
    (worker,) = _children(process.pid)
    assert b"uffdd.pageserver.bulk_worker" in Path(f"/proc/{worker}/cmdline").read_bytes()
    nice = os.getpriority(os.PRIO_PROCESS, process.pid)
    assert os.getpriority(os.PRIO_PROCESS, worker) == nice + 10
    # the thread answering urgent requests has a short slice; the worker keeps the default
    assert slice_of(process.pid) == 100_000
    assert slice_of(worker) > 100_000

    async def fetch_all() -> None:
        for target in (tcp, unix):
            async with PageClient(target) as client:
                assert await client.list_images() == ["vm1"]
                data = await client.fetch("vm1", ImageAddr(0x100000), len(content)).read_all()
                assert data == content
                # and bulk over the fast lane, which the worker answers
                await client.image_info("vm1")  # starts the fast lanes
                await _bulk_fast_lane_connected(client)
                stream = client.fetch("vm1", ImageAddr(0x100000), len(content), Priority.BULK)
                assert await stream.read_all() == content

    asyncio.run(asyncio.wait_for(fetch_all(), HANG_GUARD))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=HANG_GUARD)
    assert process.returncode == 0, stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "page server listening" in events
    assert events[-1] == "page server stopped"
    assert not Path(f"/proc/{worker}").exists()  # the worker was stopped and reaped
    # systemd heard of the stop too
    launched.notify.settimeout(0)
    assert "STOPPING=1" in launched.notify.recv(4096).decode().splitlines()


async def _bulk_fast_lane_connected(client: PageClient) -> None:
    """Until the client's bulk fast lane is connected: the client exposes no event for
    it, so this is a condition checked at each turn of the loop, hang-guarded."""
    deadline = asyncio.get_running_loop().time() + HANG_GUARD
    while client.fast_bulk_lane_address is None:
        assert asyncio.get_running_loop().time() < deadline, "the bulk fast lane never connected"
        await asyncio.sleep(0.02)


def test_sigterm_with_a_stream_open_exits_within_grace(launched: Launched) -> None:
    # The client keeps its stream open until the server has exited: a server that
    # waited for it (no grace) would never exit, and the hang guard would fail the test.
    process = launched.process
    info = launched.wait_ready()
    addresses = info["addresses"]
    assert isinstance(addresses, list)

    async def hold_stream_open_and_terminate() -> int:
        async with PageClient(addresses[0]) as client:
            await client.fetch("vm1", ImageAddr(0x100000), PAGE).read_all()  # stream is open
            os.kill(process.pid, signal.SIGTERM)
            return await asyncio.to_thread(process.wait, HANG_GUARD)

    assert asyncio.run(hold_stream_open_and_terminate()) == 0
    _, stderr = process.communicate(timeout=HANG_GUARD)
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    (stopping,) = [e for e in events if e["event"] == "page server stopping"]
    assert stopping["grace"] == 2.0
    assert events[-1]["event"] == "page server stopped"


def test_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(page_server, [])
    assert result.exit_code == 2
    assert "--images" in result.output
    result = runner.invoke(page_server, ["--images", str(tmp_path), "--tls-cert", "x.pem"])
    assert result.exit_code == 2
    assert "--tls-key" in result.output


def test_unusable_address_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*LAUNCH, "--images", str(tmp_path), "--listen", "256.1.2.3:99999"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot listen on 256.1.2.3:99999" in result.stderr
