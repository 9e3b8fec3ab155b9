"""What every page of the demo's memory holds, so any process can check any byte.

Why a function of the address: the restored process must tell a wrong page from a right
one without a copy of the snapshot, and a page served at the wrong address (the classic
remap bug) must fail the check. Each data page starts with its own image address and
the seed, then carries bytes drawn from a fixed random block at an offset derived from
the address: cheap to build (one slice and a concatenation) and unique per page.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from enum import Enum

from uffdd.core.addresses import PAGE_SIZE, ImageAddr

_HEADER = struct.Struct("<QQ")
_BLOCK_PAGES = 257  # prime: neighbouring pages draw from different offsets


class PageKind(Enum):
    """How a demo page is set up in the source process."""

    DATA = "data"  # written with the pattern
    UNTOUCHED = "untouched"  # never accessed: not even in the dump
    ZEROED = "zeroed"  # written, then cleared: present in memory, all zero


@dataclass(frozen=True, slots=True)
class DemoRegion:
    """One mapping of the demo process: where it lives and which pages hold data."""

    start: ImageAddr
    pages: int
    data_every: int
    """1: every page is data; n: one page in n is data, the rest follow ``others``."""
    others: PageKind = PageKind.UNTOUCHED

    @property
    def length(self) -> int:
        return self.pages * PAGE_SIZE

    def kind(self, index: int) -> PageKind:
        """The kind of the region's ``index``-th page."""
        return PageKind.DATA if index % self.data_every == 0 else self.others


class Pattern:
    """The expected content of data pages for one seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._block = random.Random(seed).randbytes(PAGE_SIZE * (_BLOCK_PAGES + 1))

    def page(self, address: ImageAddr) -> bytes:
        """The 4 KiB a data page at ``address`` holds in the snapshot."""
        page_number = address // PAGE_SIZE
        offset = (page_number * 4099) % (PAGE_SIZE * _BLOCK_PAGES)
        body = self._block[offset : offset + PAGE_SIZE - _HEADER.size]
        return _HEADER.pack(address, self.seed) + body


ZERO_PAGE = bytes(PAGE_SIZE)


def expected_page(pattern: Pattern, region: DemoRegion, index: int) -> bytes:
    """What page ``index`` of ``region`` must read as after a faithful restore."""
    if region.kind(index) is PageKind.DATA:
        return pattern.page(ImageAddr(region.start + index * PAGE_SIZE))
    return ZERO_PAGE


DEMO_BASE = ImageAddr(0x5E00_0000_0000)
"""Where the demo maps its memory: fixed, so the restored process can map the same
addresses (far from where the kernel places ordinary mappings)."""

_GAP = 1 << 20


def demo_layout(size_mib: int) -> tuple[DemoRegion, ...]:
    """The demo's regions for about ``size_mib`` MiB: dense data, a sparse region whose
    untouched pages are not even dumped, a region of zeroed pages, and one to mremap."""
    total_pages = max(size_mib, 8) * (1 << 20) // PAGE_SIZE
    shares = (
        (60, 1, PageKind.UNTOUCHED),  # heap-like: every page data
        (25, 4, PageKind.UNTOUCHED),  # sparse: 1 page in 4 touched
        (5, 8, PageKind.ZEROED),  # written then cleared: zero in the image
        (10, 1, PageKind.UNTOUCHED),  # moved by mremap in the restored process
    )
    regions = []
    address = DEMO_BASE
    for percent, data_every, others in shares:
        pages = max(total_pages * percent // 100, 16)
        regions.append(DemoRegion(ImageAddr(address), pages, data_every, others))
        address = ImageAddr(address + pages * PAGE_SIZE + _GAP)
    return tuple(regions)
