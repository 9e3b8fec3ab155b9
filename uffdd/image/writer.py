"""Writing an image atomically: a complete image appears, or nothing does.

Why so careful: a page server serves whatever directory it finds under its root, and a
restore that reads a half-written image would run on wrong memory. So the writer builds
the image in a hidden temp directory beside its final place (same filesystem), fsyncs
both files and the directory, renames it into place (refusing to replace an existing
image) and fsyncs the root. A crash at any point leaves at most a ``.tmp-*`` directory,
which no reader or store takes for an image.

Pages must arrive in ascending address order within each region (regions may be
filled in any order). All-zero pages are detected and recorded as ZERO, not stored;
pages of a region that are neither written nor zeroed before ``commit`` are ZERO too.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import xxhash

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.format import (
    CHECKSUM_ALGORITHM,
    DATA_NAME,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TEMP_PREFIX,
    ExtentKind,
    ImageSource,
    encode_manifest,
    is_power_of_two,
    source_to_proto,
    validate_image_id,
)
from uffdd.v1 import image_pb2

_WRITE_BUFFER = 4 * 1024 * 1024


@dataclass(slots=True)
class _RegionState:
    start: int
    length: int
    page_size: int
    name: str
    cursor: int  # every page below this address is recorded
    # [start, length, kind, data_offset], merged while appending
    extents: list[list[int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.length

    def append(self, start: int, length: int, kind: ExtentKind, data_offset: int) -> None:
        if length == 0:
            return
        last = self.extents[-1] if self.extents else None
        if (
            last is not None
            and last[2] == kind.value
            and last[0] + last[1] == start
            and (kind is ExtentKind.ZERO or last[3] + last[1] == data_offset)
        ):
            last[1] += length
        else:
            self.extents.append([start, length, kind.value, data_offset])
        self.cursor = start + length


class ImageWriter:
    """Builds one image under ``root``; a context manager that aborts on an exception."""

    def __init__(
        self,
        root: Path,
        image_id: str,
        *,
        page_size: int = 4096,
        source: ImageSource | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        validate_image_id(image_id)
        if not is_power_of_two(page_size) or page_size < 512:
            raise ValueError(f"page size {page_size} is not a power of two >= 512")
        if chunk_size % page_size or not is_power_of_two(chunk_size):
            raise ValueError(f"chunk size {chunk_size} is not a power-of-two page multiple")
        self.root = Path(root)
        self.image_id = image_id
        self.page_size = page_size
        self.chunk_size = chunk_size
        self.source = source or ImageSource(host=socket.gethostname())
        self.final_path = self.root / image_id
        if self.final_path.exists():
            raise ImageError(f"image {image_id!r} already exists in {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{image_id}-", dir=self.root))
        try:
            self._data: BinaryIO | None = open(  # noqa: SIM115 - closed in commit/abort
                self.temp_path / DATA_NAME, "wb", buffering=_WRITE_BUFFER
            )
        except BaseException:
            shutil.rmtree(self.temp_path, ignore_errors=True)
            raise
        self._data_size = 0
        self._hasher = xxhash.xxh3_64()
        self._chunk_fill = 0
        self._checksums: list[int] = []
        self._regions: list[_RegionState] = []  # sorted by start
        self._starts: list[int] = []
        self._done = False
        self._zero_pages: dict[int, bytes] = {}

    # -- layout -------------------------------------------------------------------------

    def add_region(
        self, start: ImageAddr, length: int, name: str = "", page_size: int | None = None
    ) -> None:
        """Declare [start, start + length); it must not overlap another region."""
        self._check_open()
        size = self.page_size if page_size is None else page_size
        if not is_power_of_two(size) or size % self.page_size:
            raise ValueError(
                f"region page size {size} is not a power-of-two multiple of {self.page_size}"
            )
        if start < 0 or length <= 0 or start % size or length % size:
            raise ValueError(
                f"region [{start:#x}, +{length:#x}) is empty or not aligned to its page size {size}"
            )
        index = bisect.bisect_left(self._starts, start)
        before = self._regions[index - 1] if index > 0 else None
        after = self._regions[index] if index < len(self._regions) else None
        for other in (before, after):
            if other is not None and other.start < start + length and start < other.end:
                raise ValueError(
                    f"region [{start:#x}, +{length:#x}) overlaps region "
                    f"[{other.start:#x}, +{other.length:#x}) {other.name!r}"
                )
        self._regions.insert(index, _RegionState(start, length, size, name, cursor=start))
        self._starts.insert(index, start)

    def _region_for(self, address: int, length: int) -> _RegionState:
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or not address + length <= self._regions[index].end:
            raise ValueError(f"[{address:#x}, +{length:#x}) is not inside one region")
        region = self._regions[index]
        if address % region.page_size or length % region.page_size:
            raise ValueError(
                f"[{address:#x}, +{length:#x}) is not aligned to the region's page size "
                f"{region.page_size}"
            )
        if address < region.cursor:
            raise ValueError(
                f"{address:#x} is below {region.cursor:#x}: pages of a region must be "
                "written in ascending order, each once"
            )
        return region

    # -- pages --------------------------------------------------------------------------

    def write(self, address: ImageAddr, data: bytes | bytearray | memoryview) -> None:
        """Record pages at ``address``; all-zero pages become ZERO and are not stored."""
        self._check_open()
        view = memoryview(data).cast("B")
        region = self._region_for(address, len(view))
        region.append(region.cursor, address - region.cursor, ExtentKind.ZERO, 0)
        size = region.page_size
        zero = self._zero_pages.get(size)
        if zero is None:
            zero = self._zero_pages[size] = bytes(size)
        run_start = 0  # start of the pending run of non-zero pages in view
        for offset in range(0, len(view), size):
            if bytes(view[offset : offset + size]) == zero:
                self._store(region, address + run_start, view[run_start:offset])
                region.append(address + offset, size, ExtentKind.ZERO, 0)
                run_start = offset + size
        self._store(region, address + run_start, view[run_start:])

    def zero(self, address: ImageAddr, length: int) -> None:
        """Record [address, address + length) as zero pages (explicit or never touched)."""
        self._check_open()
        region = self._region_for(address, length)
        region.append(region.cursor, address + length - region.cursor, ExtentKind.ZERO, 0)

    def _store(self, region: _RegionState, address: int, view: memoryview) -> None:
        if not view:
            return
        assert self._data is not None
        region.append(address, len(view), ExtentKind.DATA, self._data_size)
        self._data.write(view)
        self._data_size += len(view)
        position = 0
        while position < len(view):
            take = min(self.chunk_size - self._chunk_fill, len(view) - position)
            self._hasher.update(view[position : position + take])
            self._chunk_fill += take
            position += take
            if self._chunk_fill == self.chunk_size:
                self._checksums.append(self._hasher.intdigest())
                self._hasher.reset()
                self._chunk_fill = 0

    # -- finishing ----------------------------------------------------------------------

    def commit(self) -> Path:
        """Finish the image and move it into place atomically; return its directory."""
        self._check_open()
        assert self._data is not None
        if self._chunk_fill:
            self._checksums.append(self._hasher.intdigest())
            self._chunk_fill = 0
        manifest = image_pb2.ImageManifest(
            format_version=FORMAT_VERSION,
            image_id=self.image_id,
            created_unix_ns=time.time_ns(),
            source=source_to_proto(self.source),
            page_size=self.page_size,
            checksum_algorithm=CHECKSUM_ALGORITHM,
            chunk_size=self.chunk_size,
            data_size=self._data_size,
            chunk_checksums=self._checksums,
        )
        for region in self._regions:
            region.append(region.cursor, region.end - region.cursor, ExtentKind.ZERO, 0)
            manifest.regions.append(
                image_pb2.ImageRegion(
                    image_address=region.start,
                    length=region.length,
                    page_size=region.page_size,
                    name=region.name,
                    extents=[
                        image_pb2.ImageExtent(
                            image_address=start,
                            length=length,
                            kind=image_pb2.ImageExtentKind.ValueType(kind),
                            data_offset=offset,
                        )
                        for start, length, kind, offset in region.extents
                    ],
                )
            )
        try:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()
            self._data = None
            manifest_path = self.temp_path / MANIFEST_NAME
            with open(manifest_path, "wb") as out:
                out.write(encode_manifest(manifest))
                out.flush()
                os.fsync(out.fileno())
            _fsync_dir(self.temp_path)
            _rename_no_replace(self.temp_path, self.final_path)
            _fsync_dir(self.root)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.final_path

    def abort(self) -> None:
        """Discard everything written; no image appears. Safe to call twice."""
        self._done = True
        if self._data is not None:
            self._data.close()
            self._data = None
        shutil.rmtree(self.temp_path, ignore_errors=True)

    def _check_open(self) -> None:
        if self._done:
            raise ImageError(f"image writer for {self.image_id!r} is already finished")

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An exception, or leaving the block without commit(), leaves no image.
        if not self._done:
            self.abort()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) that fails if ``target`` exists (a plain rename replaces an empty dir)."""
    result = _libc.renameat2(
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
    )
    if result == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise ImageError(f"image {target.name!r} already exists in {target.parent}")
    if code in (errno.ENOSYS, errno.EINVAL) and not target.exists():
        os.rename(source, target)  # a filesystem without RENAME_NOREPLACE
        return
    raise OSError(code, os.strerror(code), str(target))
