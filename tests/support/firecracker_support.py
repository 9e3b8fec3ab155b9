"""Test-side pieces for the Firecracker dialect: snapshot files, the VMM, an in-process daemon.

Why here: the integration tests run the daemon (with only the Firecracker door) in the
test's own asyncio loop, so its fds can be counted in ``/proc/self/fd``, while every
VMM is a separate process (``firecracker_vmm.py``) that is always killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from support.fds import open_fds
from uffdd.client.page_client import ChunkCallback, DoneCallback
from uffdd.config import DaemonConfig
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.daemon.doors.firecracker.backing import Backing, Layout, LocalImage
from uffdd.daemon.doors.firecracker.endpoint import FirecrackerSocket
from uffdd.daemon.doors.firecracker.listener import FirecrackerPolicy, firecracker_door
from uffdd.daemon.lifecycle import Daemon
from uffdd.daemon.sources import FetchHandle, PageSource

VMM_SCRIPT = Path(__file__).with_name("firecracker_vmm.py")
PAGE = 4096
HUGE = 2 << 20
WAIT = 60.0
"""Seconds any single step may take: a guard against hangs, not a measurement."""


def make_memfile(path: Path, size: int, zero: list[tuple[int, int]], seed: int = 7) -> bytes:
    """A snapshot memory file: every 4 KiB page says which page it is, except the
    ``(offset, length)`` ranges in ``zero``, which are zeros. Returns its contents."""
    data = bytearray(
        b"".join(struct.pack("<QQ", page, seed) * (PAGE // 16) for page in range(size // PAGE))
    )
    for offset, length in zero:
        data[offset : offset + length] = bytes(length)
    path.write_bytes(data)
    return bytes(data)


def uffd_count() -> int:
    return sum("userfaultfd" in entry for entry in open_fds())


class Vmm:
    """A running test VMM; ``lines`` are its JSON reports."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, **config: Any) -> Vmm:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(VMM_SCRIPT),
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def step(self, name: str) -> dict[str, Any]:
        """Wait for the report ``step == name`` (failing on anything unexpected)."""
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), WAIT)
            if not raw:
                raise AssertionError(
                    f"the VMM ended (rc {await self.wait()}) before {name!r}: {self.lines}"
                )
            line = json.loads(raw)
            self.lines.append(line)
            if line["step"] == name:
                return dict(line)
            if line["step"] == "mismatch":
                raise AssertionError(f"guest memory differs from the snapshot: {line}")

    def release(self) -> None:
        """Close its stdin: a holding VMM goes on (see ``hold`` in firecracker_vmm.py)."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()

    async def wait(self) -> int:
        """The exit code once the VMM exits (negative: killed by that signal)."""
        self.release()
        return await asyncio.wait_for(self.process.wait(), WAIT)

    async def reap(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


@contextlib.asynccontextmanager
async def vmm(**config: Any) -> AsyncIterator[Vmm]:
    """Start a VMM; it is killed (if still running) and reaped on the way out."""
    started = await Vmm.start(**config)
    try:
        yield started
    finally:
        await started.reap()


@contextlib.asynccontextmanager
async def firecracker_daemon(
    socket_path: Path,
    backing: Backing,
    policy: FirecrackerPolicy | None = None,
    *,
    max_inflight_bytes: int = 64 << 20,
) -> AsyncIterator[Daemon]:
    """A daemon with only the Firecracker door, running in this loop until the block ends."""
    config = DaemonConfig(
        handover=str(socket_path.with_name("unused.sock")),
        grace=5.0,
        max_inflight_bytes=max_inflight_bytes,
    )
    daemon = Daemon(config)
    listening = FirecrackerSocket.bind(socket_path)
    # Bound before the daemon runs: a VMM may connect at once (the backlog holds it).
    task = asyncio.get_running_loop().create_task(
        daemon.run([firecracker_door(listening, backing, policy)])
    )
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, WAIT)
        listening.close()


class _HeldFetch:
    """A background request held at the gate; cancel works before and after release."""

    def __init__(self) -> None:
        self.cancelled = False
        self.inner: FetchHandle | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.inner is not None:
            self.inner.cancel()


class GatedBacking:
    """A local image whose background (BULK) transfer waits until :meth:`open` is
    called, while demand (URGENT) requests go through: the test knows for certain that
    whatever the VMM does before opening the gate happens during the transfer."""

    def __init__(self, inner: LocalImage) -> None:
        self.inner = inner
        self.is_open = False
        self.held: list[tuple[_HeldFetch, Callable[[], FetchHandle]]] = []
        self.requested = asyncio.Event()
        """Set once the daemon asked for background data (held here until open)."""

    async def layout(self, daemon: Daemon) -> Layout:
        layout = await self.inner.layout(daemon)
        return dataclasses.replace(layout, source=_GatedSource(self, layout.source))

    def open(self) -> None:
        self.is_open = True
        held, self.held = self.held, []
        for handle, submit in held:
            if not handle.cancelled:
                handle.inner = submit()

    def close(self) -> None:
        """The inner image is the test's to close."""


class _GatedSource:
    def __init__(self, gate: GatedBacking, inner: PageSource) -> None:
        self.gate = gate
        self.inner = inner

    def submit(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        *,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        deadline: float | None = None,
    ) -> FetchHandle:
        def submit() -> FetchHandle:
            return self.inner.submit(
                image_id,
                address,
                length,
                priority,
                on_chunk=on_chunk,
                on_done=on_done,
                deadline=deadline,
            )

        if priority is Priority.URGENT or self.gate.is_open:
            return submit()
        handle = _HeldFetch()
        self.gate.held.append((handle, submit))
        self.gate.requested.set()
        return handle
