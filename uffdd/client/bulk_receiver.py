"""The bulk fast lane's connection, received by a thread of its own.

Why: during a sweep the daemon's one event loop also answers every demand fault, and
receiving bulk data was its largest single cost: ``recv`` of the 1 MiB bodies was
~27 % of its busy samples in an idle sweep (py-spy, bench/README.md session 5). A
pthread in the cffi module (``uffdd_receiver_*``) reads the frames instead, header then
whole body into a malloc'ed buffer, without the GIL, and queues them; the loop takes
whole chunks, one data chunk per turn (or a run of small ones), when the receiver's
eventfd is readable. The thread never touches Python: a Python thread was tried first,
and its GIL hand-backs (three per chunk) cost every demand fault a wake-up of the loop
(fault p99 with the sweep 6.0 -> 8.0 ms, median of six alternating runs).

The loop keeps every decision (which request, which pages, the checksum check in
``Request.deliver``), and hands its request frames to a second pthread
(``uffdd-bulk-send``) that writes them. A TCP socket's lock is held by a recv while it
copies, and a send from the loop slept on that lock: up to several ms, 0.1-0.2 s of a
residency run, in front of whatever fault came next (bench/README.md, session 6).

At most ``max_queued_bytes`` (plus one chunk) wait for the loop; then the reader stops,
so a server that sends faster than the loop takes chunks, or sends chunks nobody asked
for, holds memory bounded.

Used for plain TCP and Unix bulk lanes; a TLS lane stays on asyncio (an SSL session's
records are decrypted in Python's ssl module). The urgent lane stays on the loop too:
its answers are small, and a hop through another thread would add a wake-up to every
demand fault. Garbage, EOF or an error ends the connection and fails what it carried,
as on the asyncio path.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from uffdd.core.errors import PageServerDataError, PageServerError, PageServerUnavailable
from uffdd.native._ffi import ffi, lib
from uffdd.wire import fast_lane as wire

_EMPTY = memoryview(b"")
MAX_QUEUED_BYTES = 64 * 1024 * 1024
QUEUED_FRAMES = 1024  # frames waiting for the loop, at most (zero chunks have no body)
TAKE_FRAMES = 256  # frames handed on per loop turn, at most
TURN_BYTES = 256 * 1024  # and no more once they hold this much (the first always goes)

ChunkSink = Callable[[wire.ResponseHeader, memoryview], None]
LossSink = Callable[["ThreadedConnection", PageServerError], None]


class ThreadedConnection:
    """One bulk fast-lane socket: frames out from the loop, chunks in from a pthread.

    ``sock`` is connected and blocking, and becomes this object's. ``on_chunk`` and
    ``on_lost`` run on the loop; ``on_lost`` at most once, after every chunk that came
    before the end, and never after ``close()``.
    """

    _handle: Any = None  # until started (a refused __init__ leaves nothing to stop)

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        target: str,
        on_chunk: ChunkSink,
        on_lost: LossSink,
        max_chunk_bytes: int,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        handle = lib.uffdd_receiver_new(
            sock.fileno(), QUEUED_FRAMES, max_queued_bytes, max_chunk_bytes
        )
        if handle == ffi.NULL:
            err = ffi.errno
            sock.close()
            raise OSError(err, f"cannot start the bulk lane's receiver: {os.strerror(err)}")
        self._handle = handle
        self._sock = sock
        self._loop = loop
        self._target = target
        self._on_chunk = on_chunk
        self._on_lost = on_lost
        self._max_chunk_bytes = max_chunk_bytes
        self._closed = False
        self._frames = ffi.new("struct uffdd_frame[]", TAKE_FRAMES)
        self._efd = lib.uffdd_receiver_efd(handle)
        loop.add_reader(self._efd, self._take)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Received body bytes the loop has not taken yet."""
        return 0 if self._handle is None else int(lib.uffdd_receiver_queued(self._handle))

    # -- frames out --------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Hand a request frame to the lane's writer thread (copied; sent in order)."""
        if self._closed:
            return
        if lib.uffdd_receiver_send(self._handle, frame, len(frame)) < 0:
            self._lost(PageServerUnavailable(f"{self._describe()}: out of memory for a frame"))

    @property
    def unsent_bytes(self) -> int:
        """Request frame bytes handed to the thread and not written yet."""
        return 0 if self._handle is None else int(lib.uffdd_receiver_unsent(self._handle))

    # -- chunks in ---------------------------------------------------------------------

    def _take(self) -> None:
        """The chunks received, at most TURN_BYTES of them (one data chunk at least) per
        loop turn, as a socket read on the loop would hand them on: a burst the thread
        received while the loop was busy must not run as one long turn ahead of a fault
        or an urgent answer that became ready meanwhile, while a run of zero chunks
        (headers only) still goes in one turn. The eventfd stays readable while more
        wait."""
        if self._closed:
            return
        taken = lib.uffdd_receiver_take(self._handle, self._frames, TAKE_FRAMES, TURN_BYTES)
        if not taken:
            status = lib.uffdd_receiver_status(self._handle)
            if status != lib.UFFDD_RECV_RUNNING:
                self._lost(self._ended(status))
            return
        chunks = []
        for index in range(taken):  # every body owned by Python first: freed even if
            frame = self._frames[index]  # a callback closes the lane half way
            body = _EMPTY
            if frame.body_len:
                owned = ffi.gc(frame.body, lib.uffdd_free, size=frame.body_len)
                body = memoryview(ffi.buffer(owned, frame.body_len)).toreadonly()
            header: wire.ResponseHeader = (
                frame.request_id,
                frame.address,
                frame.length,
                frame.flags,
                frame.code,
                frame.message_length,
                frame.checksum,
            )
            chunks.append((header, body))
        for header, body in chunks:
            if self.closed:  # a callback ended the lane
                return
            self._on_chunk(header, body)

    def _ended(self, status: int) -> PageServerError:
        if status == lib.UFFDD_RECV_GARBAGE:
            return PageServerDataError(
                f"page server {self._target} sent garbage on the fast lane (a header with "
                f"unknown flags or a body over {self._max_chunk_bytes} bytes)"
            )
        reason = {
            lib.UFFDD_RECV_EOF: "closed by the server",
            lib.UFFDD_RECV_MIDFRAME: "closed in the middle of a chunk",
            lib.UFFDD_RECV_NOMEM: "out of memory for a chunk",
        }.get(status) or os.strerror(status)
        return PageServerUnavailable(f"{self._describe()} lost: {reason}")

    # -- the end -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop both directions, join the thread, close the socket."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        handle, self._handle = self._handle, None
        lib.uffdd_receiver_free(handle)  # shuts the socket down, which wakes a recv
        self._sock.close()

    def __del__(self) -> None:
        # Dropped unclosed (its loop is gone, or its reader would keep it alive): the
        # thread must not outlive the socket it reads.
        if self._handle is not None:
            lib.uffdd_receiver_free(self._handle)
            self._handle = None

    def _lost(self, error: PageServerError) -> None:
        if self._closed:
            return
        self.close()
        self._on_lost(self, error)

    def _describe(self) -> str:
        return f"page server {self._target}: bulk fast lane"


async def connect(address: str, loop: asyncio.AbstractEventLoop) -> socket.socket:
    """A connected, blocking socket to a plain fast lane (TCP or ``unix:``)."""
    where: str | tuple[Any, ...]
    path = wire.unix_path(address)
    if path is not None:
        family, where = socket.AF_UNIX, path
    else:
        host, port = wire.tcp_host_port(address)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, where = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, where)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return sock
