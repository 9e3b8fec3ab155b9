"""Where a restore's page data comes from: a page server, or an image on local disk.

Why one interface: the executor asks for image ranges and installs what arrives, and
should not care whether the bytes crossed a network (``PageClient``, the usual case) or
come from an image in this host's filesystem (a CRIU images directory read in place,
a Firecracker snapshot file next to the VMM). Both deliver ``Chunk``s in address order
through callbacks on the event loop, and end every request exactly once.

A local image can offer more: :meth:`LocalImageSource.local_data` exposes its mmap,
extents and per-chunk verification state so the executor's C fast path can answer
faults without a fetch, and starts verifying every chunk in the background (a chunk is
served in C only once its checksum matched). It is an optional capability, found with
:func:`local_data_of`; a page server has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from uffdd.client.demand_lane import DemandLane
from uffdd.client.request import Chunk, ChunkCallback, DoneCallback
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError, PageServerDataError, PageServerError, PageServerNotFound
from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageRangeError, ImageReader

LOCAL_CHUNK = 4 << 20
"""Largest chunk a local source hands on at once (keeps one install's work bounded)."""
VERIFY_STEP = 4 << 20
"""Bytes the background verification checks per loop turn (xxh3: about half a millisecond)."""
_verify_started: weakref.WeakSet[ImageReader] = weakref.WeakSet()
"""Readers whose background verification ran or runs (once per reader: readers are
shared between restores, and a corrupt chunk stays unverified for good)."""


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


@dataclass(frozen=True, slots=True)
class LocalData:
    """An image's data in place, for serving faults without a fetch.

    ``data`` is the whole data file (unverified); ``extents`` the DATA extents as
    (image address, length, offset in ``data``), in address order; ``verified`` one byte
    per ``chunk_size`` chunk of ``data``, set (live) once the chunk's checksum matched.
    """

    image_id: str
    data: memoryview
    extents: tuple[tuple[int, int, int], ...]
    verified: bytearray
    chunk_size: int


def offered(source: object, method: str) -> object:
    """What ``source.method()`` returns, or None when it has no such method.

    A wrapper source (timing, logging) that keeps the wrapped one in ``inner`` is looked
    through: the C paths that ask (local data, the demand lane) bypass nothing a wrapper
    observes but the faults they answer themselves.
    """
    for _ in range(8):  # wrappers of wrappers, never a cycle's worth
        offer = getattr(source, method, None)
        if callable(offer):
            return offer()
        source = getattr(source, "inner", None)
        if source is None:
            break
    return None


def local_data_of(source: object) -> LocalData | None:
    """The local data behind ``source``, or None (a page server)."""
    data = offered(source, "local_data")
    return data if isinstance(data, LocalData) else None


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

    def local_data(self) -> LocalData:
        """The image in place for the fast path; starts the background verification
        (when called on a running loop)."""
        reader = self.reader
        extents = tuple((e.start, e.length, e.data_offset) for e in reader.data_extents())
        with contextlib.suppress(RuntimeError):  # no running loop: serve what is verified
            self.verify_in_background(asyncio.get_running_loop())
        return LocalData(
            reader.image_id, reader.data_buffer(), extents, reader.verified, reader.chunk_size
        )

    def verify_in_background(self, loop: asyncio.AbstractEventLoop) -> None:
        """Verify every chunk of the image, ``VERIFY_STEP`` bytes per loop turn (once
        per reader). A corrupt chunk stays unverified: only the slow path serves it, and
        that reports the corruption (the process is killed, never fed bad data)."""
        if self.reader in _verify_started or 0 not in self.reader.verified:
            return
        _verify_started.add(self.reader)
        step = max(VERIFY_STEP // self.reader.chunk_size, 1)

        def verify(first: int) -> None:
            reader = self.reader
            try:
                following = reader.verify_chunks(first, step)
            except (OSError, ValueError):  # closed under us
                following = reader.chunk_count
            if following < reader.chunk_count:
                loop.call_soon(verify, following)

        loop.call_soon(verify, 0)

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


def demand_lane_of(source: object) -> DemandLane | None:
    """The connected demand lane behind ``source`` (a page client, through wrappers),
    or None: the source is local, has none, or is still connecting it."""
    lane = offered(source, "demand_lane")
    return lane if isinstance(lane, DemandLane) else None
