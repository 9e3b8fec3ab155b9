"""Cutting a checked request into chunks: one cursor for the gRPC Stream and the fast lane.

Why shared: both transports must send the same chunks (the core's rule,
``core.policy.chunk_length``: never crossing an extent boundary, DATA cut at the chunk
size, a ZERO extent as one chunk without data) straight from the image's mmap, and
refuse corrupt image data the same way (DATA_LOSS), so a client sees the same answer
whichever transport it used. The urgent C thread (``csrc/answerer.c``) applies the same
rule; a test holds its frames to this cursor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from uffdd.core.errors import ImageError
from uffdd.core.policy import chunk_length
from uffdd.image.format import Extent, ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.log import get_logger
from uffdd.pageserver.catalog import RequestError, ResolvedRange

_log = get_logger("uffdd.pageserver.chunking")


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk to send: ``data`` is a view of the image's mmap, None for zeros."""

    address: int
    length: int
    data: memoryview | None
    last: bool


class RangeCursor:
    """Where the next chunk of a resolved request starts."""

    __slots__ = ("extents", "image", "index", "offset", "view")

    def __init__(self, resolved: ResolvedRange) -> None:
        self.image = resolved.image
        self.extents = resolved.extents
        self.index = 0  # current extent
        self.offset = 0  # bytes of the current extent already sent
        self.view: memoryview | None = None  # the current DATA extent's bytes

    def position(self) -> int:
        """The image address of the next chunk (0 once complete)."""
        if self.index < len(self.extents):
            return self.extents[self.index].start + self.offset
        return 0

    def next_piece(self, chunk_size: int) -> Piece:
        """The next chunk; RequestError(DATA_LOSS) if the image's data is corrupt."""
        extent = self.extents[self.index]
        address = extent.start + self.offset
        zero = extent.kind == ExtentKind.ZERO
        length = chunk_length(extent.length - self.offset, chunk_size, zero=zero)
        data: memoryview | None = None
        if not zero:
            if self.view is None:
                self.view = _checked_data(self.image, extent, address)
            data = self.view[self.offset : self.offset + length]
        self.offset += length
        if self.offset == extent.length:
            self.index += 1
            self.offset = 0
            self.view = None
        return Piece(address, length, data, self.index == len(self.extents))

    def drop(self) -> None:
        """Let go of the mmap view (the request is over)."""
        self.view = None


def _checked_data(image: ImageReader, extent: Extent, address: int) -> memoryview:
    try:
        return extent_data(image, extent)
    except RequestError as exc:
        _log.error(
            "image data corrupt",
            image_id=image.image_id,
            image_address=address,
            reason=exc.message,
        )
        raise


def extent_data(image: ImageReader, extent: Extent) -> memoryview:
    """The stored bytes of a DATA extent, verified by the reader against its checksum."""
    try:
        view = image.data(extent)
    except ImageError as exc:
        raise RequestError(grpc.StatusCode.DATA_LOSS, f"image {image.image_id!r}: {exc}") from exc
    if len(view) != extent.length:
        raise RequestError(
            grpc.StatusCode.DATA_LOSS,
            f"image {image.image_id!r}: extent at {extent.start:#x} holds {len(view)} bytes, "
            f"expected {extent.length}",
        )
    return view


def log_refusal(
    rpc: str, request_id: int, image_id: str, address: int, length: int, exc: RequestError
) -> None:
    """The log line for a refused request, the same for every transport."""
    _log.info(
        "request refused",
        rpc=rpc,
        request_id=request_id,
        image_id=image_id,
        image_address=address,
        length=length,
        code=exc.code.name,
        reason=exc.message,
    )
