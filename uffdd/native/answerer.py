"""The urgent answerer's owner (``uffdd-urgent``, ``csrc/answerer.c``): a page server's
urgent fast-lane connections answered on a pthread, from images in memory.

Why a thread: an urgent request answered by the page server's event loop cost tens of
microseconds of Python and a wake-up of the loop on top, and a demand fault waits for
both. The thread answers a connection from its first request on, with the chunks the
loop would send, and hands back, before writing a byte of it, every request it cannot
answer exactly (with the connection and its unparsed bytes).

This owner takes fds, buffers and extent rows; which images exist, and what a connection
handed back means, is ``pageserver/urgent.py``'s. docs/architecture.md: the thread
(section 4), the hand-back rules (section 6.4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from uffdd.native._ffi import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

_TAKE = 64

DECLINED = lib.UFFDD_HB_DECLINED
"""A hand-back's reason: a request this thread does not answer (the loop does)."""
FULL = lib.UFFDD_HB_FULL
"""No room for the connection."""
UNKNOWN = lib.UFFDD_HB_UNKNOWN
"""A request for an image not registered (yet)."""


class Extent(NamedTuple):
    """One extent of an image, as the thread serves it."""

    start: int
    end: int
    """Image addresses."""
    data_offset: int
    """Of ``start``'s bytes in the data buffer (data extents)."""
    page_size: int
    """Of the extent's region."""
    zero: bool
    """Known zeros (no data)."""


@dataclass(frozen=True, slots=True)
class HandBack:
    """A connection the thread gives back: the loop serves it from now on."""

    token: int
    fd: int
    """The caller's now."""
    reason: int
    """:data:`DECLINED`, :data:`FULL` or :data:`UNKNOWN`."""
    initial: bytes
    """Its bytes the thread read and did not answer, to be parsed first."""


@dataclass(frozen=True, slots=True)
class AnswererStats:
    """The thread's counters and state, read under its lock."""

    live: int
    """Connections it owns (in a slot, or queued to be adopted)."""
    waiting_for_output: int
    """Connections whose peer does not read: they wait for EPOLLOUT and are not read."""
    requests: int
    """Requests accepted so far (each answered whole)."""


class Answerer:
    """A started answerer: ``chunk_size`` per data chunk, requests of at most
    ``max_length`` bytes, at most ``max_connections`` connections."""

    _handle: Any = None  # until started (a refused __init__ leaves nothing to stop)

    def __init__(self, *, chunk_size: int, max_length: int, max_connections: int) -> None:
        handle = lib.uffdd_answerer_new(chunk_size, max_length, max_connections)
        if handle == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"cannot start the urgent answerer: {os.strerror(err)}")
        self._handle = handle
        self._kept: list[tuple[Any, ...]] = []  # buffers the thread reads
        self._out: Any = ffi.new("struct uffdd_handback[]", _TAKE)
        self.fd: int = lib.uffdd_answerer_efd(handle)
        """An eventfd, readable while connections are handed back."""

    @property
    def closed(self) -> bool:
        return self._handle is None

    def add_image(
        self,
        image_id: bytes,
        *,
        page_size: int,
        chunk_size: int,
        data: Buffer,
        data_size: int,
        verified: bytearray,
        checksums: Sequence[int],
        data_fd: int,
        extents: Sequence[Extent],
    ) -> int:
        """Serve ``image_id`` from now on: 0, or the errno that refused it. ``data`` (its
        data file's mmap, ``data_size`` bytes, the file open as ``data_fd``), ``verified``
        (a byte per checksum chunk, set by whoever verifies one first) and the sorted,
        disjoint ``extents`` stay in use until :meth:`close`."""
        table: Any = ffi.new("struct uffdd_ans_extent[]", max(len(extents), 1))
        for row, extent in zip(table, extents, strict=False):
            row.start = extent.start
            row.end = extent.end
            row.data_offset = extent.data_offset
            row.page_size = extent.page_size
            row.kind = lib.UFFDD_ANS_ZERO if extent.zero else 0
        buffer = ffi.from_buffer("char[]", data)
        flags = ffi.from_buffer("uint8_t[]", verified, require_writable=True)
        sums = ffi.new("uint64_t[]", list(checksums)) if checksums else ffi.NULL
        err = int(
            lib.uffdd_answerer_image(
                self._handle, image_id, len(image_id), page_size, chunk_size, buffer,
                data_size, flags, sums, len(checksums), data_fd, table, len(extents),
            )
        )  # fmt: skip
        if not err:
            self._kept.append((data, buffer, verified, flags, sums))
        return err

    def add(self, fd: int, token: int, initial: bytes) -> int:
        """Answer the connection ``fd`` (the thread's from now on, closed or handed back
        by it), whose first bytes ``initial`` were read already: 0, or the errno that
        refused it (EBUSY: full or stopping; ``fd`` stays the caller's)."""
        return int(lib.uffdd_answerer_add(self._handle, fd, token, initial, len(initial)))

    def take(self) -> list[HandBack]:
        """The connections handed back so far (their fds are the caller's now)."""
        backs: list[HandBack] = []
        while count := int(lib.uffdd_answerer_take(self._handle, self._out, _TAKE)):
            for back in self._out[0:count]:
                initial = bytes(ffi.buffer(back.bytes, back.len)) if back.len else b""
                lib.uffdd_free(back.bytes)
                backs.append(HandBack(int(back.token), int(back.fd), int(back.reason), initial))
            if count < _TAKE:
                break
        return backs

    def drain(self) -> int:
        """Answer what was accepted, read nothing new, close each connection when done;
        returns how many are still open (call again until 0, or close)."""
        return int(lib.uffdd_answerer_drain(self._handle))

    def stats(self) -> AnswererStats:
        if self._handle is None:
            raise ValueError("the answerer is closed")
        out: Any = ffi.new("struct uffdd_answerer_stats *")
        lib.uffdd_answerer_stats(self._handle, out)
        return AnswererStats(int(out.live), int(out.waiting_for_output), int(out.requests))

    def close(self) -> None:
        """Stop the thread and close what it still held (hand-backs not taken too).
        Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.uffdd_answerer_free(handle)
            self._kept.clear()

    def __del__(self) -> None:
        # The thread reads the images' buffers: it must stop before they can go.
        self.close()
