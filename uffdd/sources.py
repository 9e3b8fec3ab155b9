"""Where a restore's page data comes from: a page server, or an image on local disk.

Why one interface: the executor asks for image ranges and installs what arrives, and
should not care whether the bytes crossed a network (``PageClient``, the usual case) or
come from an image in this host's filesystem (a CRIU images directory read in place,
a Firecracker snapshot file next to the VMM). Both deliver ``Chunk``s in address order
through callbacks on the event loop, and end every request exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from uffdd.core.addresses import ImageAddr
from uffdd.errors import ImageError, PageServerDataError, PageServerError, PageServerNotFound
from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageRangeError, ImageReader
from uffdd.remote.client import Chunk, ChunkCallback, DoneCallback
from uffdd.remote.convert import Priority

LOCAL_CHUNK = 4 << 20
"""Largest chunk a local source hands on at once (keeps one install's work bounded)."""


class FetchHandle(Protocol):
    """A submitted request; ``cancel()`` stops its callbacks."""

    def cancel(self) -> None: ...


class PageSource(Protocol):
    """Delivers image ranges; ``PageClient`` is one, ``LocalImageSource`` another."""

    def submit(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        *,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        deadline: float | None = None,
    ) -> FetchHandle:
        """Fetch ``[address, +length)``; ``deadline``: seconds from now before the
        request fails with PageServerUnavailable (None: the source's default)."""
        ...


class _LocalFetch:
    def __init__(self) -> None:
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        # A method, not an attribute: callbacks may cancel between two checks.
        return self._cancelled


class LocalImageSource:
    """Serves one local image in place: chunks are views of its mmap (no copy)."""

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader

    def submit(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        *,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        deadline: float | None = None,  # a local read never waits on anyone
    ) -> FetchHandle:
        handle = _LocalFetch()
        # Deliver on the next loop iteration, as a network source would: the caller
        # finishes the step that submitted before any data comes back.
        asyncio.get_running_loop().call_soon(
            self._deliver, image_id, address, length, handle, on_chunk, on_done
        )
        return handle

    def _deliver(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        handle: _LocalFetch,
        on_chunk: Callable[[Chunk], None],
        on_done: DoneCallback,
    ) -> None:
        if handle.cancelled():
            return
        error: PageServerError | None = None
        try:
            if image_id != self.reader.image_id:
                raise PageServerNotFound(f"image {image_id!r} is not {self.reader.image_id!r}")
            for extent in self.reader.extents(address, length):
                if extent.kind is ExtentKind.ZERO:
                    on_chunk(Chunk(extent.start, extent.length, None))
                    continue
                data = self.reader.data(extent)
                for offset in range(0, extent.length, LOCAL_CHUNK):
                    if handle.cancelled():
                        return
                    piece = data[offset : offset + LOCAL_CHUNK]
                    on_chunk(Chunk(ImageAddr(extent.start + offset), len(piece), piece))
        except ImageRangeError as exc:
            error = PageServerNotFound(str(exc))
        except ImageError as exc:
            error = PageServerDataError(str(exc))
        except PageServerError as exc:
            error = exc
        if not handle.cancelled():
            on_done(error)
