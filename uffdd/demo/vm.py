"""The memory calls the demo's restored process makes on itself, by what they mean.

Why: the demo exercises exactly what uffdd must follow (REMAP, REMOVE and UNMAP
events), so it moves, resizes, drops and unmaps its own memory the way a C program
would (``uffdd.kernel.memory``), and reads and writes it at raw addresses.
"""

from __future__ import annotations

import ctypes

from uffdd.kernel import memory


def move(old: int, length: int, new: int) -> None:
    """mremap ``[old, +length)`` to exactly ``new`` (the old range disappears)."""
    memory.mremap(old, length, length, memory.MREMAP_MAYMOVE | memory.MREMAP_FIXED, new)


def resize(address: int, old_length: int, new_length: int) -> None:
    """mremap in place: shrink (the tail is unmapped) or grow (fresh memory after)."""
    memory.mremap(address, old_length, new_length)


def drop(address: int, length: int) -> None:
    """madvise(MADV_DONTNEED): the range stays mapped and reads zeros afterwards."""
    memory.madvise(address, length, memory.MADV_DONTNEED)


def unmap(address: int, length: int) -> None:
    """munmap the range."""
    memory.munmap(address, length)


def read(address: int, length: int) -> bytes:
    """Copy ``length`` bytes of our own memory at ``address`` (faulting them in)."""
    return ctypes.string_at(address, length)


def write(address: int, data: bytes) -> None:
    """Copy ``data`` into our own memory at ``address``."""
    ctypes.memmove(address, data, len(data))


def zero(address: int, length: int) -> None:
    """Fill ``[address, +length)`` with zero bytes (touching every page)."""
    ctypes.memset(address, 0, length)
