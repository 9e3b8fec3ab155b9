"""Where a Firecracker VM's memory comes from: a local image, a page server, or the
snapshot memory file itself (made into an image once, then served like any other).

Why an image even for a raw memory file: an image records zero pages as ZERO extents
(served with ``UFFDIO_ZEROPAGE``, no copy, no memory used) and checksums the data, and
``LocalImageSource`` already serves an image by ``mmap`` without a copy; building it
is one sequential pass over the file (``uffdd.image.raw``, as ``uffdd image from-raw``).
The image address of every page is its file offset, which is what Firecracker's
``offset`` field names. A built image is kept in a cache directory keyed by the file's
identity (path, size, mtime, inode, page size), so a restart does not read the file
again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from uffdd.core.errors import ConfigError, ImageError
from uffdd.core.firecracker import HUGE_PAGE, PAGE_SIZES, ImageRegion
from uffdd.daemon.sources import LocalImageSource, PageSource
from uffdd.image.format import stored_ranges
from uffdd.image.raw import image_from_raw
from uffdd.image.reader import ImageReader

if TYPE_CHECKING:
    from uffdd.daemon.lifecycle import Daemon


@dataclass(frozen=True, slots=True)
class Layout:
    """What a handover needs to know about the image behind a VM."""

    image_id: str
    regions: tuple[ImageRegion, ...]
    data: list[tuple[int, int]]
    """(start, end) image ranges holding data; the rest of every region reads zeros."""
    source: PageSource


class Backing(Protocol):
    """The image every VM handed over on one socket is restored from."""

    async def layout(self, daemon: Daemon) -> Layout: ...

    def close(self) -> None: ...


class LocalImage:
    """An image directory on this host, served in place."""

    def __init__(self, directory: Path) -> None:
        try:
            self.reader = ImageReader.open(directory)
        except ImageError as exc:
            raise ConfigError(str(exc)) from exc
        self._layout = Layout(
            image_id=self.reader.image_id,
            regions=tuple(
                ImageRegion(int(r.start), r.length, r.page_size) for r in self.reader.regions
            ),
            data=stored_ranges(self.reader.all_extents()),
            source=LocalImageSource(self.reader),
        )

    async def layout(self, daemon: Daemon) -> Layout:
        return self._layout

    def close(self) -> None:
        self.reader.close()


class RemoteImage:
    """An image on a page server (asked for its layout at each handover)."""

    def __init__(self, image_id: str, page_server: str) -> None:
        self.image_id = image_id
        self.page_server = page_server

    async def layout(self, daemon: Daemon) -> Layout:
        client = daemon.clients.get(self.page_server)
        info = await client.image_info(self.image_id, timeout=daemon.config.fetch_deadline)
        return Layout(
            image_id=info.image_id,
            regions=tuple(ImageRegion(int(r.start), r.length, r.page_size) for r in info.regions),
            data=stored_ranges(info.extents),
            source=client,
        )

    def close(self) -> None:
        """The daemon closes its page clients itself."""


def image_from_memfile(memfile: Path, cache_dir: Path, page_size: int) -> Path:
    """The image of a snapshot memory file (one region, image address = file offset),
    built under ``cache_dir`` unless an image of this very file is there already."""
    if page_size not in PAGE_SIZES:
        raise ConfigError(f"page size {page_size} is neither 4 KiB nor 2 MiB")
    try:
        stat = memfile.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {memfile}: {exc.strerror}") from exc
    if stat.st_size == 0 or stat.st_size % page_size:
        raise ConfigError(
            f"{memfile} is {stat.st_size} bytes, not a positive multiple of the page size "
            f"{page_size}"
            + (" (a hugepage VM's file: --page-size 2M)" if page_size < HUGE_PAGE else "")
        )
    identity = f"{memfile.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{page_size}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    image_id = f"fc-{digest}"
    existing = cache_dir / image_id
    if existing.is_dir():
        return existing
    try:
        return image_from_raw(memfile, cache_dir, image_id, page_size=page_size)
    except (ImageError, OSError) as exc:
        raise ConfigError(f"cannot make an image of {memfile} in {cache_dir}: {exc}") from exc


def default_cache_dir() -> Path:
    """Where images of memory files go when no --cache-dir is given."""
    if os.geteuid() == 0:
        return Path("/var/cache/uffdd/firecracker")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uffdd" / "firecracker"
