"""Firecracker's UFFD handover end to end: a VMM process, real uffds, every byte checked.

The daemon (only its Firecracker door) runs in the test's loop, serving an image made
from a snapshot memory file; each VMM is ``support/firecracker_vmm.py``, which does
what Firecracker does and then reads all of guest memory and compares it with the
file. Balloon drops (madvise DONTNEED) during the transfer and after the handler let
go must read zeros. Malformed handovers must be refused, the VMM killed when it had
shown it waits for service (never left blocked or reading zeros), every fd closed,
and the next VMM served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog
from support.fds import open_fds
from support.firecracker_support import (
    HUGE,
    PAGE,
    GatedBacking,
    Vmm,
    firecracker_daemon,
    make_memfile,
    uffd_count,
    vmm,
)
from support.waiting import until

from uffdd.daemon.doors.firecracker.backing import LocalImage, image_from_memfile
from uffdd.daemon.doors.firecracker.listener import FirecrackerPolicy
from uffdd.kernel.ownership import pidfd_alive

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
SIZE = 24 * MIB
ZERO = [(3 * MIB, 2 * MIB), (10 * MIB + 5 * PAGE, 7 * PAGE), (SIZE - MIB, MIB)]
SET = [
    {"offset": 0, "size": 16 * MIB, "page_size": PAGE},
    {"offset": 16 * MIB, "size": 8 * MIB, "page_size": PAGE},
]


def run(tmp_path: Path, scenario: Callable[[Path, LocalImage], Coroutine[Any, Any, None]]) -> None:
    """Build the image, run ``scenario(socket, backing)`` in a fresh loop, check no fd leaked."""
    memfile = tmp_path / "snapshot.mem"
    make_memfile(memfile, SIZE, ZERO)
    backing = LocalImage(image_from_memfile(memfile, tmp_path / "cache", PAGE))
    before = open_fds()
    try:
        asyncio.run(scenario(memfile, backing))
        assert open_fds() == before  # every uffd, pidfd, socket and pipe closed
    finally:
        backing.close()


async def uffds_closed() -> None:
    """Until the daemon closed its copies of the uffds (they are in this process's fd
    table; it closes them once it sees the VMM exit, which nothing announces)."""
    await until(lambda: uffd_count() == 0, lambda: f"{uffd_count()} uffd(s) still open")


def test_every_byte_and_balloon_pages_read_zeros(tmp_path: Path) -> None:
    """With the background transfer held at a gate: demand faults are served, balloon
    drops (of requested, in-flight and zero pages) are taken; then the transfer goes on,
    and after the handler let go more drops: dropped pages read zeros, every other byte
    is the snapshot's."""

    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        gated = GatedBacking(backing)
        async with (
            firecracker_daemon(sock, gated, max_inflight_bytes=MIB),
            vmm(
                socket=str(sock),
                memfile=str(memfile),
                sets=[SET],
                probe=[[0, 1, 6 * MIB, 64 * PAGE], [0, 0, 9 * MIB, 3 * PAGE]],
                balloon=[
                    [0, 0, 5 * PAGE, 3 * PAGE],  # in flight (held at the gate)
                    [0, 1, MIB, MIB],  # not requested yet
                    [0, 0, 3 * MIB, PAGE],  # a zero page
                    [0, 1, 6 * MIB + 8 * PAGE, 4 * PAGE],  # installed by a demand fault
                ],
                resident_balloon=[[0, 0, 12 * MIB, 64 * PAGE], [0, 1, 0, PAGE]],
            ) as machine,
        ):
            await machine.step("probed")  # demand faults served while the sweep waits
            await machine.step("ballooned")  # REMOVEs taken while the sweep waits
            assert gated.held, "the background transfer should be waiting at the gate"
            gated.open()
            await machine.step("verified")
            await machine.step("unregistered")  # the handler let go after full residency
            await machine.step("verified")  # old and new balloon pages still read zeros
            assert await machine.wait() == 0
            await uffds_closed()  # the VMM exited: its uffd is closed

    run(tmp_path, scenario)


def test_payload_before_fd_and_the_older_page_size_field(tmp_path: Path) -> None:
    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        async with (
            firecracker_daemon(sock, backing, FirecrackerPolicy(fd_wait=30.0)),
            vmm(
                socket=str(sock), memfile=str(memfile), sets=[SET], send="late_fd", legacy=True
            ) as machine,
        ):
            await machine.step("verified")
            assert await machine.wait() == 0

    run(tmp_path, scenario)


def test_a_second_pair_on_the_same_connection(tmp_path: Path) -> None:
    second = [{"offset": 4 * MIB, "size": 8 * MIB, "page_size": PAGE}]

    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        async with (
            firecracker_daemon(sock, backing),
            vmm(
                socket=str(sock),
                memfile=str(memfile),
                sets=[SET, second],
                balloon=[[1, 0, MIB, 2 * PAGE]],
            ) as machine,
        ):
            verified = await machine.step("verified")
            assert verified["bytes"] == SIZE + 8 * MIB
            assert await machine.wait() == 0

    run(tmp_path, scenario)


FAKE = 0x7E00_0000_0000
BAD_WITH_FD: list[tuple[str, str | dict[str, Any] | None]] = [
    ("not an array", '{"base_host_virt_addr": 0}'),
    ("not JSON", "[{]"),
    (
        "overlapping",
        f'[{{"base_host_virt_addr": {FAKE}, "size": 65536, "offset": 0, "page_size": 4096}},'
        f'{{"base_host_virt_addr": {FAKE + 4096}, "size": 65536, "offset": 65536,'
        ' "page_size": 4096}]',
    ),
    (
        "not page-aligned",
        f'[{{"base_host_virt_addr": {FAKE + 8}, "size": 65536, "offset": 0, "page_size": 4096}}]',
    ),
    (
        "page size 64 KiB",
        f'[{{"base_host_virt_addr": {FAKE}, "size": 65536, "offset": 0, "page_size": 65536}}]',
    ),
    (
        "outside the image",
        f'[{{"base_host_virt_addr": {FAKE}, "size": 65536, "offset": {SIZE}, "page_size": 4096}}]',
    ),
    ("missing fd", None),
    ("no EVENT_REMOVE", {"remove_events": False}),
    ("not a userfaultfd", {"not_a_uffd": True}),
]


@pytest.mark.parametrize(("case", "payload"), BAD_WITH_FD, ids=[c for c, _ in BAD_WITH_FD])
def test_refused_vmm_is_killed_and_others_are_served(
    tmp_path: Path, case: str, payload: str | dict[str, Any] | None
) -> None:
    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        policy = FirecrackerPolicy(fd_wait=0.5)
        async with firecracker_daemon(sock, backing, policy):
            config: dict[str, Any] = {"socket": str(sock), "memfile": str(memfile), "sets": [SET]}
            if payload is None:
                config["send"] = "no_fd"
            elif isinstance(payload, dict):
                config.update(payload)
            else:
                config["payload"] = payload
            async with vmm(**config) as bad:
                # It touches guest memory next: it would block for ever if left alive.
                assert await bad.wait() == -signal.SIGKILL
            await uffds_closed()
            async with vmm(socket=str(sock), memfile=str(memfile), sets=[SET]) as good:
                await good.step("verified")
                assert await good.wait() == 0

    run(tmp_path, scenario)


@pytest.mark.parametrize("garbage", ["hello", "{", "[1, 2"])
def test_garbage_without_fd_is_dropped_not_killed(tmp_path: Path, garbage: str) -> None:
    """A peer that never passed a uffd is not shown to be a VMM: closed, not signalled."""

    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        async with firecracker_daemon(sock, backing):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(garbage.encode())
            await writer.drain()
            if garbage == "hello":
                assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by uffdd
            else:
                writer.write_eof()  # an unfinished message, then a hang-up
                assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            await writer.wait_closed()
            async with vmm(socket=str(sock), memfile=str(memfile), sets=[SET]) as good:
                await good.step("verified")
                assert await good.wait() == 0

    run(tmp_path, scenario)


def test_huge_pages(tmp_path: Path) -> None:
    """2 MiB pages on hugetlbfs: demand faults served with whole huge pages (a zero
    page by copying zeros: hugetlbfs has no ZEROPAGE), a page dropped during the
    transfer answered with copied zeros too, one dropped after the handler let go by
    the kernel (the memory is unregistered by then)."""
    pages = Path("/proc/sys/vm/nr_hugepages")
    if int(pages.read_text()) < 16:
        try:
            pages.write_text("32")
        except OSError as exc:
            pytest.skip(f"no huge pages on this host and cannot reserve any: {exc}")
    free = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("HugePages_Free:")
        )
    )
    if free < 6:
        pytest.skip(f"only {free} free huge pages on this host")
    memfile = tmp_path / "snapshot.mem"
    size = 6 * HUGE
    make_memfile(memfile, size, [(HUGE, HUGE), (4 * HUGE + PAGE, PAGE)])
    backing = LocalImage(image_from_memfile(memfile, tmp_path / "cache", HUGE))
    regions = [
        {"offset": 0, "size": 4 * HUGE, "page_size": HUGE},
        {"offset": 4 * HUGE, "size": 2 * HUGE, "page_size": HUGE},
    ]

    async def scenario() -> None:
        sock = tmp_path / "fc.sock"
        gated = GatedBacking(backing)
        async with (
            firecracker_daemon(sock, gated, max_inflight_bytes=2 * MIB),
            vmm(
                socket=str(sock),
                memfile=str(memfile),
                sets=[regions],
                probe=[[0, 0, HUGE, HUGE], [0, 1, HUGE, HUGE]],  # a zero page, a data page
                balloon=[[0, 0, 2 * HUGE, HUGE]],
                resident_balloon=[[0, 1, HUGE, HUGE]],
            ) as machine,
        ):
            await machine.step("probed")
            await machine.step("ballooned")
            assert gated.held
            gated.open()
            await machine.step("verified")
            await machine.step("unregistered")
            await machine.step("verified")
            assert await machine.wait() == 0

    try:
        asyncio.run(scenario())
    finally:
        backing.close()
    assert uffd_count() == 0


def test_vmm_exit_mid_transfer_releases_everything(tmp_path: Path) -> None:
    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        gated = GatedBacking(backing)
        async with firecracker_daemon(sock, gated):
            async with vmm(
                socket=str(sock), memfile=str(memfile), sets=[SET], touch=False
            ) as machine:
                await machine.step("sent")
                await gated.requested.wait()  # being served, nothing delivered
                assert await machine.wait() == 0  # it exits without ever faulting
            await uffds_closed()
            gated.open()
            async with vmm(socket=str(sock), memfile=str(memfile), sets=[SET]) as good:
                await good.step("verified")
                assert await good.wait() == 0

    run(tmp_path, scenario)


def test_resident_vm_outlives_the_daemon(tmp_path: Path) -> None:
    """Once resident the memory is unregistered, so uffdd may stop (or restart) while
    the VM runs on: later balloon drops neither block nor bring snapshot data back."""

    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        machine: Vmm | None = None
        try:
            async with firecracker_daemon(sock, backing):
                machine = await Vmm.start(
                    socket=str(sock),
                    memfile=str(memfile),
                    sets=[SET],
                    resident_balloon=[[0, 0, MIB, PAGE]],
                    hold=True,
                    final_balloon=[[0, 0, 0, 8 * PAGE], [0, 1, 2 * MIB, MIB]],
                )
                await machine.step("unregistered")
                await machine.step("verified")
            assert uffd_count() == 0  # the daemon stopped and let go of the VM
            machine.release()  # now drop more pages and check everything, without uffdd
            verified = await machine.step("verified")
            assert verified["bytes"] == SIZE
            assert await machine.wait() == 0
        finally:
            if machine is not None:
                await machine.reap()

    run(tmp_path, scenario)


def test_stopping_mid_handover_kills_the_waiting_vmm(tmp_path: Path) -> None:
    """uffdd stops while a VMM's region list waits for its fd: it is never served, so
    it must not be left blocked on its own uffd."""

    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        machine: Vmm | None = None
        try:
            async with firecracker_daemon(sock, backing, FirecrackerPolicy(fd_wait=600.0)):
                machine = await Vmm.start(
                    socket=str(sock), memfile=str(memfile), sets=[SET], send="no_fd"
                )
                await machine.step("sent")
            assert await machine.wait() == -signal.SIGKILL
        finally:
            if machine is not None:
                await machine.reap()

    run(tmp_path, scenario)


FC_FAMILY = r"""
import json, os, socket, sys
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.restorer import map_anonymous

config = json.loads(sys.argv[1])
mode = config["mode"]
size = 64 * 4096
address = map_anonymous(size)  # mapped here, so in the child too (its own VMA)
payload = json.dumps(
    [{"base_host_virt_addr": address, "size": size, "offset": 0, "page_size": 4096}]
).encode()
handler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
handler.connect(config["socket"])  # SO_PEERCRED: this process, whoever sends
ours, theirs = socket.socketpair()
child = os.fork()
if child == 0:
    # The child makes the uffd, registers its own guest memory with it and keeps it.
    uffd = Uffd.create(nonblocking=True)
    uffd.api(Feature.EVENT_REMOVE)
    uffd.register(address, size, RegisterMode.MISSING)
    if mode == "the child sends it on its parent's connection":
        socket.send_fds(handler, [payload], [uffd.fd])
    else:
        socket.send_fds(theirs, [b"uffd"], [uffd.fd])
    sys.stdin.read()
    os._exit(0)
if mode != "the child sends it on its parent's connection":
    _, fds, _, _ = socket.recv_fds(ours, 16, 1)  # the parent holds the child's uffd
    socket.send_fds(handler, [payload], fds)
handler.settimeout(60)
closed = handler.recv(1) == b""
print(json.dumps({"pid": os.getpid(), "child": child, "closed": closed}), flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("the child sends it on its parent's connection", "holds no descriptor"),
        ("the parent hands it over as its own", "is not registered for missing faults"),
    ],
)
def test_a_uffd_of_another_process_is_refused_and_nobody_killed(
    tmp_path: Path, mode: str, words: str
) -> None:
    """A peer handing over a uffd its child made (and registered its own memory with):
    refused, the connection closed, nothing served, both processes left running."""

    async def scenario(memfile: Path, backing: LocalImage) -> None:
        sock = tmp_path / "fc.sock"
        async with firecracker_daemon(sock, backing):
            with structlog.testing.capture_logs() as logs:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    FC_FAMILY,
                    json.dumps({"socket": str(sock), "mode": mode}),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                assert process.stdin is not None
                assert process.stdout is not None
                said: dict[str, Any] = {}
                try:
                    said = json.loads(await asyncio.wait_for(process.stdout.readline(), 60))
                    assert said["closed"]  # refused: uffdd hung up
                    assert process.returncode is None
                    pidfd = os.pidfd_open(said["child"])
                    try:
                        assert pidfd_alive(pidfd)
                    finally:
                        os.close(pidfd)
                    await uffds_closed()  # the received copy is closed
                    refusals = [e for e in logs if e["event"] == "refused a Firecracker handover"]
                    assert len(refusals) == 1, logs
                    assert refusals[0]["pid"] == said["pid"], logs
                    assert words in refusals[0]["reason"], logs
                    assert refusals[0]["killed"] is False, logs
                    assert not [e for e in logs if e["event"] == "serving"], logs  # untracked
                    process.stdin.close()
                    assert await asyncio.wait_for(process.wait(), 60) == 0
                finally:
                    if process.returncode is None:
                        if "child" in said:  # first: its parent has not reaped it
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(said["child"], signal.SIGKILL)
                        process.kill()
                        await process.wait()
            async with vmm(socket=str(sock), memfile=str(memfile), sets=[SET]) as good:
                await good.step("verified")
                assert await good.wait() == 0

    run(tmp_path, scenario)
