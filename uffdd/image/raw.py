"""Images of raw memory files: ``uffdd image from-raw`` and Firecracker's memory files.

Why: a VM snapshot's memory file names guest pages by file offset; made into an image,
its zero pages become ZERO extents (served with ``UFFDIO_ZEROPAGE``, nothing stored)
and its data is checksummed, and then it is served like any other image. One pass over
the file, mapped read-only, through ``ImageWriter``.
"""

from __future__ import annotations

import mmap
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from uffdd.core.addresses import ImageAddr
from uffdd.image.dump import Progress
from uffdd.image.format import ImageSource
from uffdd.image.writer import ImageWriter

RawRegion = tuple[int, int, int]
"""(file offset, length, image address) of one region of a raw memory file."""

_STEP = 4 << 20


def default_raw_image_id(memfile: Path) -> str:
    return f"{memfile.stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def image_from_raw(
    memfile: Path,
    root: Path,
    image_id: str,
    regions: Sequence[RawRegion] = (),
    page_size: int = 4096,
    start_progress: Callable[[int], Progress] | None = None,
) -> Path:
    """Write image ``root/image_id`` of ``memfile``'s ``regions`` (default: the whole
    file at image address 0) and return its directory.

    ValueError for a region beyond the file or not aligned to ``page_size``;
    ImageError or OSError when the image cannot be written.
    """
    file_size = memfile.stat().st_size
    layout = list(regions) or [(0, file_size, 0)]
    for offset, length, _ in layout:
        if offset + length > file_size:
            raise ValueError(
                f"region {offset:#x}:{length:#x} ends beyond the {file_size}-byte file"
            )
    source = ImageSource(kind="raw-file", host=socket.gethostname(), path=str(memfile.resolve()))
    with ImageWriter(root, image_id, source=source) as writer:
        for offset, length, address in layout:
            writer.add_region(ImageAddr(address), length, f"{memfile.name}@{offset:#x}", page_size)
        advance = (start_progress or _no_progress)(sum(length for _, length, _ in layout))
        _copy(memfile, layout, writer, advance)
        return writer.commit()


def _no_progress(total: int) -> Progress:
    return lambda _: None


def _copy(memfile: Path, layout: list[RawRegion], writer: ImageWriter, advance: Progress) -> None:
    with open(memfile, "rb") as raw:
        if os.fstat(raw.fileno()).st_size == 0:
            return
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for offset, length, address in sorted(layout, key=lambda r: r[2]):
                    for done in range(0, length, _STEP):
                        take = min(_STEP, length - done)
                        writer.write(
                            ImageAddr(address + done),
                            view[offset + done : offset + done + take],
                        )
                        advance(take)
            finally:
                view.release()
