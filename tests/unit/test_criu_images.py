"""CRIU image codec, layout and reader: our files checked by ``crit``, crit's by us.

``crit`` (Debian's criu package, CRIU 3.17) decodes and encodes images with CRIU's own
definitions: every file our writer makes must decode there to what we meant, and a
pagemap crit encodes (3.x page counts) must read here. The 4.x style (count in field 5,
field 2 zero) decodes in crit 3.17 as ``nr_pages: 0``, which is exactly the fact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from uffdd.core.addresses import ImageAddr
from uffdd.image.criu.catalog import CriuImages
from uffdd.image.criu.images import (
    PAGEMAP_MAGIC,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    VMA_ANON_PRIVATE,
    VMA_AREA_REGULAR,
    VMA_AREA_VDSO,
    CriuImageError,
    PagemapEntry,
    Task,
    Vma,
    encode_image,
    read_mm,
    read_pagemap,
    read_pstree,
    write_inventory,
    write_mm,
    write_pagemap,
    write_pstree,
)
from uffdd.image.criu.reader import CriuImageReader, CriuLayout, image_id_for, pid_of
from uffdd.image.format import ExtentKind, ImageNotFound
from uffdd.pageserver.catalog import ImageCatalog, RequestError
from uffdd.v1 import criu_pb2

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
CRIT = shutil.which("crit")


def crit_decode(path: Path) -> Any:
    assert CRIT is not None, "crit is missing: apt-get install -y criu"
    out = subprocess.run(
        [CRIT, "decode", "-i", str(path)], check=True, capture_output=True, timeout=30
    ).stdout
    return json.loads(out)


def crit_encode(image: dict[str, object], path: Path) -> None:
    assert CRIT is not None, "crit is missing: apt-get install -y criu"
    subprocess.run(
        [CRIT, "encode", "-o", str(path)], input=json.dumps(image).encode(), check=True,
        timeout=30,
    )  # fmt: skip


LAZY = PE_LAZY | PE_PRESENT
ENTRIES = [
    PagemapEntry(0x10000, 4, LAZY),
    PagemapEntry(0x14000, 2, PE_PRESENT),  # not lazy: data in pages-img, served as zeros
    PagemapEntry(0x18000, 3, LAZY),
]


def make_dump(directory: Path, style: str = "4.x") -> bytes:
    """pid 42: a lazy VMA [0x10000, 0x20000), a vdso; pid 43: a zombie (no mm)."""
    write_inventory(directory)
    write_pstree(directory, [Task(42, 0, 42, 42), Task(43, 42, 42, 42)])
    write_mm(
        directory,
        42,
        [Vma(0x10000, 0x20000), Vma(0x30000, 0x31000, status=VMA_AREA_REGULAR | VMA_AREA_VDSO)],
    )
    write_pagemap(directory, 42, 5, ENTRIES, style="4.x" if style == "4.x" else "3.x")
    data = b"".join(bytes([n]) * PAGE for n in range(1, 10))
    (directory / "pages-5.img").write_bytes(data)
    return data


def test_crit_decodes_what_we_write(tmp_path: Path) -> None:
    make_dump(tmp_path)
    write_pagemap(tmp_path, 43, 6, ENTRIES, style="3.x")
    assert crit_decode(tmp_path / "inventory.img") == {
        "magic": "INVENTORY", "entries": [{"img_version": 2}]
    }  # fmt: skip
    pstree = crit_decode(tmp_path / "pstree.img")
    assert pstree["magic"] == "PSTREE"
    assert [(e["pid"], e["ppid"]) for e in pstree["entries"]] == [(42, 0), (43, 42)]
    mm = crit_decode(tmp_path / "mm-42.img")
    vmas = mm["entries"][0]["vmas"]
    assert [(v["start"], v["end"], v["status"]) for v in vmas] == [
        (0x10000, 0x20000, VMA_AREA_REGULAR | VMA_ANON_PRIVATE),
        (0x30000, 0x31000, VMA_AREA_REGULAR | VMA_AREA_VDSO),
    ]
    new = crit_decode(tmp_path / "pagemap-42.img")["entries"]
    old = crit_decode(tmp_path / "pagemap-43.img")["entries"]
    assert new[0] == {"pages_id": 5}
    assert old[0] == {"pages_id": 6}
    # crit 3.17 knows field 2 only: 0 in the 4.x style, the count in the 3.x style
    assert [(e["vaddr"], e["nr_pages"], e["flags"]) for e in new[1:]] == [
        (e.vaddr, 0, e.flags) for e in ENTRIES
    ]
    assert [(e["vaddr"], e["nr_pages"], e["flags"]) for e in old[1:]] == [
        (e.vaddr, e.nr_pages, e.flags) for e in ENTRIES
    ]


def test_we_read_what_crit_encodes(tmp_path: Path) -> None:
    crit_encode(
        {"magic": "PAGEMAP", "entries": [
            {"pages_id": 9},
            {"vaddr": "0x7f0000001000", "nr_pages": 3, "flags": "PE_LAZY|PE_PRESENT"},
            {"vaddr": "0x7f0000009000", "nr_pages": 1, "flags": "PE_PRESENT"},
        ]},
        tmp_path / "pagemap-7.img",
    )  # fmt: skip
    crit_encode(
        {"magic": "PSTREE", "entries": [{"pid": 7, "ppid": 0, "pgid": 7, "sid": 7}]},
        tmp_path / "pstree.img",
    )
    assert read_pagemap(tmp_path, 7) == (
        9,
        [PagemapEntry(0x7F0000001000, 3, LAZY), PagemapEntry(0x7F0000009000, 1, PE_PRESENT)],
    )
    assert read_pstree(tmp_path) == [Task(7, 0, 7, 7)]


@pytest.mark.parametrize("style", ["4.x", "3.x"])
def test_roundtrip(tmp_path: Path, style: str) -> None:
    make_dump(tmp_path, style)
    assert read_pagemap(tmp_path, 42) == (5, ENTRIES)
    assert read_pstree(tmp_path) == [Task(42, 0, 42, 42), Task(43, 42, 42, 42)]
    assert [(v.start, v.end, v.can_be_lazy()) for v in read_mm(tmp_path, 42)] == [
        (0x10000, 0x20000, True),
        (0x30000, 0x31000, False),
    ]


def test_framing_errors(tmp_path: Path) -> None:
    make_dump(tmp_path)
    raw = (tmp_path / "pagemap-42.img").read_bytes()
    (tmp_path / "pagemap-42.img").write_bytes(raw[:-3])
    with pytest.raises(CriuImageError, match="truncated"):
        read_pagemap(tmp_path, 42)
    (tmp_path / "pagemap-42.img").write_bytes(raw[:4] + b"\0\0\0\0" + raw[8:])
    with pytest.raises(CriuImageError, match="magic 0x00000000, expected 0x56084025"):
        read_pagemap(tmp_path, 42)
    with pytest.raises(CriuImageError, match=r"mm-99\.img is missing"):
        read_mm(tmp_path, 99)


def test_both_page_counts_must_agree(tmp_path: Path) -> None:
    make_dump(tmp_path)
    entry = criu_pb2.CriuPagemapEntry(vaddr=0x10000, compat_nr_pages=2, nr_pages=3, flags=LAZY)
    head = criu_pb2.CriuPagemapHead(pages_id=5)
    (tmp_path / "pagemap-42.img").write_bytes(encode_image(PAGEMAP_MAGIC, [head, entry]))
    with pytest.raises(CriuImageError, match=r"2 pages \(field 2\) and 3 pages \(field 5\)"):
        read_pagemap(tmp_path, 42)


def test_layout_and_reader(tmp_path: Path) -> None:
    data = make_dump(tmp_path)
    layout = CriuLayout.load(tmp_path, 42)
    assert [(r.start, r.length) for r in layout.regions] == [(0x10000, 0x10000)]  # no vdso
    assert [(e.start, e.length, e.kind, e.data_offset) for e in layout.extents] == [
        (0x10000, 4 * PAGE, ExtentKind.DATA, 0),
        (0x14000, 4 * PAGE, ExtentKind.ZERO, 0),  # the non-lazy pages and the hole
        (0x18000, 3 * PAGE, ExtentKind.DATA, 6 * PAGE),  # after the non-lazy data
        (0x1B000, 5 * PAGE, ExtentKind.ZERO, 0),
    ]
    with CriuImageReader.open_task(tmp_path, 42) as reader:
        assert reader.image_id == "criu-42"
        assert (reader.total_bytes, reader.data_bytes) == (0x10000, 7 * PAGE)
        (extent,) = reader.extents(ImageAddr(0x19000), 2 * PAGE)
        assert bytes(reader.data(extent)) == data[7 * PAGE : 9 * PAGE]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([PagemapEntry(0x10000, 1, PE_LAZY)], "not present"),
        ([PagemapEntry(0x10000, 1, PE_LAZY | PE_PARENT)], "in a parent dump"),
        ([PagemapEntry(0x30000, 1, LAZY)], "not inside one lazy VMA"),
        ([PagemapEntry(0x10000, 2, LAZY), PagemapEntry(0x11000, 1, LAZY)], "overlaps"),
        ([PagemapEntry(0x10800, 1, LAZY)], "not page-aligned"),
        ([PagemapEntry(0x10000, 0, LAZY)], "has no pages"),
    ],
)
def test_layout_refuses(tmp_path: Path, entries: list[PagemapEntry], message: str) -> None:
    make_dump(tmp_path)
    write_pagemap(tmp_path, 42, 5, entries)
    with pytest.raises(CriuImageError, match=message):
        CriuLayout.load(tmp_path, 42)


def test_truncated_pages_file_refused(tmp_path: Path) -> None:
    data = make_dump(tmp_path)
    (tmp_path / "pages-5.img").write_bytes(data[: 8 * PAGE])
    with pytest.raises(CriuImageError, match="truncated"):
        CriuImageReader.open_task(tmp_path, 42)


def test_image_ids() -> None:
    assert image_id_for(42) == "criu-42"
    assert pid_of("criu-42") == 42
    assert pid_of("criu-042") is None
    assert pid_of("criu-") is None
    assert pid_of("x-42") is None


def test_page_server_catalog_serves_a_criu_dir(tmp_path: Path) -> None:
    data = make_dump(tmp_path)
    catalog = ImageCatalog(tmp_path)
    try:
        assert catalog.list() == ["criu-42"]  # the zombie has no memory
        resolved = catalog.resolve("criu-42", 0x18000, 3 * PAGE)
        (extent,) = resolved.extents
        assert bytes(resolved.image.data(extent)) == data[6 * PAGE : 9 * PAGE]
        for missing in ("criu-43", "criu-7", "../x"):
            with pytest.raises(RequestError) as info:
                catalog.image(missing)
            assert info.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(RequestError) as info:
            catalog.resolve("criu-42", 0x40000, PAGE)
        assert info.value.code is grpc.StatusCode.OUT_OF_RANGE
    finally:
        catalog.close()
    images = CriuImages(tmp_path)
    with pytest.raises(ImageNotFound):
        images.open("criu-43")
    images.close()
