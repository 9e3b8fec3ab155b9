"""The memory calls the demo's restored process makes on itself: mremap, madvise, munmap.

Why ctypes: Python's mmap objects cannot move, drop or partly unmap memory at a given
address, and these calls are exactly what uffdd must follow (REMAP, REMOVE, UNMAP
events), so the demo makes them the way a C program would.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MADV_DONTNEED = 4
_FAILED = ctypes.c_void_p(-1).value


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def move(old: int, length: int, new: int) -> None:
    """mremap ``[old, +length)`` to exactly ``new`` (the old range disappears)."""
    result = _mremap(old, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, new)
    if result is None or result == _FAILED:
        raise _fail("mremap")


def resize(address: int, old_length: int, new_length: int) -> None:
    """mremap in place: shrink (the tail is unmapped) or grow (fresh memory after)."""
    result = _mremap(address, old_length, new_length, 0, None)
    if result is None or result == _FAILED:
        raise _fail("mremap")


def drop(address: int, length: int) -> None:
    """madvise(MADV_DONTNEED): the range stays mapped and reads zeros afterwards."""
    if _madvise(address, length, MADV_DONTNEED) != 0:
        raise _fail("madvise")


def unmap(address: int, length: int) -> None:
    """munmap the range."""
    if _munmap(address, length) != 0:
        raise _fail("munmap")


def read(address: int, length: int) -> bytes:
    """Copy ``length`` bytes of our own memory at ``address`` (faulting them in)."""
    return ctypes.string_at(address, length)


def write(address: int, data: bytes) -> None:
    """Copy ``data`` into our own memory at ``address``."""
    ctypes.memmove(address, data, len(data))


def zero(address: int, length: int) -> None:
    """Fill ``[address, +length)`` with zero bytes (touching every page)."""
    ctypes.memset(address, 0, length)
