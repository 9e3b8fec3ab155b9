"""One dumped task's memory as an image: lazy layout from mm + pagemap, data in place.

Why an ``ImageReader``: the page server's catalog and ``LocalImageSource`` serve
``ImageReader``s (regions, DATA/ZERO extents, zero-copy ``data``); a CRIU task presented
the same way is served by both unchanged, under the image id ``criu-<pid>``. The
regions are the task's VMAs that ``criu restore --lazy-pages`` registers (private
anonymous, not locked, not vdso/vvar/vsyscall); the pages of PE_LAZY entries are DATA
(their bytes lie in ``pages-<pages_id>.img`` at the offset the PE_PRESENT entries before
them leave); every other page of those regions reads as zeros. A lazy entry whose data
is not in the images (PE_PARENT, or no PE_PRESENT) is refused, never served as zeros.

CRIU images carry no checksums: ``data`` serves the bytes as they are on disk (the page
service still checksums every chunk on the wire).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from uffdd.core.addresses import PAGE_SIZE, ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.criu.images import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    CriuImageError,
    PagemapEntry,
    Vma,
    pages_path,
    read_mm,
    read_pagemap,
)
from uffdd.image.format import (
    CHECKSUM_ALGORITHM,
    Extent,
    ExtentKind,
    ImageSource,
    Region,
    stored_ranges,
)
from uffdd.image.reader import ImageRangeError, ImageReader

IMAGE_PREFIX = "criu-"


def image_id_for(pid: int) -> str:
    """The image id a task's memory has on the page service."""
    return f"{IMAGE_PREFIX}{pid}"


def pid_of(image_id: str) -> int | None:
    """The pid named by a ``criu-<pid>`` image id, or None."""
    digits = image_id.removeprefix(IMAGE_PREFIX)
    if image_id.startswith(IMAGE_PREFIX) and digits.isdigit() and not digits.startswith("0"):
        return int(digits)
    return None


@dataclass(frozen=True, slots=True)
class CriuLayout:
    """What a task's images say about its lazy memory (no page data needed)."""

    pid: int
    pages_id: int
    regions: tuple[Region, ...]
    extents: tuple[Extent, ...]
    """Tiling every region in address order; DATA offsets index the pages file."""
    pages_needed: int
    """Bytes the pages file must hold (every PE_PRESENT entry's data)."""

    @property
    def data(self) -> list[tuple[int, int]]:
        return stored_ranges(self.extents)

    @classmethod
    def load(cls, directory: Path, pid: int, page_size: int = PAGE_SIZE) -> CriuLayout:
        vmas = sorted((v for v in read_mm(directory, pid) if v.can_be_lazy()), key=_start)
        pages_id, entries = read_pagemap(directory, pid)
        name = f"pagemap-{pid}.img"
        regions: list[Region] = []
        for vma in vmas:
            if vma.start % page_size or vma.end % page_size or vma.end <= vma.start:
                raise CriuImageError(f"mm-{pid}.img: VMA [{vma.start:#x}, {vma.end:#x}) unaligned")
            if regions and vma.start < regions[-1].end:
                raise CriuImageError(f"mm-{pid}.img: VMAs overlap at {vma.start:#x}")
            regions.append(Region(ImageAddr(vma.start), vma.end - vma.start, page_size, "vma"))
        data: list[tuple[int, int, int]] = []  # start, end, offset in the pages file
        offset = 0
        previous_end = 0
        for entry in entries:
            _check_entry(entry, previous_end, page_size, name)
            end = entry.end(page_size)
            previous_end = end
            if entry.flags & PE_LAZY:
                if entry.flags & PE_PARENT or not entry.flags & PE_PRESENT:
                    raise CriuImageError(
                        f"{name}: lazy pages [{entry.vaddr:#x}, {end:#x}) are not in "
                        f"pages-{pages_id}.img (flags {entry.flags:#x}: "
                        f"{'in a parent dump' if entry.flags & PE_PARENT else 'not present'})"
                    )
                if not any(r.start <= entry.vaddr and end <= r.end for r in regions):
                    raise CriuImageError(
                        f"{name}: lazy pages [{entry.vaddr:#x}, {end:#x}) are not inside one "
                        f"lazy VMA of mm-{pid}.img"
                    )
                data.append((entry.vaddr, end, offset))
            if entry.flags & PE_PRESENT and not entry.flags & PE_PARENT:
                offset += end - entry.vaddr
        return cls(pid, pages_id, tuple(regions), _tile(regions, data), offset)


def _start(vma: Vma) -> int:
    return vma.start


def _check_entry(entry: PagemapEntry, previous_end: int, page_size: int, name: str) -> None:
    where = f"{name}: entry at {entry.vaddr:#x}"
    if entry.nr_pages <= 0:
        raise CriuImageError(f"{where} has no pages")
    if entry.vaddr % page_size:
        raise CriuImageError(f"{where} is not page-aligned")
    if entry.vaddr < previous_end:
        raise CriuImageError(f"{where} overlaps or precedes the entry before it")


def _tile(regions: list[Region], data: list[tuple[int, int, int]]) -> tuple[Extent, ...]:
    extents: list[Extent] = []
    index = 0
    for region in regions:
        position: int = region.start
        while index < len(data) and data[index][0] < region.end:
            start, end, offset = data[index]
            if start > position:
                extents.append(Extent(ImageAddr(position), start - position, ExtentKind.ZERO))
            extents.append(Extent(ImageAddr(start), end - start, ExtentKind.DATA, offset))
            position = end
            index += 1
        if position < region.end:
            extents.append(Extent(ImageAddr(position), region.end - position, ExtentKind.ZERO))
    return tuple(extents)


class CriuImageReader(ImageReader):
    """A task's lazy memory served from a CRIU images directory, zero-copy."""

    def __init__(self, directory: Path, layout: CriuLayout) -> None:
        # Not ImageReader.__init__ (that one reads a uffdd manifest); the same
        # attributes, so the inherited lookups (extents, region_of, close) apply.
        self.directory = directory
        self.layout = layout
        self.image_id = image_id_for(layout.pid)
        self.page_size = PAGE_SIZE
        self.chunk_size = PAGE_SIZE
        self.checksum_algorithm = CHECKSUM_ALGORITHM
        self.created_unix_ns = 0
        self.source = ImageSource(kind="criu", pid=layout.pid, path=str(directory))
        self.format_version = 0
        self.regions = layout.regions
        self._extents = layout.extents
        self._extent_starts = [e.start for e in layout.extents]
        self._checksums = ()
        self._verified = bytearray()
        data_extents = sorted(
            (e for e in layout.extents if e.kind is ExtentKind.DATA), key=lambda e: e.data_offset
        )
        self._data_extents = tuple(data_extents)
        self._data_offsets = [e.data_offset for e in data_extents]
        self.total_bytes = sum(r.length for r in layout.regions)
        self.data_bytes = sum(e.length for e in data_extents)
        self.zero_bytes = self.total_bytes - self.data_bytes
        path = pages_path(directory, layout.pages_id)
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise CriuImageError(f"cannot open {path}: {exc}") from exc
        self.data_size = os.fstat(self._file.fileno()).st_size
        if self.data_size < layout.pages_needed:
            self._file.close()
            raise CriuImageError(
                f"{path.name} is {self.data_size} bytes, pagemap-{layout.pid}.img needs "
                f"{layout.pages_needed} (truncated)"
            )
        self._map: mmap.mmap | None = None
        self._view = memoryview(b"")
        if self.data_size:
            self._map = mmap.mmap(self._file.fileno(), self.data_size, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)

    @classmethod
    def open_task(cls, directory: Path, pid: int) -> CriuImageReader:
        """Read ``pid``'s layout from ``directory`` and map its pages file."""
        return cls(directory, CriuLayout.load(directory, pid))

    def data(self, extent: Extent) -> memoryview:
        """The dumped bytes of a DATA extent (a view of the mapped pages file)."""
        if extent.kind is not ExtentKind.DATA:
            raise ValueError(f"extent at {extent.start:#x} is {extent.kind.name}, not DATA")
        begin, end = extent.data_offset, extent.data_offset + extent.length
        if end > self.data_size:
            raise ImageRangeError(f"extent at {extent.start:#x} lies beyond the pages file")
        if self._map is None:
            raise ImageError(f"image {self.image_id!r} is closed")
        if os.fstat(self._file.fileno()).st_size < end:
            raise ImageError(f"image {self.image_id!r}: the pages file shrank under the reader")
        return self._view[begin:end]

    def verify(self) -> list[str]:
        size = os.fstat(self._file.fileno()).st_size
        if size < self.layout.pages_needed:
            return [f"the pages file is {size} bytes, {self.layout.pages_needed} needed"]
        return []

    @property
    def chunk_count(self) -> int:
        return 0
