"""The two address spaces, kept apart by type (shared/DESIGN.md section 3).

A page has a run-time address (where it lives in the restored process now; moves with
mremap) and an image address (where it lives in the snapshot; never moves). Mixing them
is the classic bug of a lazy-restore handler after a remap, so they are distinct types
and every conversion is explicit.
"""

from __future__ import annotations

from typing import NewType

RunAddr = NewType("RunAddr", int)
"""An address in the restored process's address space, as the kernel reports it."""

ImageAddr = NewType("ImageAddr", int)
"""An address in the snapshot image, as the page server names pages."""

PAGE_SIZE = 4096
"""The base page size; huge pages are multiples of it."""


def page_floor(address: int, page_size: int = PAGE_SIZE) -> int:
    """Round down to the start of the page holding ``address``."""
    return address - (address % page_size)


def page_ceil(address: int, page_size: int = PAGE_SIZE) -> int:
    """Round up to the next page boundary (``address`` itself when aligned)."""
    return -(-address // page_size) * page_size
