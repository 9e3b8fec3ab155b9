"""The owner of a socket's receiver and writer threads (``uffdd-bulk-recv``,
``uffdd-bulk-send``, ``csrc/receiver.c``).

Why threads: the receiver reads response frames, header then whole body into a
malloc'ed buffer, without the GIL, and queues them; the loop takes whole frames when
:attr:`Receiver.fd` is readable. The writer writes the request frames the loop hands
it, so the loop never waits on the socket's lock while a receive holds it. Neither
thread touches Python. This owner takes a connected socket's fd and plain bytes; the
frames' meaning (requests, checksums, errors) is ``client/bulk_receiver.py``'s.
docs/architecture.md, section 4, has the threads, their locks and their bounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from uffdd.native._ffi import ffi, lib

RUNNING = lib.UFFDD_RECV_RUNNING
""":meth:`Receiver.status` while it runs or frames still wait; afterwards one of:"""
EOF = lib.UFFDD_RECV_EOF
"""The peer closed between frames."""
MIDFRAME = lib.UFFDD_RECV_MIDFRAME
"""The peer closed inside a frame."""
GARBAGE = lib.UFFDD_RECV_GARBAGE
"""A header with unknown flags, or a body over the limit."""
STOPPED = lib.UFFDD_RECV_STOPPED
NOMEM = lib.UFFDD_RECV_NOMEM
"""No memory for a body. Any positive status is the errno of a failed receive or send."""

FrameHeader = tuple[int, int, int, int, int, int, int]
"""request id, address, length, flags, error code, message length, checksum."""

_EMPTY = memoryview(b"")


@dataclass(frozen=True, slots=True)
class ReceiverStats:
    """The threads' counters and state, read under their lock."""

    frames_read: int
    """Frames queued for the loop so far."""
    bytes_read: int
    """Their header and body bytes."""
    queued_bytes: int
    """Body bytes waiting for the loop."""
    queued_frames: int
    bytes_sent: int
    """Request frame bytes written."""
    unsent_bytes: int
    """Request frame bytes handed over and not written yet."""
    full: bool
    """The receiver stopped reading: the queue is full."""
    in_frame: bool
    """The receiver has read a frame's header and waits for its body."""
    sending: bool
    """The writer is in a send."""


class Receiver:
    """Both threads on the connected, blocking socket ``fd`` (which stays the caller's:
    close it after :meth:`close`). At most ``queued_frames`` frames and, past one
    frame, ``max_queued_bytes`` body bytes wait for :meth:`take`; a body over
    ``max_body`` ends the thread (:data:`GARBAGE`)."""

    _handle: Any = None  # until started (a refused __init__ leaves nothing to stop)

    def __init__(
        self, fd: int, *, queued_frames: int, max_queued_bytes: int, max_body: int
    ) -> None:
        handle = lib.uffdd_receiver_new(fd, queued_frames, max_queued_bytes, max_body)
        if handle == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"cannot start the bulk lane's receiver: {os.strerror(err)}")
        self._handle = handle
        self._frames: Any = ffi.NULL  # room for take()'s frames, as large as asked
        self._room = 0
        self.fd: int = lib.uffdd_receiver_efd(handle)
        """An eventfd, readable while frames wait or the end is still to be seen."""

    @property
    def closed(self) -> bool:
        return self._handle is None

    def send(self, frame: bytes) -> bool:
        """Hand the writer ``frame`` (copied; frames go out in order). False: no memory.
        After the end, frames are dropped (:meth:`status` says why it ended)."""
        return lib.uffdd_receiver_send(self._handle, frame, len(frame)) == 0

    def take(self, max_frames: int, max_bytes: int) -> list[tuple[FrameHeader, memoryview]]:
        """Up to ``max_frames`` frames, and no more once their headers and bodies reach
        ``max_bytes`` (the first always comes): each header, and its body as a
        read-only view of memory Python now owns (freed with the view)."""
        if max_frames > self._room:
            self._frames = ffi.new("struct uffdd_frame[]", max_frames)
            self._room = max_frames
        taken = lib.uffdd_receiver_take(self._handle, self._frames, max_frames, max_bytes)
        frames = []
        for index in range(taken):  # every body owned by Python first: freed even if
            frame = self._frames[index]  # a caller stops half way
            body = _EMPTY
            if frame.body_len:
                owned = ffi.gc(frame.body, lib.uffdd_free, size=frame.body_len)
                body = memoryview(ffi.buffer(owned, frame.body_len)).toreadonly()
            header: FrameHeader = (
                int(frame.request_id),
                int(frame.address),
                int(frame.length),
                int(frame.flags),
                int(frame.code),
                int(frame.message_length),
                int(frame.checksum),
            )
            frames.append((header, body))
        return frames

    def status(self) -> int:
        """:data:`RUNNING` while the receiver runs or frames wait; then why it ended."""
        return int(lib.uffdd_receiver_status(self._handle))

    def stats(self) -> ReceiverStats:
        if self._handle is None:
            raise ValueError("the receiver is closed")
        out: Any = ffi.new("struct uffdd_receiver_stats *")
        lib.uffdd_receiver_stats(self._handle, out)
        return ReceiverStats(
            frames_read=int(out.frames_read),
            bytes_read=int(out.bytes_read),
            queued_bytes=int(out.queued_bytes),
            queued_frames=int(out.queued_frames),
            bytes_sent=int(out.bytes_sent),
            unsent_bytes=int(out.unsent_bytes),
            full=bool(out.full),
            in_frame=bool(out.in_frame),
            sending=bool(out.sending),
        )

    def close(self) -> None:
        """Stop both threads (the socket is shut down, which wakes a blocked receive or
        send), join them, and free what they hold. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.uffdd_receiver_free(handle)

    def __del__(self) -> None:
        # Dropped unclosed: the threads must not outlive the socket they read.
        self.close()
