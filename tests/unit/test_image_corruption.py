"""Every way an image can be broken is detected, and the message says exactly what."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.format import (
    DATA_NAME,
    MANIFEST_HEADER_SIZE,
    MANIFEST_NAME,
    ExtentKind,
    checksum,
    encode_manifest,
)
from uffdd.image.reader import ImageReader, read_manifest
from uffdd.image.writer import ImageWriter
from uffdd.v1 import image_pb2

pytestmark = pytest.mark.timeout(30)

P = 4096
CHUNK = 4 * P


def make_image(root: Path) -> Path:
    """Two regions; 12 data pages (3 chunks of 4 pages) plus zero pages."""
    with ImageWriter(root, "img", chunk_size=CHUNK) as writer:
        writer.add_region(ImageAddr(0x100000), 8 * P, "[heap]")
        writer.add_region(ImageAddr(0x200000), 10 * P, "[stack]")
        writer.write(ImageAddr(0x100000), b"".join(bytes([i + 1]) * P for i in range(8)))
        writer.write(ImageAddr(0x200000), bytes(P))  # zero, not stored
        writer.write(ImageAddr(0x201000), b"".join(bytes([i + 9]) * P for i in range(4)))
        return writer.commit()


def rewrite(image: Path, change: Callable[[image_pb2.ImageManifest], None]) -> None:
    manifest = read_manifest(image)
    change(manifest)
    (image / MANIFEST_NAME).write_bytes(encode_manifest(manifest))


def open_error(image: Path) -> str:
    with pytest.raises(ImageError) as caught:
        ImageReader.open(image)
    return str(caught.value)


def test_a_good_image_verifies(tmp_path: Path) -> None:
    with ImageReader.open(make_image(tmp_path)) as reader:
        assert reader.chunk_count == 3
        assert reader.verify() == []


# -- the data file -----------------------------------------------------------------------


def test_flipped_byte_is_a_checksum_error_naming_the_chunk(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    data = image / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[9 * P + 5] ^= 0x40  # chunk 2 (data pages 8..11): image pages 0x202000.. of [stack]
    data.write_bytes(bytes(raw))

    with ImageReader.open(image) as reader:  # open stays cheap: no checksums yet
        first = reader.extents(ImageAddr(0x100000), 8 * P)
        assert len(reader.data(first[0])) == 8 * P  # chunks 0 and 1 are fine
        (bad,) = reader.extents(ImageAddr(0x203000), P)
        with pytest.raises(ImageError) as caught:
            reader.data(bad)
        message = str(caught.value)
        assert "checksum mismatch at chunk 2" in message
        assert "data file bytes [0x8000, 0xc000)" in message
        assert "image addresses [0x201000, 0x205000)" in message
        with pytest.raises(ImageError, match="chunk 2"):  # not remembered as verified
            reader.data(bad)
        (problem,) = reader.verify()
        assert "checksum mismatch at chunk 2" in problem


def test_chunk_naming_spans_regions(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    data = image / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[4 * P] ^= 1  # chunk 1 holds heap pages 4..7
    data.write_bytes(bytes(raw))
    with ImageReader.open(image) as reader:
        (problem,) = reader.verify()
    assert "chunk 1" in problem
    assert "image addresses [0x104000, 0x108000)" in problem


def test_verified_chunks_are_remembered(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    with ImageReader.open(image) as reader:
        (extent,) = reader.extents(ImageAddr(0x100000), P)
        assert bytes(reader.data(extent)) == b"\x01" * P
        # Corrupt the file's bytes through a second path after the first check: the
        # reader does not re-hash a chunk it has verified (the cost stays once per chunk).
        with open(image / DATA_NAME, "r+b") as out:
            out.seek(0)
            out.write(b"\xff")
        assert reader.data(extent)[0] == 0xFF
        assert any("chunk 0" in problem for problem in reader.verify())


def test_truncated_data_file(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    os.truncate(image / DATA_NAME, 5 * P)
    message = open_error(image)
    assert f"{DATA_NAME} is {5 * P} bytes, the manifest says {12 * P} (truncated)" in message


def test_data_file_too_long(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    with open(image / DATA_NAME, "ab") as out:
        out.write(b"x")
    assert "(too long)" in open_error(image)


def test_missing_data_file(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    (image / DATA_NAME).unlink()
    assert f"{DATA_NAME} is missing" in open_error(image)


def test_data_file_truncated_after_open_is_caught_before_serving(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    with ImageReader.open(image) as reader:
        os.truncate(image / DATA_NAME, P)  # touching the mmap now would SIGBUS
        (extent,) = reader.extents(ImageAddr(0x202000), P)
        with pytest.raises(ImageError, match="changed size"):
            reader.data(extent)
        assert "bytes, the manifest says" in reader.verify()[0]


# -- the manifest ------------------------------------------------------------------------


def test_missing_manifest(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    (image / MANIFEST_NAME).unlink()
    assert f"{MANIFEST_NAME} is missing" in open_error(image)


def test_not_a_directory(tmp_path: Path) -> None:
    assert "not a directory" in open_error(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda raw: raw[:10], "truncated: 10 bytes"),
        (lambda raw: raw[:-3], "truncated"),
        (lambda raw: raw + b"\0", "trailing garbage"),
        (lambda raw: b"NOTANIMG" + raw[8:], "bad magic"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum mismatch"),
        (lambda raw: b"", "truncated: 0 bytes"),
    ],
)
def test_broken_manifest_framing(
    tmp_path: Path, damage: Callable[[bytes], bytes], expected: str
) -> None:
    image = make_image(tmp_path)
    path = image / MANIFEST_NAME
    path.write_bytes(damage(path.read_bytes()))
    assert expected in open_error(image)


def test_manifest_body_that_is_not_protobuf(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    body = b"\xff\xff\xff\xff\xff"  # a valid frame around garbage
    header = b"UFFDDIMG" + len(body).to_bytes(8, "little") + checksum(body).to_bytes(8, "little")
    assert len(header) == MANIFEST_HEADER_SIZE
    (image / MANIFEST_NAME).write_bytes(header + body)
    assert "cannot parse the manifest" in open_error(image)


def _set_version(m: image_pb2.ImageManifest) -> None:
    m.format_version = 2


def _overlap_regions(m: image_pb2.ImageManifest) -> None:
    m.regions[1].image_address = 0x104000
    for index, extent in enumerate(m.regions[1].extents):
        extent.image_address = 0x104000 + sum(e.length for e in m.regions[1].extents[:index])


def _unalign_region(m: image_pb2.ImageManifest) -> None:
    m.regions[0].image_address += 0x800


def _gap_in_extents(m: image_pb2.ImageManifest) -> None:
    m.regions[1].extents[1].image_address += P


def _unaligned_extent(m: image_pb2.ImageManifest) -> None:
    m.regions[1].extents[0].length = 100


def _extents_short(m: image_pb2.ImageManifest) -> None:
    m.regions[1].length += P


def _overlapping_data(m: image_pb2.ImageManifest) -> None:
    m.regions[1].extents[1].data_offset = 4 * P


def _checksum_count(m: image_pb2.ImageManifest) -> None:
    m.chunk_checksums.append(7)


def _unknown_kind(m: image_pb2.ImageManifest) -> None:
    m.regions[1].extents[0].kind = image_pb2.IMAGE_EXTENT_KIND_UNSPECIFIED


def _algorithm(m: image_pb2.ImageManifest) -> None:
    m.checksum_algorithm = "crc32"


def _regions_disordered(m: image_pb2.ImageManifest) -> None:
    m.regions.reverse()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set_version, "unsupported format version 2 (this uffdd reads version 1)"),
        (_overlap_regions, "region 1 [0x104000, +0xa000) '[stack]': overlaps"),
        (_unalign_region, "not aligned to its page size 4096"),
        (_gap_in_extents, "expected 0x201000 (extents must tile the region"),
        (_unaligned_extent, "not a multiple of the page size"),
        (_extents_short, "extents end at 0x20a000, not at the region's end 0x20b000"),
        (_overlapping_data, "overlaps other data"),
        (_checksum_count, "4 chunk checksums for 49152 bytes of data (expected 3)"),
        (_unknown_kind, "unknown kind 0"),
        (_algorithm, "unsupported checksum algorithm 'crc32'"),
        (_regions_disordered, "overlaps or is below the previous region"),
    ],
)
def test_inconsistent_layout(
    tmp_path: Path, change: Callable[[image_pb2.ImageManifest], None], expected: str
) -> None:
    image = make_image(tmp_path)
    rewrite(image, change)
    message = open_error(image)
    assert expected in message, message
    assert re.match(rf"image {re.escape(str(image))}: ", message)


def test_extent_kind_values_match_the_proto() -> None:
    assert ExtentKind.DATA.value == image_pb2.IMAGE_EXTENT_KIND_DATA
    assert ExtentKind.ZERO.value == image_pb2.IMAGE_EXTENT_KIND_ZERO
