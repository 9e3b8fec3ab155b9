"""Reading an image for serving: validate the layout once, then slice pages zero-copy.

Why this shape: the page server answers many small requests for the lifetime of an
image, so ``open`` does every cheap check up front (manifest, versions, sizes, layout)
and ``data`` returns ``memoryview`` slices of the mmap'ed data file without copying.
Checksums are verified lazily, chunk by chunk, the first time a chunk is served
(remembered afterwards), so opening a 64 GiB image is instant and a corrupt chunk is
still never served. ``verify`` checks everything eagerly (``uffdd image verify``).

Images are immutable: a data file truncated under a running reader would fault the
mmap (SIGBUS), so the reader re-checks the file size before touching a new chunk.
"""

from __future__ import annotations

import bisect
import mmap
import os
from pathlib import Path
from types import TracebackType

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.format import (
    CHECKSUM_ALGORITHM,
    DATA_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Extent,
    ExtentKind,
    ImageSource,
    Region,
    checksum,
    decode_manifest,
    is_power_of_two,
    source_from_proto,
)
from uffdd.v1 import image_pb2

__all__ = ["ImageRangeError", "ImageReader"]


class ImageRangeError(ImageError):
    """A requested range lies (partly) outside every region of the image."""


_KINDS = {kind.value: kind for kind in ExtentKind}


class ImageReader:
    """An open, layout-validated image; ``data`` verifies chunk checksums on first use."""

    def __init__(self, directory: Path, manifest: image_pb2.ImageManifest) -> None:
        # Use ImageReader.open(directory); this assumes a manifest that passed _validate.
        self.directory = directory
        self.image_id: str = manifest.image_id
        self.page_size: int = manifest.page_size
        self.chunk_size: int = manifest.chunk_size
        self.checksum_algorithm: str = manifest.checksum_algorithm
        self.created_unix_ns: int = manifest.created_unix_ns
        self.source: ImageSource = source_from_proto(manifest.source)
        self.format_version: int = manifest.format_version
        self.data_size: int = manifest.data_size
        self._checksums = tuple(manifest.chunk_checksums)
        self._verified = bytearray(len(self._checksums))
        regions: list[Region] = []
        extents: list[Extent] = []
        for r in manifest.regions:
            regions.append(Region(ImageAddr(r.image_address), r.length, r.page_size, r.name))
            extents.extend(
                Extent(ImageAddr(e.image_address), e.length, _KINDS[e.kind], e.data_offset)
                for e in r.extents
            )
        self.regions: tuple[Region, ...] = tuple(regions)
        self._extents = tuple(extents)
        self._extent_starts = [e.start for e in extents]
        data_extents = sorted(
            (e for e in extents if e.kind is ExtentKind.DATA), key=lambda e: e.data_offset
        )
        self._data_extents = tuple(data_extents)
        self._data_offsets = [e.data_offset for e in data_extents]
        self.total_bytes: int = sum(r.length for r in regions)
        self.data_bytes: int = sum(e.length for e in data_extents)
        self.zero_bytes: int = self.total_bytes - self.data_bytes
        self._file = open(directory / DATA_NAME, "rb")  # noqa: SIM115 - closed in close()
        self._map: mmap.mmap | None = None
        self._view: memoryview = memoryview(b"")
        if self.data_size:
            self._map = mmap.mmap(self._file.fileno(), self.data_size, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)

    @classmethod
    def open(cls, directory: Path) -> ImageReader:
        """Open and validate an image directory (no checksums yet); raise ImageError."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        problems = validate_layout(manifest)
        if problems:
            raise ImageError(f"image {directory}: {problems[0]}")
        data_path = directory / DATA_NAME
        try:
            size = data_path.stat().st_size
        except FileNotFoundError:
            raise ImageError(f"image {directory}: {DATA_NAME} is missing") from None
        if size != manifest.data_size:
            raise ImageError(
                f"image {directory}: {DATA_NAME} is {size} bytes, the manifest says "
                f"{manifest.data_size} ({'truncated' if size < manifest.data_size else 'too long'})"
            )
        return cls(directory, manifest)

    # -- lookups ------------------------------------------------------------------------

    def extents(self, start: ImageAddr, length: int) -> list[Extent]:
        """The extents covering [start, start + length), clipped to that range.

        Raises ImageRangeError if any byte of the range is outside every region.
        """
        if length <= 0:
            raise ImageRangeError(f"empty range [{start:#x}, +{length:#x})")
        end = start + length
        index = bisect.bisect_right(self._extent_starts, start) - 1
        result: list[Extent] = []
        position: int = start
        while position < end:
            if index < 0 or index >= len(self._extents):
                break
            extent = self._extents[index]
            if not extent.start <= position < extent.end:
                break
            clip_end = min(end, extent.end)
            skip = position - extent.start
            result.append(
                Extent(
                    ImageAddr(position),
                    clip_end - position,
                    extent.kind,
                    extent.data_offset + skip if extent.kind is ExtentKind.DATA else 0,
                )
            )
            position = clip_end
            index += 1
        if position < end:
            raise ImageRangeError(
                f"[{start:#x}, +{length:#x}): {position:#x} is outside every region of image "
                f"{self.image_id!r}"
            )
        return result

    def data(self, extent: Extent) -> memoryview:
        """The stored bytes of a DATA extent, zero-copy; verifies its chunks on first use."""
        if extent.kind is not ExtentKind.DATA:
            raise ValueError(f"extent at {extent.start:#x} is {extent.kind.name}, not DATA")
        begin, end = extent.data_offset, extent.data_offset + extent.length
        if begin < 0 or end > self.data_size:
            raise ImageRangeError(
                f"extent at {extent.start:#x} needs data [{begin:#x}, {end:#x}) beyond the "
                f"{self.data_size:#x}-byte data file"
            )
        if self._map is None and self.data_size:
            raise ImageError(f"image {self.image_id!r} is closed")
        if extent.length:
            first, last = begin // self.chunk_size, (end - 1) // self.chunk_size
            for chunk in range(first, last + 1):
                if not self._verified[chunk]:
                    self._verify_chunk(chunk)
        return self._view[begin:end]

    def _verify_chunk(self, chunk: int) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size != self.data_size:
            raise ImageError(
                f"image {self.image_id!r}: {DATA_NAME} changed size under the reader "
                f"({size} bytes, expected {self.data_size})"
            )
        problem = self._check_chunk(chunk)
        if problem:
            raise ImageError(f"image {self.image_id!r}: {problem}")
        self._verified[chunk] = 1

    def _check_chunk(self, chunk: int) -> str | None:
        begin = chunk * self.chunk_size
        end = min(begin + self.chunk_size, self.data_size)
        actual = checksum(self._view[begin:end])
        stored = self._checksums[chunk]
        if actual == stored:
            return None
        return (
            f"checksum mismatch at chunk {chunk} (data file bytes [{begin:#x}, {end:#x}), "
            f"image addresses {self._describe_data_range(begin, end)}): "
            f"stored {stored:#018x}, actual {actual:#018x}"
        )

    def _describe_data_range(self, begin: int, end: int) -> str:
        """The image address ranges whose stored bytes lie in data file [begin, end)."""
        index = max(bisect.bisect_right(self._data_offsets, begin) - 1, 0)
        parts: list[str] = []
        while index < len(self._data_extents):
            extent = self._data_extents[index]
            if extent.data_offset >= end:
                break
            lo = max(begin, extent.data_offset)
            hi = min(end, extent.data_offset + extent.length)
            if lo < hi:
                address = extent.start + (lo - extent.data_offset)
                parts.append(f"[{address:#x}, {address + hi - lo:#x})")
            index += 1
        return ", ".join(parts) or "none"

    # -- in-place serving (the daemon's C fast path) -------------------------------------

    @property
    def verified(self) -> bytearray:
        """One byte per checksum chunk of the data file, non-zero once it verified.

        Live: a fast path may serve a chunk's bytes from :meth:`data_buffer` as soon as
        its byte is set, and must never serve them before.
        """
        return self._verified

    def data_buffer(self) -> memoryview:
        """The whole data file, zero-copy and *unverified*: check :attr:`verified`."""
        return self._view

    @property
    def chunk_checksums(self) -> tuple[int, ...]:
        """The stored checksum of each chunk of the data file (empty when the format
        stores none: a fast path must not serve such an image's data itself)."""
        return self._checksums

    def data_fileno(self) -> int:
        """The data file's descriptor: a fast path checks its size before it trusts a
        chunk it verifies itself, as :meth:`data` does."""
        return self._file.fileno()

    def data_extents(self) -> tuple[Extent, ...]:
        """Every DATA extent (image address, length, data offset), in address order."""
        return tuple(e for e in self._extents if e.kind is ExtentKind.DATA)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def verify_chunks(self, first: int, count: int) -> int:
        """Verify chunks ``[first, first + count)`` not verified yet; return the next.

        A chunk whose checksum does not match stays unverified (serving it through
        :meth:`data` then reports the corruption); a data file that changed size
        verifies nothing more.
        """
        end = min(first + count, len(self._checksums))
        if self.closed or os.fstat(self._file.fileno()).st_size != self.data_size:
            return len(self._checksums)
        for chunk in range(first, end):
            if not self._verified[chunk] and self._check_chunk(chunk) is None:
                self._verified[chunk] = 1
        return end

    def region_of(self, address: int) -> Region | None:
        """The region holding ``address``, if any."""
        for region in self.regions:
            if region.start <= address < region.end:
                return region
        return None

    def all_extents(self) -> tuple[Extent, ...]:
        """Every extent of the image, in address order."""
        return self._extents

    @property
    def chunk_count(self) -> int:
        return len(self._checksums)

    # -- verification -------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Check every chunk's checksum (and the file size); return the problems found."""
        problems: list[str] = []
        size = os.fstat(self._file.fileno()).st_size
        if size != self.data_size:
            return [f"{DATA_NAME} is {size} bytes, the manifest says {self.data_size}"]
        for chunk in range(len(self._checksums)):
            problem = self._check_chunk(chunk)
            if problem:
                problems.append(problem)
            else:
                self._verified[chunk] = 1
        return problems

    def close(self) -> None:
        """Release the mapping; views still held by callers keep it alive until dropped."""
        if self._map is not None:
            try:
                self._view.release()
                self._map.close()
            except BufferError:
                pass  # a caller still holds a slice; the mapping goes when it does
            self._map = None
        self._view = memoryview(b"")
        self._file.close()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_manifest(directory: Path) -> image_pb2.ImageManifest:
    """Read and decode ``directory``'s manifest; ImageError if it is missing or broken."""
    if not directory.is_dir():
        raise ImageError(f"image {directory}: not a directory")
    try:
        raw = (directory / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image {directory}: {MANIFEST_NAME} is missing") from None
    except OSError as exc:
        raise ImageError(f"image {directory}: cannot read {MANIFEST_NAME}: {exc}") from exc
    try:
        return decode_manifest(raw)
    except ImageError as exc:
        raise ImageError(f"image {directory}: {exc}") from exc


def validate_layout(manifest: image_pb2.ImageManifest) -> list[str]:
    """Every structural problem of a manifest (empty list = consistent).

    Checks: version, algorithm, page and chunk sizes; regions aligned, non-empty,
    ascending and non-overlapping; extents tiling each region in order, aligned to its
    page size, of a known kind; DATA extents packing the data file exactly (no overlap,
    no gap) and the checksum count matching the data size.
    """
    if manifest.format_version != FORMAT_VERSION:
        return [
            f"unsupported format version {manifest.format_version} "
            f"(this uffdd reads version {FORMAT_VERSION})"
        ]
    problems: list[str] = []
    if manifest.checksum_algorithm != CHECKSUM_ALGORITHM:
        problems.append(
            f"unsupported checksum algorithm {manifest.checksum_algorithm!r} "
            f"(expected {CHECKSUM_ALGORITHM!r})"
        )
    page_size = manifest.page_size
    if not is_power_of_two(page_size):
        return [*problems, f"page size {page_size} is not a power of two"]
    chunk_size = manifest.chunk_size
    if not is_power_of_two(chunk_size) or chunk_size % page_size:
        return [*problems, f"chunk size {chunk_size} is not a power-of-two page multiple"]
    expected_chunks = -(-manifest.data_size // chunk_size)
    if len(manifest.chunk_checksums) != expected_chunks:
        problems.append(
            f"{len(manifest.chunk_checksums)} chunk checksums for {manifest.data_size} bytes "
            f"of data (expected {expected_chunks})"
        )
    previous_end = -1
    data_ranges: list[tuple[int, int, int]] = []  # data_offset, length, image address
    for number, region in enumerate(manifest.regions):
        start, length, size = region.image_address, region.length, region.page_size
        label = f"region {number} [{start:#x}, +{length:#x}) {region.name!r}"
        if not is_power_of_two(size) or size % page_size:
            problems.append(f"{label}: page size {size} is not a multiple of {page_size}")
            continue
        if length == 0 or start % size or length % size:
            problems.append(f"{label}: empty or not aligned to its page size {size}")
            continue
        if start < previous_end:
            problems.append(f"{label}: overlaps or is below the previous region")
        previous_end = max(previous_end, start + length)
        position = start
        for extent in region.extents:
            where = f"{label}: extent [{extent.image_address:#x}, +{extent.length:#x})"
            if extent.image_address != position:
                problems.append(
                    f"{where} starts at {extent.image_address:#x}, expected {position:#x} "
                    "(extents must tile the region: gap, overlap or disorder)"
                )
                break
            if extent.length == 0 or extent.length % size:
                problems.append(f"{where}: empty or not a multiple of the page size {size}")
                break
            if extent.kind == image_pb2.IMAGE_EXTENT_KIND_DATA:
                if extent.data_offset % page_size:
                    problems.append(f"{where}: data offset {extent.data_offset:#x} unaligned")
                data_ranges.append((extent.data_offset, extent.length, extent.image_address))
            elif extent.kind != image_pb2.IMAGE_EXTENT_KIND_ZERO:
                problems.append(f"{where}: unknown kind {extent.kind}")
            elif extent.data_offset:
                problems.append(f"{where}: a ZERO extent with a data offset")
            position += extent.length
        else:
            if position != start + length:
                problems.append(
                    f"{label}: extents end at {position:#x}, not at the region's end "
                    f"{start + length:#x}"
                )
    data_ranges.sort()
    packed = 0
    for offset, length, address in data_ranges:
        if offset != packed:
            what = "overlaps other data" if offset < packed else "leaves a gap before it"
            problems.append(
                f"DATA extent at {address:#x}: data offset {offset:#x} {what} "
                f"(expected {packed:#x})"
            )
        packed = max(packed, offset + length)
    if packed != manifest.data_size:
        problems.append(
            f"DATA extents hold {packed} bytes, the manifest's data size is {manifest.data_size}"
        )
    return problems
