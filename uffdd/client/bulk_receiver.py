"""The bulk fast lane's connection, received and sent by threads of their own.

Why: during a sweep the daemon's one event loop also answers every demand fault, and
receiving bulk data was its largest single cost (``recv`` of the large bodies). The
receiver thread (``native/receiver.py``, C in ``csrc/receiver.c``) reads the frames
instead, without the GIL, and queues them; the loop takes whole chunks, one data chunk
per turn (or a run of small ones), when the receiver's eventfd is readable. The thread
never touches Python: a Python thread's GIL hand-backs (three per chunk) would cost
every demand fault a wake-up of the loop.

The loop keeps every decision (which request, which pages, the checksum check in
``Request.deliver``), and hands its request frames to the writer thread: a TCP socket's
lock is held by a recv while it copies, and a send from the loop slept on that lock, in
front of whatever fault came next.

At most ``max_queued_bytes`` (plus one chunk) wait for the loop; then the reader stops,
so a server that sends faster than the loop takes chunks, or sends chunks nobody asked
for, holds memory bounded.

Used for plain TCP and Unix bulk lanes; a TLS lane stays on asyncio (an SSL session's
records are decrypted in Python's ssl module). The urgent lane stays on the loop too:
its answers are small, and a hop through another thread would add a wake-up to every
demand fault. Garbage, EOF or an error ends the connection and fails what it carried,
as on the asyncio path. docs/architecture.md has the threads and their bounds (section
4) and the way of a background chunk (section 6.3).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from uffdd.core.errors import PageServerDataError, PageServerError, PageServerUnavailable
from uffdd.native import receiver
from uffdd.native.receiver import Receiver, ReceiverStats
from uffdd.wire import fast_lane as wire

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
        try:
            self._receiver = Receiver(
                sock.fileno(),
                queued_frames=QUEUED_FRAMES,
                max_queued_bytes=max_queued_bytes,
                max_body=max_chunk_bytes,
            )
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop = loop
        self._target = target
        self._on_chunk = on_chunk
        self._on_lost = on_lost
        self._max_chunk_bytes = max_chunk_bytes
        self._closed = False
        loop.add_reader(self._receiver.fd, self._take)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> ReceiverStats:
        """The receiver and writer threads' counters and state (ValueError once closed)."""
        return self._receiver.stats()

    # -- frames out --------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Hand a request frame to the lane's writer thread (copied; sent in order)."""
        if self._closed:
            return
        if not self._receiver.send(frame):
            self._lost(PageServerUnavailable(f"{self._describe()}: out of memory for a frame"))

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
        chunks = self._receiver.take(TAKE_FRAMES, TURN_BYTES)
        if not chunks:
            status = self._receiver.status()
            if status != receiver.RUNNING:
                self._lost(self._ended(status))
            return
        for header, body in chunks:
            if self.closed:  # a callback ended the lane
                return
            self._on_chunk(header, body)

    def _ended(self, status: int) -> PageServerError:
        if status == receiver.GARBAGE:
            return PageServerDataError(
                f"page server {self._target} sent garbage on the fast lane (a header with "
                f"unknown flags or a body over {self._max_chunk_bytes} bytes)"
            )
        reason = {
            receiver.EOF: "closed by the server",
            receiver.MIDFRAME: "closed in the middle of a chunk",
            receiver.NOMEM: "out of memory for a chunk",
        }.get(status) or os.strerror(status)
        return PageServerUnavailable(f"{self._describe()} lost: {reason}")

    # -- the end -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop both directions, join the thread, close the socket."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._receiver.fd)
        self._receiver.close()  # shuts the socket down, which wakes a recv
        self._sock.close()

    def __del__(self) -> None:
        # Dropped unclosed (its loop is gone, or its reader would keep it alive): the
        # threads must not outlive the socket they read.
        receiver = getattr(self, "_receiver", None)
        if receiver is not None:
            receiver.close()

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
