"""The restorer library and ``uffdd restore`` against a stand-in daemon that really serves.

The stand-in is the real listener (``accept_handovers``) with a callback that acks, then
installs every page of the image into the restored process with UFFDIO_COPY/ZEROPAGE
(or a corrupted page, to prove the check sees it) and reports Resident. ``uffdd
restore`` runs in a child process: it maps, hands over, and reads every byte of its own
memory (demand faults the stand-in resolves). The test process never touches
registered memory. In-process tests cover only failures before anything is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from uffdd.core.addresses import PAGE_SIZE, ImageAddr
from uffdd.core.events import PageFault
from uffdd.core.handover import ErrorCode, HandoverRejected, ResidentSummary
from uffdd.core.outcomes import Outcome
from uffdd.daemon.doors.native.listener import Handover, Listener, accept_handovers
from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.image.writer import ImageWriter
from uffdd.restorer import RegionSpec, RestoreError, Restorer, map_anonymous, unmap

pytestmark = pytest.mark.timeout(60)

P = PAGE_SIZE
WAIT = 20.0
SUMMARY = ResidentSummary(
    pages=1, bytes=2, faults=3, fault_p50_us=4.5, fault_p99_us=6.5, seconds_to_resident=7.5
)
CLI = [sys.executable, "-m", "uffdd", "restore"]
HIGH = 0x3E0000000000
"""Image addresses for --placement image: far from anything a Python process maps."""


def make_image(root: Path, base: int = 0x10000) -> Path:
    """Two regions: data pages with zero holes, and a small all-data one."""
    rng = random.Random(7)
    with ImageWriter(root, "restore-test", page_size=P) as writer:
        writer.add_region(ImageAddr(base), 12 * P, name="heap")
        for page in (0, 1, 2, 5, 8, 11):
            writer.write(ImageAddr(base + page * P), rng.randbytes(P))
        writer.add_region(ImageAddr(base + 0x100000), 3 * P, name="stack")
        writer.write(ImageAddr(base + 0x100000), rng.randbytes(3 * P))
        return writer.commit()


def serve_everything(
    reader: ImageReader, corrupt: int | None = None
) -> Callable[[Handover], Awaitable[None]]:
    """A callback that acks, installs every page (flipping one byte of the page at image
    address ``corrupt``), reports Resident and lets go of the uffd."""

    async def serve(handover: Handover) -> None:
        await handover.reply.send_ack()
        for region in handover.regions:
            shift = region.run_address - region.image_address
            for extent in reader.extents(ImageAddr(region.image_address), region.length):
                if extent.kind is ExtentKind.DATA:
                    data = bytearray(reader.data(extent))
                    if corrupt is not None and extent.start <= corrupt < extent.end:
                        data[corrupt - extent.start + 100] ^= 0xFF
                    result = handover.uffd.copy(extent.start + shift, data)
                else:
                    result = handover.uffd.zeropage(extent.start + shift, extent.length)
                assert result.outcome is Outcome.DONE, result
        await handover.reply.send_resident(SUMMARY)
        handover.close()  # every page is in: letting go is safe now

    return serve


def serve_on_demand(reader: ImageReader, tids: set[int]) -> Callable[[Handover], Awaitable[None]]:
    """A callback that acks, then installs exactly the pages that fault, one per fault,
    until every page is in; it reports the number of faults it served."""

    async def serve(handover: Handover) -> None:
        await handover.reply.send_ack()
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(handover.uffd.fd, readable.set)
        missing = {
            page
            for region in handover.regions
            for page in range(region.run_address, region.run_end, region.page_size)
        }
        faults = 0
        try:
            while missing:
                await asyncio.wait_for(readable.wait(), WAIT)
                readable.clear()
                for event in handover.uffd.read_events():
                    assert isinstance(event, PageFault), event
                    faults += 1
                    tids.add(event.tid)
                    page = event.address - event.address % P
                    region = next(r for r in handover.regions if r.run_address <= page < r.run_end)
                    image_page = ImageAddr(page - region.run_address + region.image_address)
                    (extent,) = reader.extents(image_page, P)
                    if extent.kind is ExtentKind.DATA:
                        result = handover.uffd.copy(page, reader.data(extent))
                    else:
                        result = handover.uffd.zeropage(page, P)
                    assert result.outcome is Outcome.DONE, result
                    missing.discard(page)
        finally:
            loop.remove_reader(handover.uffd.fd)
        await handover.reply.send_resident(
            ResidentSummary(
                pages=faults,
                bytes=faults * P,
                faults=faults,
                fault_p50_us=0.0,
                fault_p99_us=0.0,
                seconds_to_resident=0.0,
            )
        )
        handover.close()

    return serve


@contextlib.asynccontextmanager
async def stand_in(
    path: Path, on_handover: Callable[[Handover], Awaitable[None]]
) -> AsyncIterator[None]:
    listener = Listener.bind(path)
    task = asyncio.create_task(accept_handovers(listener.sock, on_handover))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        listener.close()


async def run_cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``uffdd restore`` in a child; (exit status, its JSON report or None, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    report = json.loads(out) if out.strip() else None
    return proc.returncode, report, err.decode()


# -- uffdd restore ---------------------------------------------------------------------------


def test_restore_verifies_every_byte(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images")

    async def scenario() -> tuple[int, dict[str, Any] | None, str]:
        with ImageReader.open(image) as reader:
            async with stand_in(tmp_path / "h.sock", serve_everything(reader)):
                return await run_cli(str(image), "--handover", str(tmp_path / "h.sock"))

    status, report, err = asyncio.run(scenario())
    assert status == 0, err
    assert report is not None
    assert report["mismatched_pages"] == 0
    assert report["checked"] == "verify"
    assert report["bytes"] == 15 * P
    assert report["image_id"] == "restore-test"
    assert sorted(r["image_address"] for r in report["regions"]) == [0x10000, 0x110000]
    # placement "anywhere": the kernel chose the run-time addresses
    assert all(r["run_address"] != r["image_address"] for r in report["regions"])
    assert report["resident"] == {
        "pages": 1,
        "bytes": 2,
        "faults": 3,
        "fault_p50_us": 4.5,
        "fault_p99_us": 6.5,
        "seconds_to_resident": 7.5,
    }


@pytest.mark.parametrize("mode", ["--verify", "--touch"])
def test_every_page_is_a_demand_fault_served_by_the_daemon(tmp_path: Path, mode: str) -> None:
    """Nothing is installed ahead: each page the child reads faults once, on the
    daemon's copy of the uffd (the child closed its own), with the faulting thread id."""
    image = make_image(tmp_path / "images")
    tids: set[int] = set()

    async def scenario() -> tuple[int, dict[str, Any] | None, str]:
        with ImageReader.open(image) as reader:
            async with stand_in(tmp_path / "h.sock", serve_on_demand(reader, tids)):
                return await run_cli(str(image), "--handover", str(tmp_path / "h.sock"), mode)

    status, report, err = asyncio.run(scenario())
    assert status == 0, err
    assert report is not None
    assert report["mismatched_pages"] == 0
    assert report["resident"]["faults"] == 15  # 12 + 3 pages, each exactly once
    assert len(tids) == 1
    assert 0 not in tids  # THREAD_ID was negotiated by the restorer


def test_restore_reports_a_wrong_page(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images")
    bad_page = 0x10000 + 5 * P

    async def scenario() -> tuple[int, dict[str, Any] | None, str]:
        with ImageReader.open(image) as reader:
            async with stand_in(tmp_path / "h.sock", serve_everything(reader, bad_page)):
                return await run_cli(str(image), "--handover", str(tmp_path / "h.sock"))

    status, report, err = asyncio.run(scenario())
    assert status == 1, err
    assert report is not None
    assert report["mismatched_pages"] == 1
    assert report["first_mismatches"] == [hex(bad_page)]


def test_restore_at_image_addresses_touching_only(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images", base=HIGH)

    async def scenario() -> tuple[int, dict[str, Any] | None, str]:
        with ImageReader.open(image) as reader:
            async with stand_in(tmp_path / "h.sock", serve_everything(reader)):
                return await run_cli(
                    str(image),
                    "--handover",
                    str(tmp_path / "h.sock"),
                    "--placement",
                    "image",
                    "--touch",
                    "--no-wait-resident",
                    "--label",
                    "case=image",
                )

    status, report, err = asyncio.run(scenario())
    assert status == 0, err
    assert report is not None
    assert report["checked"] == "touch"
    assert report["resident"] is None
    assert all(r["run_address"] == r["image_address"] for r in report["regions"])
    assert report["regions"][0]["run_address"] == HIGH


def test_restore_says_why_the_daemon_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images")

    async def refuse(handover: Handover) -> None:
        raise HandoverRejected(ErrorCode.REFUSED, f"image {handover.image_id} is unknown")

    async def scenario() -> tuple[int, dict[str, Any] | None, str]:
        async with stand_in(tmp_path / "h.sock", refuse):
            return await run_cli(
                str(image), "--handover", str(tmp_path / "h.sock"), "--image-id", "other"
            )

    status, report, err = asyncio.run(scenario())
    assert status == 3
    assert report is None
    assert "the daemon refused the handover (REFUSED): image other is unknown" in err


def test_restore_without_a_daemon(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images")
    status, report, err = asyncio.run(
        run_cli(str(image), "--handover", str(tmp_path / "nobody.sock"))
    )
    assert status == 3
    assert report is None
    assert "No such file or directory" in err


def test_restore_rejects_a_bad_label(tmp_path: Path) -> None:
    image = make_image(tmp_path / "images")
    status, _, err = asyncio.run(run_cli(str(image), "--label", "novalue"))
    assert status == 2
    assert "'novalue' is not KEY=VALUE" in err


# -- the library, failing before anything is served (in-process, nothing touched) -----------


def _mapped(address: int) -> bool:
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            low, high = (int(part, 16) for part in line.split()[0].split("-"))
            if low <= address < high:
                return True
    return False


def test_map_never_replaces_an_existing_mapping() -> None:
    taken = map_anonymous(2 * P)
    try:
        with pytest.raises(RestoreError, match="already mapped in this process"):
            map_anonymous(P, address=taken + P)
    finally:
        unmap(taken, 2 * P)


@pytest.mark.parametrize(
    ("length", "page_size", "address", "words"),
    [
        (P + 1, P, None, "not a positive multiple"),
        (0, P, None, "not a positive multiple"),
        (P, P, HIGH + 12, "not aligned"),
        (P, 8192, None, "not 4 KiB, 2 MiB or 1 GiB"),
    ],
)
def test_map_argument_errors(length: int, page_size: int, address: int | None, words: str) -> None:
    with pytest.raises(RestoreError, match=words):
        map_anonymous(length, page_size, address)


def test_a_taken_range_fails_the_restore_and_undoes_the_rest(tmp_path: Path) -> None:
    taken = map_anonymous(P)
    free = HIGH + 0x10000000
    try:
        regions = [
            RegionSpec(image_address=0, length=P, run_address=free),
            RegionSpec(image_address=P, length=P, run_address=taken),
        ]
        with pytest.raises(RestoreError, match="already mapped"):
            Restorer(tmp_path / "unused.sock").restore("img", regions)
        assert not _mapped(free)  # the first region was unmapped again
        assert _mapped(taken)  # and the one it ran into is untouched
    finally:
        unmap(taken, P)


def test_no_daemon_undoes_mapping_and_registration(tmp_path: Path) -> None:
    free = HIGH + 0x20000000
    region = RegionSpec(image_address=0, length=4 * P, run_address=free)
    with pytest.raises(FileNotFoundError):
        Restorer(tmp_path / "nobody.sock", timeout=5).restore("img", [region])
    assert not _mapped(free)


def test_caller_mapped_memory_needs_run_addresses(tmp_path: Path) -> None:
    with pytest.raises(RestoreError, match="needs a run_address"):
        Restorer(tmp_path / "x.sock").restore(
            "img", [RegionSpec(image_address=0, length=P)], map_memory=False
        )


# -- the restorer's copy of the uffd ----------------------------------------------------------

HOLDER_CHILD = r"""
import json, os, sys
from uffdd.demo import vm
from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.restorer import RegionSpec, Restorer

def say(**fields):
    print(json.dumps(fields), flush=True)

P = 4096
reader = ImageReader.open(sys.argv[1])
restore = Restorer(sys.argv[2], timeout=20).restore(
    reader.image_id, [RegionSpec(r.start, r.length, r.page_size) for r in reader.regions]
)
say(holds=restore.holds_uffd)
sys.stdin.readline()  # the daemon served every page, reported Resident and let go
wrong = 0
for region in restore.regions:
    shift = region.run_address - region.image_address
    for extent in reader.extents(region.image_address, region.length):
        data = extent.kind is ExtentKind.DATA
        want = bytes(reader.data(extent)) if data else bytes(extent.length)
        got = vm.read(extent.start + shift, extent.length)
        wrong += sum(got[at : at + P] != want[at : at + P] for at in range(0, extent.length, P))
first = restore.regions[0]
# Each of these raises an event on a range the uffd registers, and waits until someone
# reads it: with the restorer's copy open, only the daemon's let-go frees them.
vm.drop(first.run_address, P)
dropped = vm.read(first.run_address, P) == bytes(P)
child = os.fork()
if child == 0:
    os._exit(restore.holds_uffd)  # the fork hook closed the inherited copy
_, status = os.waitpid(child, 0)
vm.unmap(first.run_address, first.length)
say(wrong=wrong, dropped_reads_zeros=dropped, child_holds=os.waitstatus_to_exitcode(status),
    holds=restore.holds_uffd)
restore.close()
say(holds=restore.holds_uffd)
"""


def test_the_restorer_keeps_its_copy_and_the_daemon_lets_go_at_resident(tmp_path: Path) -> None:
    """The restorer holds its uffd past the ack (it never reads the Resident report
    here). After Resident the daemon unregisters the memory and reads the events left,
    so the process's madvise, fork and munmap run on instead of waiting for an event
    nobody reads; every byte is the image's, the dropped page reads zeros."""
    image = make_image(tmp_path / "images")

    async def scenario() -> list[dict[str, Any]]:
        with ImageReader.open(image) as reader:
            served = asyncio.Event()
            serve = serve_everything(reader)

            async def serve_then_say(handover: Handover) -> None:
                await serve(handover)  # ... send_resident, handover.close()
                served.set()

            sock = tmp_path / "h.sock"
            async with stand_in(sock, serve_then_say):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    HOLDER_CHILD,
                    str(image),
                    str(sock),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                assert proc.stdin is not None
                assert proc.stdout is not None
                try:
                    said = [json.loads(await asyncio.wait_for(proc.stdout.readline(), WAIT))]
                    await asyncio.wait_for(served.wait(), WAIT)
                    proc.stdin.write(b"go\n")
                    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                assert proc.returncode == 0, err.decode()
                return said + [json.loads(line) for line in out.splitlines()]

    said = asyncio.run(scenario())
    assert said == [
        {"holds": True},
        {"wrong": 0, "dropped_reads_zeros": True, "child_holds": 0, "holds": True},
        {"holds": False},
    ]
