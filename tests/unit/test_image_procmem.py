"""Choosing what a dump captures: /proc/PID/maps parsing, selection, pagemap runs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from uffdd.image.procmem import (
    PAGEMAP_PRESENT,
    PAGEMAP_SWAPPED,
    Mapping,
    parse_maps,
    populated_runs,
    select_mappings,
)

pytestmark = pytest.mark.timeout(30)

MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 fe:00 1234                       /usr/bin/prog
55d0c0001000-55d0c0002000 r-xp 00001000 fe:00 1234                       /usr/bin/prog
55d0c0003000-55d0c0004000 rw-p 00003000 fe:00 1234                       /usr/bin/prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000010000 rw-p 00000000 00:00 0
7f0000010000-7f0000011000 ---p 00000000 00:00 0
7f0000020000-7f0000030000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
7f0000030000-7f0000031000 r--p 00000000 00:00 0
7f0000040000-7f0000041000 rw-p 00000000 00:00 0                          [anon:jit cache]
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_parse_maps() -> None:
    mappings = parse_maps(MAPS)
    assert len(mappings) == 13
    heap = mappings[3]
    assert (heap.start, heap.end, heap.perms, heap.name) == (
        0x55D0C1000000,
        0x55D0C1021000,
        "rw-p",
        "[heap]",
    )
    assert heap.anonymous
    assert heap.private
    assert mappings[4].name == ""
    assert mappings[4].display_name == "[anon]"
    assert mappings[6].name == "/dev/zero (deleted)"
    assert not mappings[6].private
    assert not mappings[0].anonymous


def test_default_selection_is_private_writable_or_anonymous_memory() -> None:
    chosen = [m.display_name + "@" + hex(m.start) for m in select_mappings(parse_maps(MAPS))]
    assert chosen == [
        "/usr/bin/prog@0x55d0c0003000",  # .data: private, writable
        "[heap]@0x55d0c1000000",
        "[anon]@0x7f0000000000",
        "[anon]@0x7f0000030000",  # anonymous, read-only now: may hold written data
        "[anon:jit cache]@0x7f0000040000",
        "[stack]@0x7ffd00000000",
    ]  # not: code/rodata, PROT_NONE, shared, [vvar], [vdso], [vsyscall]


def test_include_and_exclude_patterns() -> None:
    mappings = parse_maps(MAPS)
    names = [m.display_name for m in select_mappings(mappings, include=("/usr/bin/*",))]
    assert names.count("/usr/bin/prog") == 3  # code and rodata too (readable)
    names = [
        m.display_name
        for m in select_mappings(
            mappings, include=("[[]v*", "*"), exclude=("[[]anon*", "[[]stack]")
        )
    ]
    assert "[vvar]" not in names  # kernel mappings never
    assert "[vdso]" not in names
    assert "[stack]" not in names
    assert "[anon]" not in names
    assert "[heap]" in names
    assert "/dev/zero (deleted)" in names  # shared, but readable and asked for


def _pagemap(tmp_path: Path, entries: dict[int, int], pages: int) -> Path:
    path = tmp_path / "pagemap"
    path.write_bytes(b"".join(struct.pack("<Q", entries.get(i, 0)) for i in range(pages)))
    return path


def test_populated_runs_from_present_and_swapped_bits(tmp_path: Path) -> None:
    entries = {
        2: PAGEMAP_PRESENT | 0x1234,
        3: PAGEMAP_SWAPPED,
        4: PAGEMAP_PRESENT,
        7: 1 << 55,  # soft-dirty alone: not populated
        9: PAGEMAP_PRESENT,
    }
    path = _pagemap(tmp_path, entries, 16)
    mapping = Mapping(start=0, end=10 * 4096, perms="rw-p", offset=0, inode=0, name="")
    with open(path, "rb") as pagemap:
        runs = list(populated_runs(pagemap.fileno(), mapping))
    assert runs == [(2 * 4096, 3 * 4096), (9 * 4096, 4096)]


def test_populated_runs_of_huge_pages(tmp_path: Path) -> None:
    huge = 2 * 1024 * 1024
    per_huge = huge // 4096
    path = _pagemap(tmp_path, {per_huge + 5: PAGEMAP_PRESENT}, 3 * per_huge)
    mapping = Mapping(0, 3 * huge, "rw-p", 0, 99, "/dev/hugepages/x", page_size=huge)
    with open(path, "rb") as pagemap:
        assert list(populated_runs(pagemap.fileno(), mapping)) == [(huge, huge)]
