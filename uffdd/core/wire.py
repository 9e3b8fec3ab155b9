"""uffd_msg codec: raw bytes from read() on a userfaultfd <-> typed events (sans-IO).

The kernel hands out fixed 32-byte ``struct uffd_msg`` records, many per read. Decoding
them here, without IO, lets the daemon read in batches and lets tests cover every
layout (and every malformed input) without a kernel. Layout, native byte order:

    u8 event, u8 reserved1, u16 reserved2, u32 reserved3, then a 24-byte union:
    PAGEFAULT u64 flags, u64 address, u32 ptid   FORK   u32 ufd
    REMAP     u64 from,  u64 to,      u64 len    REMOVE/UNMAP u64 start, u64 end
"""

from __future__ import annotations

import struct

from uffdd.core.addresses import RunAddr
from uffdd.core.errors import PeerProtocolError
from uffdd.core.events import Fork, PageFault, Remap, Remove, UffdEvent, Unmap

MSG_SIZE = 32

EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

PAGEFAULT_FLAG_WRITE = 1 << 0
PAGEFAULT_FLAG_WP = 1 << 1
PAGEFAULT_FLAG_MINOR = 1 << 2
_KNOWN_FAULT_FLAGS = PAGEFAULT_FLAG_WRITE | PAGEFAULT_FLAG_WP | PAGEFAULT_FLAG_MINOR

_HEADER = struct.Struct("=BBHI")
_PAGEFAULT = struct.Struct("=QQI4x")
_FORK = struct.Struct("=I20x")
_THREE_U64 = struct.Struct("=QQQ")
_TWO_U64 = struct.Struct("=QQ8x")


class WireError(PeerProtocolError):
    """Bytes read from a userfaultfd are not a valid sequence of uffd_msg records."""


def decode_messages(data: bytes | bytearray | memoryview) -> list[UffdEvent]:
    """Decode every record in ``data`` (a whole number of 32-byte messages), in order."""
    view = memoryview(data).cast("B")
    if len(view) % MSG_SIZE:
        raise WireError(f"read returned {len(view)} bytes, not a multiple of {MSG_SIZE}")
    return [
        decode_message(view[offset : offset + MSG_SIZE]) for offset in range(0, len(view), MSG_SIZE)
    ]


def decode_message(record: bytes | bytearray | memoryview) -> UffdEvent:
    """Decode one 32-byte uffd_msg."""
    # Count bytes, not items: len() of a memoryview of, say, u64s is a quarter of its size.
    record = memoryview(record).cast("B")
    if len(record) != MSG_SIZE:
        raise WireError(f"a uffd_msg is {MSG_SIZE} bytes, got {len(record)}")
    event = _HEADER.unpack_from(record)[0]
    body = _HEADER.size
    if event == EVENT_PAGEFAULT:
        flags, address, tid = _PAGEFAULT.unpack_from(record, body)
        if flags & ~_KNOWN_FAULT_FLAGS:
            raise WireError(f"page fault at {address:#x} has unknown flags {flags:#x}")
        return PageFault(
            address=RunAddr(address),
            write=bool(flags & PAGEFAULT_FLAG_WRITE),
            wp=bool(flags & PAGEFAULT_FLAG_WP),
            minor=bool(flags & PAGEFAULT_FLAG_MINOR),
            tid=tid,
        )
    if event == EVENT_FORK:
        return Fork(child_fd=_FORK.unpack_from(record, body)[0])
    if event == EVENT_REMAP:
        old, new, length = _THREE_U64.unpack_from(record, body)
        return Remap(old=RunAddr(old), new=RunAddr(new), length=length)
    if event in (EVENT_REMOVE, EVENT_UNMAP):
        start, end = _TWO_U64.unpack_from(record, body)
        if end < start:
            raise WireError(f"event {event:#x} has end {end:#x} before start {start:#x}")
        kind = Remove if event == EVENT_REMOVE else Unmap
        return kind(start=RunAddr(start), end=RunAddr(end))
    raise WireError(f"unknown userfaultfd event code {event:#x}")
