"""The memory calls a process makes on itself: mmap, munmap, mremap, madvise, mallopt,
and buffers that skip zeroing.

Why ctypes, and why one module: Python's ``mmap`` objects cannot map at a chosen
address, move, shrink or partly drop memory, and a restorer (or a workload exercising
uffdd) needs exactly those calls, the way a C program makes them. Failures raise
``OSError`` with the errno; callers add what the failure means to them.
"""

from __future__ import annotations

import ctypes
import os

from uffdd.native._ffi import ffi

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000
MAP_HUGE_SHIFT = 26
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
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
_FAILED = ctypes.c_void_p(-1).value


def _error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def mmap(address: int | None, length: int, prot: int, flags: int) -> int:
    """mmap anonymous memory (no file); the address it landed at."""
    result = _mmap(address, length, prot, flags, -1, 0)
    if result is None or result == _FAILED:
        raise _error("mmap")
    return int(result)


def munmap(address: int, length: int) -> None:
    if _munmap(address, length) != 0:
        raise _error("munmap")


def mremap(address: int, old_length: int, new_length: int, flags: int = 0, new: int = 0) -> int:
    """mremap; with ``MREMAP_FIXED`` the memory moves to exactly ``new``."""
    result = _mremap(address, old_length, new_length, flags, new or None)
    if result is None or result == _FAILED:
        raise _error("mremap")
    return int(result)


def madvise(address: int, length: int, advice: int) -> None:
    if _madvise(address, length, advice) != 0:
        raise _error("madvise")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(*, trim_threshold: int = 128 << 20, mmap_threshold: int = 8 << 20) -> bool:
    """Have malloc keep freed memory for the next allocation instead of returning it.

    Why: page data arrives in buffers of up to a few MiB, each freed once installed.
    glibc gives such buffers back to the kernel (munmap, or trimming the heap's top),
    so the next one's pages are new: zeroed and faulted in one by one, which on a VM
    (~11 us a page here) costs more than copying the data. Kept, they are warm. The
    process stays at its peak of data in flight (bounded by the in-flight budget).
    False when the C library has no ``mallopt`` (not glibc) or refuses.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.restype = ctypes.c_int
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


_uninitialized = ffi.new_allocator(should_clear_after_alloc=False)


def uninitialized_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes whose contents are whatever malloc left.

    Why: ``bytearray(size)`` zeroes every byte first; a 1 MiB receive buffer that the
    socket then overwrites whole paid 27 us (warm) to several hundred (fresh pages) for
    nothing. Only for buffers filled completely before anyone reads them.
    """
    return memoryview(ffi.buffer(_uninitialized("char[]", size)))
