"""Urgent fast-lane requests answered by a pthread: the page server's side of the answerer.

Why: the page server's event loop spent tens of microseconds of Python on each urgent
request, and its wake-up on top; a demand fault waits for both, and during a restore
they took CPU the sweep needed. The thread ``uffdd-urgent`` (``native/answerer.py``, C in
``csrc/answerer.c``) answers a plain urgent connection from its first request on, from
the images' mmaps, with the chunks the loop would send.

This side decides what the thread may serve and takes back what it will not:

* every image the catalog opens is registered with its extents, its checksums and the
  reader's ``verified`` bytes (shared, so a chunk is hashed once whichever side serves
  it); the answerer keeps the buffers referenced until the thread is gone. An image
  whose format stores no checksums (a CRIU pages file) is not registered;
* a connection the thread declines (an unknown image, a request to refuse, corrupt
  data, a bulk frame, garbage) comes back with its unparsed bytes and is served by the
  loop's ``Connection``, so every refusal keeps its one implementation; one that came
  back only because its image was not registered yet goes to the thread again once it
  is.

docs/architecture.md: the thread (section 4), the hand-back rules (section 6.4).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.log import get_logger
from uffdd.native import answerer
from uffdd.native.answerer import Answerer, AnswererStats, Extent
from uffdd.pageserver.catalog import ImageCatalog
from uffdd.wire import fast_lane as wire

MAX_CONNECTIONS = 1024
"""Connections the thread answers at most (more stay on the loop)."""
MAX_INITIAL_BYTES = 256 * 1024
"""A connection whose first read held more stays on the loop (asyncio reads at most
this much at once)."""

_log = get_logger("uffdd.pageserver.urgent")

HandBack = Callable[[socket.socket, bytes, str | None], None]
"""Serve this connection on the loop, these bytes first; the third argument names the
image it came back for not being registered yet (it may return once it is)."""


class UrgentAnswerer:
    """The thread, the images it may serve, and the connections it gives back; made
    on the running event loop, which takes those connections."""

    def __init__(
        self,
        catalog: ImageCatalog,
        *,
        chunk_size: int,
        hand_back: HandBack,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._answerer: Answerer | None = Answerer(
            chunk_size=chunk_size,
            max_length=catalog.max_request_length,
            max_connections=max_connections,
        )
        self._hand_back = hand_back
        self._images: set[str] = set()
        self._readers: list[ImageReader] = []
        self._next_token = 1
        self._efd = self._answerer.fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._efd, self._take)
        catalog.watch(self.register)

    def register(self, reader: ImageReader) -> None:
        """Let the thread serve ``reader``'s image (once; not without checksums)."""
        if self._answerer is None or reader.image_id in self._images:
            return
        checksums = reader.chunk_checksums
        chunk = reader.chunk_size
        if reader.closed or len(checksums) != -(-reader.data_size // chunk):
            _log.debug("urgent answerer: image left to the loop", image_id=reader.image_id)
            return
        extents = []
        regions = iter(reader.regions)
        region = next(regions, None)
        for extent in reader.all_extents():
            while region is not None and extent.start >= region.end:
                region = next(regions, None)
            page_size = region.page_size if region is not None else reader.page_size
            zero = extent.kind is ExtentKind.ZERO
            extents.append(Extent(extent.start, extent.end, extent.data_offset, page_size, zero))
        err = self._answerer.add_image(
            reader.image_id.encode(),
            page_size=reader.page_size,
            chunk_size=chunk,
            data=reader.data_buffer(),
            data_size=reader.data_size,
            verified=reader.verified,
            checksums=checksums,
            data_fd=reader.data_fileno(),
            extents=extents,
        )
        if err:
            _log.warning(
                "urgent answerer: image left to the loop",
                image_id=reader.image_id,
                error=os.strerror(err),
            )
            return
        self._images.add(reader.image_id)
        self._readers.append(reader)  # its mmap and file stay open while the thread runs

    def knows(self, image_id: str) -> bool:
        """Whether the thread serves ``image_id``."""
        return image_id in self._images

    def take(self, fd: int, initial: bytes) -> bool:
        """Answer the connection on ``fd`` (a copy of it: the caller closes its own);
        ``initial``: what was read of it already. False: the caller keeps serving it."""
        if self._answerer is None or len(initial) > MAX_INITIAL_BYTES:
            return False
        copy = os.dup(fd)
        token = self._next_token
        self._next_token += 1
        if self._answerer.add(copy, token, initial):
            os.close(copy)
            return False
        return True

    def _take(self) -> None:
        if self._answerer is None:
            return
        for back in self._answerer.take():
            unknown = _first_image_id(back.initial) if back.reason == answerer.UNKNOWN else None
            _log.debug(
                "urgent answerer: connection back to the loop",
                reason="full" if back.reason == answerer.FULL else "declined",
                unknown_image=unknown,
            )
            sock = socket.socket(fileno=back.fd)
            try:
                self._hand_back(sock, back.initial, unknown)
            except OSError as exc:
                _log.warning("urgent answerer: could not hand a connection back", error=str(exc))
                sock.close()

    @property
    def connections(self) -> int:
        """Connections the thread holds now."""
        return 0 if self._answerer is None else self.stats.live

    @property
    def stats(self) -> AnswererStats:
        """The thread's counters and state (ValueError once closed)."""
        if self._answerer is None:
            raise ValueError("the urgent answerer is closed")
        return self._answerer.stats()

    def drain(self) -> int:
        """Answer what was accepted, read nothing new, close each connection when done;
        returns how many are still open (call again until 0, or close)."""
        if self._answerer is None:
            return 0
        return self._answerer.drain()

    def close(self) -> None:
        """Stop the thread and close what it still held."""
        if self._answerer is None:
            return
        self._take()  # connections given back before the end are still served
        self._loop.remove_reader(self._efd)
        running, self._answerer = self._answerer, None
        running.close()
        self._images.clear()
        self._readers.clear()


def _first_image_id(frames: bytes) -> str | None:
    """The image id of the request frame at the start of ``frames``."""
    if len(frames) < wire.REQUEST.size:
        return None
    id_length = wire.REQUEST.unpack_from(frames)[4]
    return frames[wire.REQUEST.size : wire.REQUEST.size + id_length].decode("utf-8", "replace")
