"""Firecracker's UFFD handover message, parsed and checked without IO.

Why pure: the payload comes from a local peer we do not control, and every way it can
be wrong (not JSON, not an array, a missing or mistyped field, a zero size, an address
not aligned to its page size, a page size other than 4 KiB or 2 MiB, regions that
overlap in the VMM or in the memory file) must be a clear, tested error before any
fd is touched. The listener (``uffdd.daemon.doors.firecracker.listener``) does the sockets.

The message (shared/PROTOCOLS.md section 3) is a JSON array of objects
``{"base_host_virt_addr", "size", "offset", "page_size"}``; older senders name the page
size ``page_size_kib`` although it holds bytes. On a SOCK_STREAM socket several
messages may arrive back to back, so :func:`take_message` frames one JSON value off the
front of a byte buffer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.process import LazyRegion

SMALL_PAGE = 4096
HUGE_PAGE = 2 << 20
PAGE_SIZES = (SMALL_PAGE, HUGE_PAGE)
MAX_MESSAGE_BYTES = 1 << 20
"""A region list is a few hundred bytes; more than this is not Firecracker talking."""
MAX_REGIONS = 4096
_U64 = (1 << 64) - 1
_FIELDS = ("base_host_virt_addr", "size", "offset")
_FILLER = b" \t\r\n\0"
"""Bytes skipped between messages (a late fd travels with a filler byte or two)."""


class PayloadError(ValueError):
    """The peer's message is not a valid Firecracker region list (the text says why)."""


@dataclass(frozen=True, slots=True)
class GuestRegion:
    """One guest memory region as Firecracker describes it."""

    base_host_virt_addr: int
    """Where the region is mapped in the VMM (the run-time address)."""
    size: int
    offset: int
    """Where its contents start in the snapshot memory file (the image address)."""
    page_size: int

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size

    def describe(self) -> str:
        return (
            f"[{self.base_host_virt_addr:#x}, {self.end:#x}) at file offset {self.offset:#x} "
            f"(page size {self.page_size})"
        )


def take_message(buffer: bytes) -> tuple[bytes | None, bytes]:
    """Frame the first JSON value of ``buffer``: (message, rest), or (None, buffer)
    when it is not complete yet. Leading whitespace and NUL bytes are dropped.

    Raises :class:`PayloadError` for bytes that cannot start a region list (the JSON
    value must be an array or object; anything else is garbage) or a message longer
    than :data:`MAX_MESSAGE_BYTES`.
    """
    start = 0
    while start < len(buffer) and buffer[start] in _FILLER:
        start += 1
    if start == len(buffer):
        return None, b""
    if buffer[start] not in b"[{":
        snippet = buffer[start : start + 32]
        raise PayloadError(f"the message is not a JSON array of regions: starts {snippet!r}")
    depth = 0
    in_string = False
    escaped = False
    for index in range(start, min(len(buffer), start + MAX_MESSAGE_BYTES)):
        byte = buffer[index]
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
        elif byte in b"]}":
            depth -= 1
            if depth == 0:
                return buffer[start : index + 1], buffer[index + 1 :]
    if len(buffer) - start >= MAX_MESSAGE_BYTES:
        raise PayloadError(f"the message exceeds {MAX_MESSAGE_BYTES} bytes")
    return None, buffer[start:]


def parse_regions(message: bytes) -> tuple[GuestRegion, ...]:
    """The regions of one message, sorted by VMM address; every check applied."""
    try:
        value = json.loads(message.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PayloadError(f"the message is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise PayloadError(f"the message is not valid JSON: {exc.msg} at {exc.pos}") from exc
    if not isinstance(value, list):
        raise PayloadError(f"the message is a JSON {_kind(value)}, not an array of regions")
    if not value:
        raise PayloadError("the region list is empty")
    if len(value) > MAX_REGIONS:
        raise PayloadError(f"{len(value)} regions, more than {MAX_REGIONS}")
    regions = [_region(index, item) for index, item in enumerate(value)]
    _check_disjoint(regions, lambda r: (r.base_host_virt_addr, r.end), "in the VMM")
    _check_disjoint(regions, lambda r: (r.offset, r.offset + r.size), "in the memory file")
    return tuple(sorted(regions, key=lambda r: r.base_host_virt_addr))


def _region(index: int, item: object) -> GuestRegion:
    where = f"region {index}"
    if not isinstance(item, dict):
        raise PayloadError(f"{where} is a JSON {_kind(item)}, not an object")
    values: dict[str, int] = {}
    for name in _FIELDS:
        if name not in item:
            raise PayloadError(f"{where} has no {name!r}")
        values[name] = _u64(where, name, item[name])
    sizes = {
        name: _u64(where, name, item[name])
        for name in ("page_size", "page_size_kib")
        if name in item
    }
    if not sizes:
        raise PayloadError(f"{where} has no 'page_size' (nor the older 'page_size_kib')")
    if len(set(sizes.values())) > 1:
        raise PayloadError(
            f"{where}: page_size {sizes['page_size']} and page_size_kib "
            f"{sizes['page_size_kib']} disagree"
        )
    page_size = next(iter(sizes.values()))
    if page_size not in PAGE_SIZES:
        raise PayloadError(f"{where}: page size {page_size} is neither 4 KiB nor 2 MiB")
    region = GuestRegion(values["base_host_virt_addr"], values["size"], values["offset"], page_size)
    if region.size == 0:
        raise PayloadError(f"{where} has size 0")
    for name in _FIELDS:
        if values[name] % page_size:
            raise PayloadError(
                f"{where}: {name} {values[name]:#x} is not a multiple of its page size {page_size}"
            )
    if region.end > _U64 or region.offset + region.size > _U64:
        raise PayloadError(f"{where} wraps around the 64-bit address space")
    return region


def _u64(where: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where}: {name} is a JSON {_kind(value)}, not an integer")
    if not 0 <= value <= _U64:
        raise PayloadError(f"{where}: {name} {value} is not an unsigned 64-bit integer")
    return value


def _check_disjoint(
    regions: list[GuestRegion], span: Callable[[GuestRegion], tuple[int, int]], where: str
) -> None:
    ordered = sorted(regions, key=lambda r: span(r)[0])
    for before, after in itertools.pairwise(ordered):
        if span(after)[0] < span(before)[1]:
            raise PayloadError(
                f"regions {before.describe()} and {after.describe()} overlap {where}"
            )


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


@dataclass(frozen=True, slots=True)
class ImageRegion:
    """A region of the image that backs the VMs (its address = memory file offset)."""

    start: int
    length: int
    page_size: int


def lazy_regions(
    regions: tuple[GuestRegion, ...], image: tuple[ImageRegion, ...], image_id: str
) -> list[LazyRegion]:
    """The guest regions as the core's lazy regions, each checked to lie inside one
    image region with the same page size (anything else would be served wrongly)."""
    lazy: list[LazyRegion] = []
    for region in regions:
        start, end = region.offset, region.offset + region.size
        home = next((r for r in image if r.start <= start and end <= r.start + r.length), None)
        if home is None:
            raise PayloadError(
                f"region {region.describe()}: file range [{start:#x}, {end:#x}) is not inside "
                f"image {image_id}"
            )
        if home.page_size != region.page_size:
            raise PayloadError(
                f"region {region.describe()}: image {image_id} was made with page size "
                f"{home.page_size} (make it with --page-size {region.page_size})"
            )
        lazy.append(
            LazyRegion(
                RunAddr(region.base_host_virt_addr),
                ImageAddr(region.offset),
                region.size,
                region.page_size,
            )
        )
    return lazy
