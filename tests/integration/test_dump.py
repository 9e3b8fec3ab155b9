"""`uffdd dump` of a real child process: every page checked against /proc/PID/mem."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from uffdd.cli import dump
from uffdd.core.addresses import ImageAddr
from uffdd.image import dump as dump_module
from uffdd.image.format import DATA_NAME, TEMP_PREFIX, ExtentKind
from uffdd.image.procmem import process_state, read_mappings, select_mappings
from uffdd.image.procmem import resume_process as real_resume
from uffdd.image.reader import ImageReader
from uffdd.image.store import ImageStore
from uffdd.image.writer import ImageWriter

pytestmark = pytest.mark.timeout(60)

P = 4096

# The child maps private anonymous regions with a known layout, reports their
# addresses, then answers "ping" with "pong" until its stdin closes.
#   a: 16 pages. 0-3 pattern, 4-7 never touched, 8 written with zeros, 9 pattern then
#      overwritten with zeros, 10 pattern then MADV_DONTNEED, 11-15 pattern.
#   b: 4 pages never touched.
#   c: 80 pages of pseudo-random data (spans several 64 KiB checksum chunks).
CHILD = r"""
import ctypes, json, mmap, random, sys
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
P = 4096
def address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
def pattern(tag, i):
    return (f"{tag}{i:04d}" * P).encode()[:P]
a = mmap.mmap(-1, 16 * P, flags=flags)
b = mmap.mmap(-1, 4 * P, flags=flags)
c = mmap.mmap(-1, 80 * P, flags=flags)
for i in [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]:
    a[i * P:(i + 1) * P] = pattern("a", i)
a[8 * P:9 * P] = bytes(P)
a[9 * P:10 * P] = bytes(P)
a.madvise(mmap.MADV_DONTNEED, 10 * P, P)
c[:] = random.Random(7).randbytes(80 * P)
print(json.dumps({"a": address(a), "b": address(b), "c": address(c)}), flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


def pattern(tag: str, i: int) -> bytes:
    return (f"{tag}{i:04d}" * P).encode()[:P]


class Child:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.addresses: dict[str, int] = json.loads(self.process.stdout.readline())
        self.pid = self.process.pid

    def ping(self) -> bool:
        """True if the child runs: it answers (a stopped child would hang the test)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write("ping\n")
        self.process.stdin.flush()
        return self.process.stdout.readline() == "pong\n"

    def continued(self) -> bool:
        """Whether the child, once stopped, was resumed by a SIGCONT since (waitpid's
        WCONTINUED report, set when the signal is sent; read without waiting)."""
        pid, status = os.waitpid(self.pid, os.WCONTINUED | os.WNOHANG)
        return pid == self.pid and os.WIFCONTINUED(status)

    def read_memory(self, start: int, length: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            return os.pread(mem.fileno(), length, start)

    def stop(self) -> None:
        """SIGSTOP, and wait until the child has stopped (waitpid's WUNTRACED report)."""
        os.kill(self.pid, signal.SIGSTOP)
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the child did not stop: status {status:#x}"

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def child() -> Iterator[Child]:
    spawned = Child()
    try:
        yield spawned
    finally:
        spawned.close()  # always reaped


def run_dump(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(dump, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def kind_of(reader: ImageReader, address: int) -> ExtentKind:
    (extent,) = reader.extents(ImageAddr(address), P)
    return extent.kind


def snapshot(pid: int) -> dict[int, list[bytes | None]]:
    """The pages of every mapping a dump selects, read now (None: unreadable page)."""
    pages: dict[int, list[bytes | None]] = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for mapping in select_mappings(read_mappings(pid)):
            content: list[bytes | None] = []
            for address in range(mapping.start, mapping.end, P):
                try:
                    content.append(os.pread(mem.fileno(), P, address))
                except OSError:
                    content.append(None)  # a file mapping past the end of its file
            pages[mapping.start] = content
    return pages


def test_dump_captures_every_page_exactly(
    child: Child, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child's memory as the dump saw it: read at the moment the dump resumes it
    # (still stopped), since a running Python process keeps touching its own heap.
    memory: dict[int, list[bytes | None]] = {}

    def snapshot_then_resume(pid: int) -> None:
        assert process_state(pid) == "T"
        memory.update(snapshot(pid))
        real_resume(pid)

    monkeypatch.setattr(dump_module, "resume_process", snapshot_then_resume)
    code, out, err = run_dump(str(child.pid), "-o", str(tmp_path), "--image-id", "kid")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "kid")
    assert "dumped" in err
    assert child.continued(), "the child was not resumed after the dump"
    assert child.ping(), "the child does not run after the dump"

    a, b, c = (child.addresses[name] for name in "abc")
    with ImageReader.open(tmp_path / "kid") as reader:
        assert reader.verify() == []
        assert reader.source.pid == child.pid
        assert reader.source.kind == "process"
        assert reader.source.cmdline[0] == sys.executable
        names = {region.name for region in reader.regions}
        assert "[heap]" in names or "[stack]" in names
        assert not names & {"[vvar]", "[vdso]", "[vsyscall]"}

        # The known layout: data, never touched, explicit zero, zeroed, dropped.
        expected_kinds = dict.fromkeys((0, 1, 2, 3, 11, 12, 13, 14, 15), ExtentKind.DATA)
        expected_kinds.update(dict.fromkeys((4, 5, 6, 7, 8, 9, 10), ExtentKind.ZERO))
        for i, kind in expected_kinds.items():
            assert kind_of(reader, a + i * P) is kind, f"page a[{i}]"
            if kind is ExtentKind.DATA:
                (extent,) = reader.extents(ImageAddr(a + i * P), P)
                assert bytes(reader.data(extent)) == pattern("a", i)
        for i in range(4):
            assert kind_of(reader, b + i * P) is ExtentKind.ZERO
        extents = reader.extents(ImageAddr(c), 80 * P)
        assert [e.kind for e in extents] == [ExtentKind.DATA]
        assert bytes(reader.data(extents[0])) == child.read_memory(c, 80 * P)

        # Zero pages are recorded, not stored.
        stored = sum(e.length for e in reader.all_extents() if e.kind is ExtentKind.DATA)
        assert stored == reader.data_bytes == (tmp_path / "kid" / DATA_NAME).stat().st_size
        assert reader.zero_bytes > 0

        # Every page of every captured mapping equals the child's memory, page by page.
        assert sorted(memory) == [region.start for region in reader.regions]
        for region in reader.regions:
            pages = memory[region.start]
            assert len(pages) * P == region.length
            for index, content in enumerate(pages):
                address = region.start + index * P
                (extent,) = reader.extents(ImageAddr(address), P)
                if extent.kind is ExtentKind.DATA:
                    assert content is not None
                    assert bytes(reader.data(extent)) == content, f"{region.name} {address:#x}"
                else:
                    assert content in (None, bytes(P)), f"{region.name} {address:#x}"


def test_dump_skips_unselected_mappings(child: Child, tmp_path: Path) -> None:
    code, _, err = run_dump(
        str(child.pid), "-o", str(tmp_path), "--image-id", "kid", "--exclude", "[[]stack]"
    )
    assert code == 0, err
    mappings = read_mappings(child.pid)
    with ImageReader.open(tmp_path / "kid") as reader:
        names = [region.name for region in reader.regions]
        assert "[stack]" not in names
        for region in reader.regions:  # every region is a readable private mapping
            (mapping,) = [m for m in mappings if m.start == region.start]
            assert mapping.perms[0] == "r"
            assert mapping.perms[3] == "p"
            assert mapping.end == region.end
    assert child.ping()


def test_a_failing_dump_resumes_the_child_and_leaves_no_image(
    child: Child, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states: list[str] = []

    def fail(self: ImageWriter, address: ImageAddr, data: object) -> None:
        states.append(process_state(child.pid))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ImageWriter, "write", fail)
    code, _, err = run_dump(str(child.pid), "-o", str(tmp_path), "--image-id", "kid")
    assert code == 1
    assert "No space left on device" in err
    assert states == ["T"], "the child was not stopped while it was read"
    assert child.ping(), "the child was not resumed after a failed dump"
    assert list(tmp_path.iterdir()) == []
    assert ImageStore(tmp_path).list() == []


def test_a_dump_error_is_reported_and_resumes_the_child(
    child: Child, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(fd: int, view: memoryview, address: int, pid: int) -> None:
        raise dump_module.DumpError(f"cannot read memory of process {pid} at {address:#x}")

    monkeypatch.setattr(dump_module, "_read_exactly", unreadable)
    code, _, err = run_dump(str(child.pid), "-o", str(tmp_path))
    assert code == 1
    assert f"cannot read memory of process {child.pid}" in err
    assert child.ping()
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


def test_a_stopped_process_stays_stopped(child: Child, tmp_path: Path) -> None:
    child.stop()
    try:
        code, _, err = run_dump(str(child.pid), "-o", str(tmp_path), "--progress")
        assert code == 0, err
        assert process_state(child.pid) in "Tt"
    finally:
        child.resume()
    assert child.ping()
    (image_id,) = ImageStore(tmp_path).list()
    assert image_id.startswith(f"pid{child.pid}-")


def test_dump_of_a_missing_process(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    code, _, err = run_dump(str(gone.pid), "-o", str(tmp_path))
    assert code == 1
    assert f"no process {gone.pid}" in err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_dump_of_itself_is_refused(tmp_path: Path) -> None:
    code, _, err = run_dump(str(os.getpid()), "-o", str(tmp_path))
    assert code == 1
    assert "cannot dump itself" in err
