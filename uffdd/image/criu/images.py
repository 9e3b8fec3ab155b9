"""CRIU image files: the framing, the few entry types a lazy-pages daemon reads, a writer.

Why our own codec: uffdd reads a dump's ``pstree.img``, ``mm-<pid>.img`` and
``pagemap-<pid>.img`` to learn which ranges of each task are lazy and where their data
lies in ``pages-<id>.img``; tests need to write such dumps from a known pattern. Both
directions live here, so the framing (magics, 4-byte little-endian entry sizes) and the
two page-count fields (CRIU 3.x: field 2; CRIU 4.x: 64-bit field 5, field 2 left 0) are
decided in one place. Messages: ``proto/uffdd/v1/criu.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from google.protobuf.message import DecodeError, Message

from uffdd.core.errors import ImageError
from uffdd.v1 import criu_pb2

COMMON_MAGIC = 0x54564319
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
MM_MAGIC = 0x57492820
PAGEMAP_MAGIC = 0x56084025

PE_PARENT = 1
PE_LAZY = 2
PE_PRESENT = 4

IMG_VERSION = 2
"""inventory ``img_version`` CRIU writes for images v1.1."""

# mmap flags and CRIU's VMA status bits that decide whether a VMA can be lazy
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_LOCKED = 0x2000
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_VVAR = 1 << 12

PagemapStyle = Literal["4.x", "3.x"]

_U32 = struct.Struct("<I")
_M = TypeVar("_M", bound=Message)


class CriuImageError(ImageError):
    """A CRIU image file that is missing, malformed, or inconsistent with another."""


# -- framing -------------------------------------------------------------------------------


def encode_image(magic: int, messages: Iterable[Message]) -> bytes:
    """An image file's bytes: magics, then each message with its 4-byte LE size."""
    parts = [_U32.pack(magic)] if magic == INVENTORY_MAGIC else [_U32.pack(COMMON_MAGIC)]
    if magic != INVENTORY_MAGIC:
        parts.append(_U32.pack(magic))
    for message in messages:
        body = message.SerializeToString()
        parts += [_U32.pack(len(body)), body]
    return b"".join(parts)


def decode_entries(raw: bytes, magic: int, name: str) -> list[bytes]:
    """The serialized entries of an image file whose type magic must be ``magic``."""
    position = 0
    first = _read_u32(raw, position, name, "magic")
    position += 4
    if first in (COMMON_MAGIC,):
        first = _read_u32(raw, position, name, "type magic")
        position += 4
    if first != magic:
        raise CriuImageError(f"{name}: magic {first:#010x}, expected {magic:#010x}")
    entries: list[bytes] = []
    while position < len(raw):
        size = _read_u32(raw, position, name, f"size of entry {len(entries)}")
        position += 4
        if position + size > len(raw):
            raise CriuImageError(
                f"{name}: entry {len(entries)} is {size} bytes, only "
                f"{len(raw) - position} left (truncated)"
            )
        entries.append(raw[position : position + size])
        position += size
    return entries


def _read_u32(raw: bytes, position: int, name: str, what: str) -> int:
    if position + 4 > len(raw):
        raise CriuImageError(f"{name}: truncated before its {what}")
    value: int = _U32.unpack_from(raw, position)[0]
    return value


def _parse(factory: Callable[[], _M], body: bytes, name: str, index: int) -> _M:
    message = factory()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise CriuImageError(f"{name}: entry {index} does not parse: {exc}") from exc
    return message


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CriuImageError(f"{path.name} is missing in {path.parent}") from None
    except OSError as exc:
        raise CriuImageError(f"cannot read {path}: {exc}") from exc


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    """One task of ``pstree.img``."""

    pid: int
    ppid: int
    pgid: int = 0
    sid: int = 0


@dataclass(frozen=True, slots=True)
class Vma:
    """One VMA of ``mm-<pid>.img``."""

    start: int
    end: int
    flags: int = MAP_PRIVATE | MAP_ANONYMOUS
    status: int = VMA_AREA_REGULAR | VMA_ANON_PRIVATE
    prot: int = 3

    def can_be_lazy(self) -> bool:
        """Whether ``criu restore --lazy-pages`` registers it with the task's uffd."""
        private_anon = MAP_PRIVATE | MAP_ANONYMOUS
        special = VMA_AREA_VDSO | VMA_AREA_VSYSCALL | VMA_AREA_VVAR
        return (
            self.flags & private_anon == private_anon
            and not self.flags & MAP_LOCKED
            and not self.status & special
        )


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """One pagemap entry: ``nr_pages`` pages from ``vaddr`` with PE_* ``flags``."""

    vaddr: int
    nr_pages: int
    flags: int

    def end(self, page_size: int) -> int:
        return self.vaddr + self.nr_pages * page_size


# -- readers -------------------------------------------------------------------------------


def read_pstree(directory: Path) -> list[Task]:
    """The tasks of ``pstree.img`` in CRIU's order (the order restore hands them over)."""
    path = directory / "pstree.img"
    entries = decode_entries(_read_file(path), PSTREE_MAGIC, path.name)
    tasks = []
    for index, body in enumerate(entries):
        entry = _parse(criu_pb2.CriuPstreeEntry, body, path.name, index)
        if not entry.HasField("pid") or entry.pid <= 0:
            raise CriuImageError(f"{path.name}: entry {index} has no valid pid")
        tasks.append(Task(entry.pid, entry.ppid, entry.pgid, entry.sid))
    if not tasks:
        raise CriuImageError(f"{path.name}: no tasks")
    return tasks


def read_mm(directory: Path, pid: int) -> list[Vma]:
    """The VMAs of ``mm-<pid>.img``."""
    path = directory / f"mm-{pid}.img"
    entries = decode_entries(_read_file(path), MM_MAGIC, path.name)
    if len(entries) != 1:
        raise CriuImageError(f"{path.name}: {len(entries)} entries, expected one")
    mm = _parse(criu_pb2.CriuMmEntry, entries[0], path.name, 0)
    return [Vma(v.start, v.end, v.flags, v.status, v.prot) for v in mm.vmas]


def read_pagemap(directory: Path, pid: int) -> tuple[int, list[PagemapEntry]]:
    """``pagemap-<pid>.img``: the pages id and the entries (either page-count style)."""
    path = directory / f"pagemap-{pid}.img"
    entries = decode_entries(_read_file(path), PAGEMAP_MAGIC, path.name)
    if not entries:
        raise CriuImageError(f"{path.name}: no head")
    head = _parse(criu_pb2.CriuPagemapHead, entries[0], path.name, 0)
    result = []
    for index, body in enumerate(entries[1:], start=1):
        entry = _parse(criu_pb2.CriuPagemapEntry, body, path.name, index)
        wide, compat = entry.nr_pages, entry.compat_nr_pages
        if wide and compat and wide != compat:
            raise CriuImageError(
                f"{path.name}: entry {index} at {entry.vaddr:#x} says {compat} pages "
                f"(field 2) and {wide} pages (field 5)"
            )
        flags = entry.flags
        if entry.in_parent:
            flags |= PE_PARENT
        result.append(PagemapEntry(entry.vaddr, wide or compat, flags))
    return head.pages_id, result


# -- writer (tests, tools) -----------------------------------------------------------------


def write_inventory(directory: Path) -> None:
    entry = criu_pb2.CriuInventoryEntry(img_version=IMG_VERSION)
    (directory / "inventory.img").write_bytes(encode_image(INVENTORY_MAGIC, [entry]))


def write_pstree(directory: Path, tasks: Sequence[Task]) -> None:
    entries = [
        criu_pb2.CriuPstreeEntry(pid=t.pid, ppid=t.ppid, pgid=t.pgid, sid=t.sid, threads=[t.pid])
        for t in tasks
    ]
    (directory / "pstree.img").write_bytes(encode_image(PSTREE_MAGIC, entries))


def write_mm(directory: Path, pid: int, vmas: Sequence[Vma]) -> None:
    mm = criu_pb2.CriuMmEntry(
        vmas=[
            criu_pb2.CriuVmaEntry(
                start=v.start, end=v.end, pgoff=0, shmid=0, prot=v.prot, flags=v.flags,
                status=v.status, fd=-1,
            )
            for v in vmas
        ],
    )  # fmt: skip
    for name in _MM_REQUIRED:
        setattr(mm, name, 0)
    (directory / f"mm-{pid}.img").write_bytes(encode_image(MM_MAGIC, [mm]))


_MM_REQUIRED = (
    "mm_start_code", "mm_end_code", "mm_start_data", "mm_end_data", "mm_start_stack",
    "mm_start_brk", "mm_brk", "mm_arg_start", "mm_arg_end", "mm_env_start", "mm_env_end",
    "exe_file_id",
)  # fmt: skip


def write_pagemap(
    directory: Path,
    pid: int,
    pages_id: int,
    entries: Sequence[PagemapEntry],
    *,
    style: PagemapStyle = "4.x",
) -> None:
    """Write ``pagemap-<pid>.img``; ``style`` picks where the page count goes."""
    messages: list[Message] = [criu_pb2.CriuPagemapHead(pages_id=pages_id)]
    for e in entries:
        entry = criu_pb2.CriuPagemapEntry(vaddr=e.vaddr, flags=e.flags)
        if style == "4.x":
            entry.compat_nr_pages = 0
            entry.nr_pages = e.nr_pages
        else:
            entry.compat_nr_pages = e.nr_pages
        messages.append(entry)
    (directory / f"pagemap-{pid}.img").write_bytes(encode_image(PAGEMAP_MAGIC, messages))


def pages_path(directory: Path, pages_id: int) -> Path:
    return directory / f"pages-{pages_id}.img"
