"""Benchmark images: one region of random data at a fixed address, cached between runs.

Why all data, no zero pages: every page then costs the same to serve (one UFFDIO_COPY
of bytes from the image), and ``pages.bin`` maps linearly to the region, so the C
references can read the very same file with no manifest parsing. Zero pages would only
make uffdd look faster (UFFDIO_ZEROPAGE, no round trip).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from uffdd.core.addresses import ImageAddr
from uffdd.image.format import DATA_NAME, ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.image.writer import ImageWriter

BASE = 0x7E0000000000
"""Image and run-time address of the region (free in a Python process on x86_64)."""
_PIECE = 64 << 20


@dataclass(frozen=True)
class BenchImage:
    root: Path
    image_id: str
    address: int
    length: int

    @property
    def directory(self) -> Path:
        return self.root / self.image_id

    @property
    def data_file(self) -> Path:
        return self.directory / DATA_NAME


def random_image(root: Path, length: int, address: int = BASE) -> BenchImage:
    """The image ``rand-<MiB>m`` under ``root``, written unless it is there already."""
    image = BenchImage(root, f"rand-{length >> 20}m", address, length)
    if not image.directory.exists():
        with ImageWriter(root, image.image_id) as writer:
            writer.add_region(ImageAddr(address), length, "bench")
            for offset in range(0, length, _PIECE):
                piece = os.urandom(min(_PIECE, length - offset))
                writer.write(ImageAddr(address + offset), piece)
            writer.commit()
    with ImageReader.open(image.directory) as reader:
        kinds = [extent.kind for extent in reader.all_extents()]
    if kinds != [ExtentKind.DATA]:
        raise RuntimeError(f"{image.directory}: expected one DATA extent, found {kinds}")
    return image
