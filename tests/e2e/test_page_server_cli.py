"""``uffdd page-server`` as a real process: serves, reports its ports, exits 0 on SIGTERM
(and takes its bulk worker with it)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from uffdd.client.page_client import PageClient
from uffdd.core.addresses import ImageAddr
from uffdd.image.writer import ImageWriter
from uffdd.pageserver.command import page_server
from uffdd.wire.convert import Priority

pytestmark = pytest.mark.timeout(60)

# The command as the `uffdd` console script runs it, independent of its registration.
LAUNCH = [sys.executable, "-c", "from uffdd.pageserver.command import page_server; page_server()"]
PAGE = 4096


@pytest.fixture
def image_root(tmp_path: Path) -> tuple[Path, bytes]:
    content = random.Random(7).randbytes(16 * PAGE) + bytes(4 * PAGE)
    root = tmp_path / "images"
    with ImageWriter(root, "vm1") as writer:
        writer.add_region(ImageAddr(0x100000), len(content), name="ram")
        writer.write(ImageAddr(0x100000), content)
        writer.commit()
    return root, content


def _wait_for_file(
    path: Path, process: subprocess.Popen[str], timeout: float = 20
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"page server exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("page server did not become ready")
        time.sleep(0.05)
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture
def launched(
    image_root: tuple[Path, bytes], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    root, _ = image_root
    ready = tmp_path / "ready.json"
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
    )  # fmt: skip
    try:
        yield process, ready
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
    launched: tuple[subprocess.Popen[str], Path], image_root: tuple[Path, bytes]
) -> None:
    process, ready = launched
    _, content = image_root
    info = _wait_for_file(ready, process)
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
                while client.fast_bulk_lane_address is None:
                    await asyncio.sleep(0.02)
                stream = client.fetch("vm1", ImageAddr(0x100000), len(content), Priority.BULK)
                assert await stream.read_all() == content

    asyncio.run(asyncio.wait_for(fetch_all(), 20))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "page server listening" in events
    assert events[-1] == "page server stopped"
    assert not Path(f"/proc/{worker}").exists()  # the worker was stopped and reaped


def test_sigterm_with_a_stream_open_exits_within_grace(
    launched: tuple[subprocess.Popen[str], Path],
) -> None:
    process, ready = launched
    info = _wait_for_file(ready, process)
    addresses = info["addresses"]
    assert isinstance(addresses, list)

    async def hold_stream_open_and_terminate() -> float:
        async with PageClient(addresses[0]) as client:
            await client.fetch("vm1", ImageAddr(0x100000), PAGE).read_all()  # stream is open
            started = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            while process.poll() is None:
                await asyncio.sleep(0.05)
            return time.monotonic() - started

    elapsed = asyncio.run(asyncio.wait_for(hold_stream_open_and_terminate(), 30))
    assert process.returncode == 0
    assert elapsed < 10  # grace is 2 s


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
