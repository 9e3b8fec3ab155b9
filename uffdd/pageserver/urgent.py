"""Urgent fast-lane requests answered by a pthread: the loop's side of ``uffdd_answerer_*``.

Why: the page server's event loop spent ~70 us of Python on each urgent request, and
its wake-up on top; a demand fault waits for both, and during a restore they took CPU
the sweep needed (bench/README.md, session 8). The thread ``uffdd-urgent`` (the C
comment in ``native/build.py`` says how) answers a plain urgent connection from
its first request on, from the images' mmaps, with the chunks the loop would send.

This side decides what the thread may serve and takes back what it will not:

* every image the catalog opens is registered with its extents, its checksums and the
  reader's ``verified`` bytes (shared, so a chunk is hashed once whichever side serves
  it); the buffers stay referenced here until the thread is gone. An image whose format
  stores no checksums (a CRIU pages file) is not registered;
* a connection the thread declines (an unknown image, a request to refuse, corrupt
  data, a bulk frame, garbage) comes back with its unparsed bytes and is served by the
  loop's ``Connection`` from then on, so every refusal keeps its one implementation.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.log import get_logger
from uffdd.native._ffi import ffi, lib
from uffdd.native.checksum import XXH3_64BITS
from uffdd.pageserver.catalog import ImageCatalog
from uffdd.wire import fast_lane as wire

MAX_CONNECTIONS = 1024
"""Connections the thread answers at most (more stay on the loop)."""
MAX_INITIAL_BYTES = 256 * 1024
"""A connection whose first read held more stays on the loop (asyncio reads at most
this much at once)."""
_TAKE = 64

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
        handle = lib.uffdd_answerer_new(
            XXH3_64BITS, chunk_size, catalog.max_request_length, max_connections
        )
        if handle == ffi.NULL:
            errno = ffi.errno
            raise OSError(errno, f"cannot start the urgent answerer: {os.strerror(errno)}")
        self._handle: Any = handle
        self._hand_back = hand_back
        self._kept: dict[str, tuple[Any, ...]] = {}  # buffers the thread reads, by image
        self._next_token = 1
        self._efd: int = lib.uffdd_answerer_efd(handle)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._efd, self._take)
        catalog.watch(self.register)

    def register(self, reader: ImageReader) -> None:
        """Let the thread serve ``reader``'s image (once; not without checksums)."""
        if self._handle is None or reader.image_id in self._kept:
            return
        checksums = reader.chunk_checksums
        chunk = reader.chunk_size
        if reader.closed or len(checksums) != -(-reader.data_size // chunk):
            _log.debug("urgent answerer: image left to the loop", image_id=reader.image_id)
            return
        extents = reader.all_extents()
        table = ffi.new("struct uffdd_ans_extent[]", max(len(extents), 1))
        regions = iter(reader.regions)
        region = next(regions, None)
        for row, extent in zip(table, extents, strict=False):
            while region is not None and extent.start >= region.end:
                region = next(regions, None)
            row.start = extent.start
            row.end = extent.end
            row.data_offset = extent.data_offset
            row.page_size = region.page_size if region is not None else reader.page_size
            row.kind = lib.UFFDD_ANS_ZERO if extent.kind is ExtentKind.ZERO else 0
        image_id = reader.image_id.encode()
        data = ffi.from_buffer("char[]", reader.data_buffer())
        verified = ffi.from_buffer("uint8_t[]", reader.verified, require_writable=True)
        sums = ffi.new("uint64_t[]", checksums) if checksums else ffi.NULL
        err = lib.uffdd_answerer_image(
            self._handle, image_id, len(image_id), reader.page_size, chunk, data,
            reader.data_size, verified, sums, len(checksums), reader.data_fileno(),
            table, len(extents),
        )  # fmt: skip
        if err:
            _log.warning(
                "urgent answerer: image left to the loop",
                image_id=reader.image_id,
                error=os.strerror(err),
            )
            return
        self._kept[reader.image_id] = (reader, data, verified, sums)

    def knows(self, image_id: str) -> bool:
        """Whether the thread serves ``image_id``."""
        return image_id in self._kept

    def take(self, fd: int, initial: bytes) -> bool:
        """Answer the connection on ``fd`` (a copy of it: the caller closes its own);
        ``initial``: what was read of it already. False: the caller keeps serving it."""
        if self._handle is None or len(initial) > MAX_INITIAL_BYTES:
            return False
        copy = os.dup(fd)
        token = self._next_token
        self._next_token += 1
        err = lib.uffdd_answerer_add(self._handle, copy, token, initial, len(initial))
        if err:
            os.close(copy)
            return False
        return True

    def _take(self) -> None:
        out = ffi.new("struct uffdd_handback[]", _TAKE)
        count = lib.uffdd_answerer_take(self._handle, out, _TAKE)
        for back in out[0:count]:
            initial = bytes(ffi.buffer(back.bytes, back.len)) if back.len else b""
            lib.uffdd_free(back.bytes)
            unknown = _first_image_id(initial) if back.reason == lib.UFFDD_HB_UNKNOWN else None
            _log.debug(
                "urgent answerer: connection back to the loop",
                reason="full" if back.reason == lib.UFFDD_HB_FULL else "declined",
                unknown_image=unknown,
            )
            sock = socket.socket(fileno=back.fd)
            try:
                self._hand_back(sock, initial, unknown)
            except OSError as exc:
                _log.warning("urgent answerer: could not hand a connection back", error=str(exc))
                sock.close()

    @property
    def connections(self) -> int:
        """Connections the thread holds now."""
        return 0 if self._handle is None else int(lib.uffdd_answerer_live(self._handle))

    def drain(self) -> int:
        """Answer what was accepted, read nothing new, close each connection when done;
        returns how many are still open (call again until 0, or close)."""
        if self._handle is None:
            return 0
        return int(lib.uffdd_answerer_drain(self._handle))

    def close(self) -> None:
        """Stop the thread and close what it still held."""
        if self._handle is None:
            return
        self._take()  # connections given back before the end are still served
        self._loop.remove_reader(self._efd)
        handle, self._handle = self._handle, None
        lib.uffdd_answerer_free(handle)
        self._kept.clear()


def _first_image_id(frames: bytes) -> str | None:
    """The image id of the request frame at the start of ``frames``."""
    if len(frames) < wire.REQUEST.size:
        return None
    id_length = wire.REQUEST.unpack_from(frames)[4]
    return frames[wire.REQUEST.size : wire.REQUEST.size + id_length].decode("utf-8", "replace")
