"""Dump a live process's private memory into an image (``uffdd dump``).

Why stop the process: a running process changes its memory while we read it, and a
torn snapshot restores into a process that crashes much later. The process is stopped
with SIGSTOP for the whole capture and always resumed afterwards (``finally``), also
when the dump fails; a process that was already stopped is left stopped.

Each page's image address is its virtual address in the dumped process, so a restore
can map the regions at the same addresses. Pages never populated (pagemap: neither
present nor swapped) of anonymous mappings are recorded as ZERO without being read;
populated pages, and every page of a private file mapping (an unpopulated one reads as
the file's bytes, not zeros), are read from /proc/PID/mem in large runs, and all-zero
ones are recorded as ZERO too.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.format import ImageSource
from uffdd.image.procmem import (
    Mapping,
    ProcessStopError,
    populated_runs,
    read_cmdline,
    read_mappings,
    resume_process,
    select_mappings,
    stop_process,
)
from uffdd.image.writer import ImageWriter

READ_SIZE = 4 * 1024 * 1024
"""Bytes per /proc/PID/mem read: large enough to amortise the syscall, small in RAM."""


class DumpError(ImageError):
    """The process could not be dumped (gone, not permitted, would not stop)."""


@dataclass(frozen=True, slots=True)
class DumpResult:
    path: Path
    regions: int
    read_bytes: int  # bytes read from the process (populated or file-backed pages)
    total_bytes: int  # bytes of all captured mappings
    unreadable_bytes: int = 0  # file-mapping pages past the end of their file: ZERO


def default_image_id(pid: int) -> str:
    return f"pid{pid}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


Progress = Callable[[int], None]
"""Called with the number of bytes just read."""


def dump_process(
    pid: int,
    root: Path,
    image_id: str | None = None,
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    start_progress: Callable[[int], Progress] | None = None,
) -> DumpResult:
    """Capture ``pid``'s private memory as image ``image_id`` under ``root``.

    ``start_progress(total_bytes)`` is called once the bytes to read are known and
    returns a callback fed with bytes read as the dump goes.
    """
    if pid == os.getpid():
        raise DumpError("a process cannot dump itself (it would stop itself)")
    image_id = image_id or default_image_id(pid)
    source = ImageSource(
        kind="process", pid=pid, cmdline=read_cmdline(pid), host=socket.gethostname()
    )
    try:
        was_running = stop_process(pid)
    except ProcessLookupError:
        raise DumpError(f"no process {pid}") from None
    except FileNotFoundError:
        raise DumpError(f"no process {pid}") from None
    except PermissionError as exc:
        raise DumpError(f"not permitted to stop process {pid}: {exc}") from exc
    except ProcessStopError as exc:
        raise DumpError(str(exc)) from exc
    try:
        return _capture(
            pid=pid,
            root=root,
            image_id=image_id,
            source=source,
            include=include,
            exclude=exclude,
            start_progress=start_progress,
        )
    finally:
        if was_running:
            resume_process(pid)


def _capture(
    *,
    pid: int,
    root: Path,
    image_id: str,
    source: ImageSource,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    start_progress: Callable[[int], Progress] | None,
) -> DumpResult:
    try:
        mappings = select_mappings(read_mappings(pid), include, exclude)
        pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except FileNotFoundError:
        raise DumpError(f"no process {pid}") from None
    except PermissionError as exc:
        raise DumpError(f"not permitted to read the memory of process {pid}: {exc}") from exc
    try:
        # An unpopulated page of an anonymous mapping reads as zeros; one of a private
        # file mapping reads as the file's bytes, so file mappings are read whole.
        plan: list[tuple[Mapping, list[tuple[int, int]]]] = [
            (
                mapping,
                list(populated_runs(pagemap, mapping))
                if mapping.anonymous
                else [(mapping.start, mapping.length)],
            )
            for mapping in mappings
        ]
    finally:
        os.close(pagemap)
    to_read = sum(length for _, runs in plan for _, length in runs)
    progress = start_progress(to_read) if start_progress else _no_progress
    try:
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except PermissionError as exc:
        raise DumpError(f"not permitted to read the memory of process {pid}: {exc}") from exc
    unreadable = 0
    try:
        with ImageWriter(root, image_id, source=source) as writer:
            for mapping, _ in plan:
                writer.add_region(
                    ImageAddr(mapping.start), mapping.length, mapping.name, mapping.page_size
                )
            copier = _Copier(pid, mem, writer, progress)
            for mapping, runs in plan:
                for start, length in runs:
                    copier.copy(mapping, start, length)
            unreadable = copier.unreadable
            path = writer.commit()
    finally:
        os.close(mem)
    return DumpResult(path, len(plan), to_read, sum(m.length for m in mappings), unreadable)


def _no_progress(_: int) -> None:
    pass


class _Copier:
    """Copies runs of a stopped process's memory into the writer, in large reads."""

    def __init__(self, pid: int, mem: int, writer: ImageWriter, progress: Progress) -> None:
        self.pid = pid
        self.mem = mem
        self.writer = writer
        self.progress = progress
        self.buffer = bytearray(READ_SIZE)
        self.unreadable = 0

    def copy(self, mapping: Mapping, start: int, length: int) -> None:
        size = mapping.page_size
        chunk = max(READ_SIZE - READ_SIZE % size, size)
        if len(self.buffer) < chunk:
            self.buffer = bytearray(chunk)
        for offset in range(0, length, chunk):
            take = min(chunk, length - offset)
            address = start + offset
            view = memoryview(self.buffer)[:take]
            try:
                _read_exactly(self.mem, view, address, self.pid)
            except DumpError:
                if mapping.anonymous:
                    raise
                self._copy_by_page(mapping, address, view)
            else:
                self.writer.write(ImageAddr(address), view)
            self.progress(take)

    def _copy_by_page(self, mapping: Mapping, address: int, view: memoryview) -> None:
        """A file mapping past the end of its file: those pages fault (SIGBUS) in the
        process too; they are recorded as ZERO and counted as unreadable."""
        size = mapping.page_size
        for offset in range(0, len(view), size):
            page = view[offset : offset + size]
            try:
                _read_exactly(self.mem, page, address + offset, self.pid)
            except DumpError:
                self.writer.zero(ImageAddr(address + offset), size)
                self.unreadable += size
            else:
                self.writer.write(ImageAddr(address + offset), page)


def _read_exactly(fd: int, view: memoryview, address: int, pid: int) -> None:
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], address + done)
        except OSError as exc:
            raise DumpError(
                f"cannot read memory of process {pid} at {address + done:#x}: {exc}"
            ) from exc
        if got == 0:
            raise DumpError(f"unexpected end of memory of process {pid} at {address + done:#x}")
        done += got
