"""dump -> page-server -> client: exactly the bytes the live process held.

A real source process builds the demo layout (data pages, pages never touched, pages
written then zeroed, in several regions) and then sits idle; its memory is read from
/proc/PID/mem, dumped with ``uffdd dump``, served by ``uffdd page-server`` over
loopback TCP, and fetched back through ``PageClient`` on both lanes.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from uffdd.client.page_client import PageClient
from uffdd.core.actions import Priority
from uffdd.core.addresses import PAGE_SIZE, ImageAddr
from uffdd.demo.pattern import PageKind, demo_layout
from uffdd.demo.services import service, uffdd_command, wait_for_path
from uffdd.image.format import ExtentKind

SIZE_MIB = 16


def _read_mem(pid: int, start: int, length: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start)
        return mem.read(length)


async def _fetch_all(target: str, image_id: str, memory: Mapping[int, bytes]) -> None:
    async with PageClient(target) as client:
        await client.wait_ready(10)
        info = await client.image_info(image_id)
        layout = demo_layout(SIZE_MIB)
        # Every page never touched in the source is a ZERO extent: no bytes move.
        zero_pages = {
            page
            for extent in info.extents
            if extent.kind is ExtentKind.ZERO
            for page in range(extent.start, extent.start + extent.length, PAGE_SIZE)
        }
        for region in layout:
            for index in range(region.pages):
                if region.kind(index) is PageKind.UNTOUCHED:
                    assert region.start + index * PAGE_SIZE in zero_pages
            whole = await client.fetch(
                image_id, region.start, region.length, Priority.BULK
            ).read_all()
            assert bytes(whole) == memory[region.start], f"region {region.start:#x} differs"
        rng = random.Random(5)
        for _ in range(200):
            region = rng.choice(layout)
            index = rng.randrange(region.pages)
            address = ImageAddr(region.start + index * PAGE_SIZE)
            page = await client.fetch(image_id, address, PAGE_SIZE, Priority.URGENT).read_all()
            offset = index * PAGE_SIZE
            assert bytes(page) == memory[region.start][offset : offset + PAGE_SIZE]


@pytest.mark.timeout(120)
def test_dumped_process_memory_comes_back_byte_for_byte(tmp_path: Path) -> None:
    images = tmp_path / "images"
    with subprocess.Popen(
        [sys.executable, "-m", "uffdd.demo.workload", "source", "--size-mib", str(SIZE_MIB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as source:
        assert source.stdout is not None
        assert source.stdin is not None
        try:
            pid = json.loads(source.stdout.readline())["pid"]
            # The source is idle (blocked on stdin): its demo regions no longer change.
            memory = {
                int(r.start): _read_mem(pid, r.start, r.length) for r in demo_layout(SIZE_MIB)
            }
            dumped = subprocess.run(
                uffdd_command("dump", str(pid), "-o", str(images), "--image-id", "chain",
                              "--include", "[anon]"),
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert dumped.returncode == 0, dumped.stderr
            # The dump resumed the process: it still runs.
            assert source.poll() is None
        finally:
            source.stdin.close()
            source.wait(30)
    ready = tmp_path / "ready.json"
    log = tmp_path / "page-server.log"
    command = uffdd_command(
        "page-server", "--images", str(images), "--listen", "127.0.0.1:0",
        "--ready-file", str(ready),
    )  # fmt: skip
    with service(command, log) as server:
        wait_for_path(ready, "the page server", server, log)
        (target,) = json.loads(ready.read_text())["addresses"]
        asyncio.run(_fetch_all(target, "chain", memory))
