"""Writer -> reader round trips, layout rules, and atomic commit of snapshot images."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image import writer as writer_module
from uffdd.image.format import (
    CHECKSUM_ALGORITHM,
    DATA_NAME,
    MANIFEST_NAME,
    TEMP_PREFIX,
    ExtentKind,
    ImageSource,
    checksum,
)
from uffdd.image.reader import ImageRangeError, ImageReader
from uffdd.image.store import ImageStore
from uffdd.image.writer import ImageWriter

pytestmark = pytest.mark.timeout(60)

P = 4096


def page(byte: int) -> bytes:
    return bytes([byte]) * P


def read_range(reader: ImageReader, start: int, length: int) -> bytes:
    """The bytes of [start, start + length) as a restore would see them."""
    out = bytearray()
    for extent in reader.extents(ImageAddr(start), length):
        if extent.kind is ExtentKind.DATA:
            out += reader.data(extent)
        else:
            out += bytes(extent.length)
    return bytes(out)


def test_round_trip_records_data_zero_and_untouched_pages(tmp_path: Path) -> None:
    source = ImageSource(kind="test", pid=42, cmdline=("a", "b"), host="h", path="/p")
    with ImageWriter(tmp_path, "img", source=source) as writer:
        writer.add_region(ImageAddr(0x10000), 8 * P, "[heap]")
        writer.add_region(ImageAddr(0x1000), 2 * P, "")  # regions may come in any order
        writer.write(ImageAddr(0x11000), page(1) + bytes(P) + page(2))  # zero page detected
        writer.zero(ImageAddr(0x14000), P)  # explicit zero
        writer.write(ImageAddr(0x15000), page(3))
        writer.write(ImageAddr(0x2000), page(4))  # the other region
        path = writer.commit()  # 0x10000, 0x16000-0x18000 and 0x1000 never written: ZERO
    assert path == tmp_path / "img"
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_NAME, DATA_NAME]
    assert (path / DATA_NAME).stat().st_size == 4 * P  # only the non-zero pages

    with ImageReader.open(path) as reader:
        assert reader.image_id == "img"
        assert reader.page_size == P
        assert reader.checksum_algorithm == CHECKSUM_ALGORITHM == "xxh3-64"
        assert reader.source == source
        assert [(r.start, r.length, r.name) for r in reader.regions] == [
            (0x1000, 2 * P, ""),
            (0x10000, 8 * P, "[heap]"),
        ]
        assert (reader.total_bytes, reader.data_bytes, reader.zero_bytes) == (
            10 * P,
            4 * P,
            6 * P,
        )
        kinds = [(e.start, e.length, e.kind) for e in reader.extents(ImageAddr(0x10000), 8 * P)]
        assert kinds == [
            (0x10000, P, ExtentKind.ZERO),
            (0x11000, P, ExtentKind.DATA),
            (0x12000, P, ExtentKind.ZERO),
            (0x13000, P, ExtentKind.DATA),
            (0x14000, P, ExtentKind.ZERO),  # explicit zero merged with nothing after DATA
            (0x15000, P, ExtentKind.DATA),
            (0x16000, 2 * P, ExtentKind.ZERO),
        ]
        expected = bytes(P) + page(1) + bytes(P) + page(2) + bytes(P) + page(3) + bytes(2 * P)
        assert read_range(reader, 0x10000, 8 * P) == expected
        assert read_range(reader, 0x1000, 2 * P) == bytes(P) + page(4)
        assert reader.verify() == []


def test_extents_are_clipped_and_data_offsets_follow(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0), 4 * P)
        writer.write(ImageAddr(0), page(1) + page(2) + page(3) + page(4))
        writer.commit()
    with ImageReader.open(tmp_path / "img") as reader:
        (extent,) = reader.extents(ImageAddr(P), 2 * P)
        assert (extent.start, extent.length, extent.kind) == (P, 2 * P, ExtentKind.DATA)
        assert extent.data_offset == P
        assert bytes(reader.data(extent)) == page(2) + page(3)
        assert isinstance(reader.data(extent), memoryview)


def test_ranges_outside_every_region_are_refused(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0x1000), 2 * P)
        writer.add_region(ImageAddr(0x3000), P)  # adjacent: a range may span both
        writer.add_region(ImageAddr(0x8000), P)
        writer.commit()
    with ImageReader.open(tmp_path / "img") as reader:
        assert sum(e.length for e in reader.extents(ImageAddr(0x1000), 3 * P)) == 3 * P
        for start, length in [(0, P), (0x1000, 4 * P), (0x4000, P), (0x7000, 2 * P), (0x9000, 1)]:
            with pytest.raises(ImageRangeError, match="outside every region"):
                reader.extents(ImageAddr(start), length)
        with pytest.raises(ImageRangeError):
            reader.extents(ImageAddr(0x1000), 0)


def test_huge_page_regions_detect_zero_per_huge_page(tmp_path: Path) -> None:
    huge = 2 * 1024 * 1024
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(huge), 2 * huge, "hugetlb", page_size=huge)
        first = bytearray(huge)
        first[-1] = 7  # one non-zero byte keeps the whole huge page as DATA
        writer.write(ImageAddr(huge), bytes(first) + bytes(huge))
        writer.commit()
    with ImageReader.open(tmp_path / "img") as reader:
        assert reader.regions[0].page_size == huge
        extents = reader.extents(ImageAddr(huge), 2 * huge)
        assert [(e.length, e.kind) for e in extents] == [
            (huge, ExtentKind.DATA),
            (huge, ExtentKind.ZERO),
        ]
        assert bytes(reader.data(extents[0])) == bytes(first)


def test_chunk_checksums_cover_the_data_file(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img", chunk_size=2 * P) as writer:
        writer.add_region(ImageAddr(0), 5 * P)
        writer.write(ImageAddr(0), b"".join(page(i + 1) for i in range(5)))
        writer.commit()
    with ImageReader.open(tmp_path / "img") as reader:
        assert reader.chunk_size == 2 * P
        assert reader.chunk_count == 3  # 2 + 2 + 1 pages
    raw = (tmp_path / "img" / DATA_NAME).read_bytes()
    assert checksum(raw[4 * P :]) == checksum(page(5))


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda w: w.write(ImageAddr(0x1100), page(1)), "aligned"),
        (lambda w: w.write(ImageAddr(0x1000), page(1)[:100]), "aligned"),
        (lambda w: w.write(ImageAddr(0x9000), page(1)), "not inside one region"),
        (lambda w: w.write(ImageAddr(0x4000), page(1) + page(2)), "not inside one region"),
        (lambda w: w.add_region(ImageAddr(0x2000), P), "overlaps"),
        (lambda w: w.add_region(ImageAddr(0), 2 * P), "overlaps"),
        (lambda w: w.add_region(ImageAddr(0x8800), P), "aligned"),
        (lambda w: w.add_region(ImageAddr(0x8000), 0), "empty"),
        (lambda w: w.add_region(ImageAddr(0x8000), P, page_size=3 * P), "page size"),
    ],
)
def test_writer_refuses_bad_layout(tmp_path: Path, action: object, message: str) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0x1000), 4 * P)
        assert callable(action)
        with pytest.raises(ValueError, match=message):
            action(writer)


def test_pages_must_come_in_ascending_order(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0), 4 * P)
        writer.write(ImageAddr(2 * P), page(1))
        with pytest.raises(ValueError, match="ascending"):
            writer.write(ImageAddr(P), page(2))
        with pytest.raises(ValueError, match="ascending"):
            writer.zero(ImageAddr(2 * P), P)  # written twice


# -- atomicity ---------------------------------------------------------------------------


def test_exception_inside_the_writer_leaves_no_image(tmp_path: Path) -> None:
    def write_then_fail() -> None:
        with ImageWriter(tmp_path, "img") as writer:
            writer.add_region(ImageAddr(0), 4 * P)
            writer.write(ImageAddr(0), page(1))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()
    assert list(tmp_path.iterdir()) == []
    assert ImageStore(tmp_path).list() == []


def test_leaving_without_commit_leaves_no_image(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0), P)
    assert list(tmp_path.iterdir()) == []


def test_a_crashed_writer_leaves_only_a_hidden_temp_dir(tmp_path: Path) -> None:
    """A writer that dies (no abort, no exit) after writing everything but the rename."""
    writer = ImageWriter(tmp_path, "img")
    writer.add_region(ImageAddr(0), P)
    writer.write(ImageAddr(0), page(1))
    assert writer._data is not None
    writer._data.flush()  # as if the process were killed here: data on disk, no manifest
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(TEMP_PREFIX)
    assert ImageStore(tmp_path).list() == []
    with pytest.raises(ImageError, match=r"manifest\.pb is missing"):
        ImageReader.open(leftover)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_failure_during_commit_leaves_no_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(source: Path, target: Path) -> None:
        assert (source / MANIFEST_NAME).is_file()  # everything written, then the crash
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "_rename_no_replace", fail)
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0), P)
        writer.write(ImageAddr(0), page(1))
        with pytest.raises(OSError, match="No space"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_an_existing_image_is_never_replaced(tmp_path: Path) -> None:
    first = ImageWriter(tmp_path, "img")
    second = ImageWriter(tmp_path, "img")  # started before the first one finished
    for writer, byte in ((first, 1), (second, 2)):
        writer.add_region(ImageAddr(0), P)
        writer.write(ImageAddr(0), page(byte))
    first.commit()
    with pytest.raises(ImageError, match="already exists"):
        second.commit()
    with pytest.raises(ImageError, match="already exists"):
        ImageWriter(tmp_path, "img")
    assert [p.name for p in tmp_path.iterdir()] == ["img"]
    with ImageReader.open(tmp_path / "img") as reader:
        assert read_range(reader, 0, P) == page(1)


def test_a_finished_writer_refuses_more_work(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0), P)
        writer.commit()
        with pytest.raises(ImageError, match="already finished"):
            writer.write(ImageAddr(0), page(1))
        with pytest.raises(ImageError, match="already finished"):
            writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["img"]


def test_views_outlive_close(tmp_path: Path) -> None:
    with ImageWriter(tmp_path, "img") as writer:
        writer.add_region(ImageAddr(0), P)
        writer.write(ImageAddr(0), page(9))
        writer.commit()
    reader = ImageReader.open(tmp_path / "img")
    view = reader.data(reader.extents(ImageAddr(0), P)[0])
    reader.close()  # the page server may still be sending this slice
    assert bytes(view) == page(9)
    with pytest.raises(ImageError, match="closed"):
        reader.data(reader.all_extents()[0])


# -- property: any layout and page pattern round-trips ----------------------------------

# per page: None = never written, 0 = zero (explicit or written zeros), 1..255 = data
_PAGE = st.one_of(st.none(), st.just(0), st.integers(1, 255))
_REGION = st.tuples(st.integers(0, 3), st.lists(_PAGE, min_size=1, max_size=24))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    regions=st.lists(_REGION, min_size=1, max_size=5),
    chunk_pages=st.sampled_from([1, 2, 4, 16]),
    explicit_zero=st.booleans(),
    batch=st.integers(1, 5),
    data=st.data(),
)
def test_any_layout_round_trips(
    regions: list[tuple[int, list[int | None]]],
    chunk_pages: int,
    explicit_zero: bool,
    batch: int,
    data: st.DataObject,
) -> None:
    model: dict[int, bytes] = {}
    layout: list[tuple[int, list[int | None]]] = []
    address = 0x10000
    for gap, pages in regions:
        address += gap * P
        layout.append((address, pages))
        address += len(pages) * P
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        with ImageWriter(root, "prop", chunk_size=chunk_pages * P) as writer:
            for start, pages in reversed(layout):  # regions in any order
                writer.add_region(ImageAddr(start), len(pages) * P, f"r{start:x}")
            for start, pages in layout:
                index = 0
                while index < len(pages):
                    value = pages[index]
                    here = start + index * P
                    if value is None:
                        index += 1
                        continue
                    if value == 0 and explicit_zero:
                        writer.zero(ImageAddr(here), P)
                        index += 1
                        continue
                    run = 1  # batch consecutive written pages into one write
                    while (
                        run < batch and index + run < len(pages) and pages[index + run] is not None
                    ):
                        run += 1
                    writer.write(
                        ImageAddr(here),
                        b"".join(page(pages[index + k] or 0) for k in range(run)),
                    )
                    index += run
                for i, value in enumerate(pages):
                    model[start + i * P] = page(value or 0)
            writer.commit()

        with ImageReader.open(root / "prop") as reader:
            data_pages = sum(1 for v in model.values() if v != bytes(P))
            assert reader.data_bytes == data_pages * P
            assert (root / "prop" / DATA_NAME).stat().st_size == data_pages * P
            assert reader.total_bytes == len(model) * P
            for start, pages in layout:
                extents = reader.extents(ImageAddr(start), len(pages) * P)
                for a, b in itertools.pairwise(extents):
                    assert a.end == b.start
                    assert a.kind is not b.kind or (
                        a.kind is ExtentKind.DATA and a.data_offset + a.length != b.data_offset
                    ), "adjacent extents of one kind are merged"
            for address_, expected in model.items():
                (extent,) = reader.extents(ImageAddr(address_), P)
                assert (extent.kind is ExtentKind.DATA) == (expected != bytes(P))
                assert read_range(reader, address_, P) == expected
            start, pages = data.draw(st.sampled_from(layout))
            first = data.draw(st.integers(0, len(pages) - 1))
            count = data.draw(st.integers(1, len(pages) - first))
            want = b"".join(model[start + (first + k) * P] for k in range(count))
            assert read_range(reader, start + first * P, count * P) == want
            assert reader.verify() == []
