"""What the C fast path is given: a local image's data, extents and verification state.

Why: the fast path installs bytes straight from the image's mmap, so what it may use
must be exactly the verified chunks; a corrupt chunk must stay unverified however the
background verification goes, and a page server must offer nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from uffdd.core.addresses import ImageAddr
from uffdd.core.policy import FaultPlan
from uffdd.daemon.sources import LocalImageSource, local_data_of
from uffdd.image.format import DATA_NAME
from uffdd.image.reader import ImageReader
from uffdd.image.writer import ImageWriter
from uffdd.native.fast_serve import FastTable

P = 4096
CHUNK = 4 * P


def build(root: Path, *, corrupt_page: int | None = None) -> ImageReader:
    with ImageWriter(root, "img", chunk_size=CHUNK) as writer:
        writer.add_region(ImageAddr(0x10000), 16 * P)
        writer.add_region(ImageAddr(0x100000), 8 * P)
        writer.write(ImageAddr(0x100000), bytes([7]) * 8 * P)
        writer.write(ImageAddr(0x10000), bytes([1]) * 4 * P)
        writer.zero(ImageAddr(0x14000), 4 * P)
        writer.write(ImageAddr(0x18000), bytes([2]) * 8 * P)
        directory = writer.commit()
    if corrupt_page is not None:
        with (directory / DATA_NAME).open("r+b") as data:
            data.seek(corrupt_page * P + 5)
            data.write(b"\xff")
    return ImageReader.open(directory)


class Wrapper:
    """A source that wraps another (like the benchmark's timing wrapper)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner


def test_local_data_lists_the_data_extents_with_their_file_offsets(tmp_path: Path) -> None:
    with build(tmp_path) as reader:
        local = local_data_of(Wrapper(LocalImageSource(reader)))
        assert local is not None
        assert local.image_id == "img"
        assert local.chunk_size == CHUNK
        # the high region was written first: its bytes come first in the data file
        assert local.extents == (
            (0x10000, 4 * P, 8 * P),
            (0x18000, 8 * P, 12 * P),
            (0x100000, 8 * P, 0),
        )
        assert bytes(local.data[8 * P : 8 * P + 3]) == b"\x01\x01\x01"
        assert local_data_of(Wrapper(object())) is None


def test_background_verification_verifies_all_but_a_corrupt_chunk(tmp_path: Path) -> None:
    async def main(reader: ImageReader) -> None:
        local = LocalImageSource(reader).local_data()  # starts the verification
        assert 0 in local.verified
        for _ in range(200):
            if sum(local.verified) == reader.chunk_count - 1:
                break
            await asyncio.sleep(0.005)
        assert list(local.verified) == [1, 1, 1, 0, 1]

    with build(tmp_path, corrupt_page=13) as reader:
        asyncio.run(main(reader))


PLAN = FaultPlan(16 * P, whole_block=False)


def test_a_fast_table_refuses_ranges_it_cannot_serve(tmp_path: Path) -> None:
    data = bytearray(8 * P)
    verified = bytearray(2)
    with pytest.raises(ValueError, match="overlaps"):
        FastTable([(0x10000, 2 * P, 0), (0x11000, P, 0)], data, verified, CHUNK, PLAN)
    with pytest.raises(ValueError, match="not usable"):
        FastTable([(0x10000, 2 * P, 7 * P)], data, verified, CHUNK, PLAN)
    with pytest.raises(ValueError, match="power of two"):
        FastTable([], data, verified, 3 * P, PLAN)
    with pytest.raises(ValueError, match="whole blocks"):
        FastTable([], data, verified, CHUNK, FaultPlan(16 * P, whole_block=True))
    table = FastTable([(0x20000, P, 0), (0x10000, 2 * P, P)], data, verified, CHUNK, PLAN)
    assert len(table) == 2
    table.close()
