"""Proto <-> Python conversions for the page service, in one place.

Why: the server builds messages from an ``ImageReader`` and the client turns them back
into typed values (``ImageAddr``, ``ExtentKind``, ``Region``); keeping both directions
here means a field added to pages.proto is handled once, and both sides agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import (
    PageServerDataError,
    PageServerError,
    PageServerNotFound,
    PageServerUnavailable,
)
from uffdd.image.format import ExtentKind, Region
from uffdd.image.reader import ImageReader
from uffdd.v1 import pages_pb2


def priority_to_proto(priority: Priority) -> pages_pb2.Priority.ValueType:
    """The wire's number for ``priority``: the core's numbers are ``pages.proto``'s."""
    return pages_pb2.Priority.ValueType(priority.value)


@dataclass(frozen=True, slots=True)
class RemoteExtent:
    """A run of pages of one kind (DATA or ZERO), as the page server reports it."""

    start: ImageAddr
    length: int
    kind: ExtentKind


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image's layout as the daemon needs it: zero runs need no round trip."""

    image_id: str
    page_size: int
    regions: tuple[Region, ...]
    extents: tuple[RemoteExtent, ...]
    total_bytes: int
    data_bytes: int
    zero_bytes: int
    checksum_algorithm: str


_KIND_TO_PROTO = {
    ExtentKind.DATA: pages_pb2.EXTENT_KIND_DATA,
    ExtentKind.ZERO: pages_pb2.EXTENT_KIND_ZERO,
}
_KIND_FROM_PROTO = {value: key for key, value in _KIND_TO_PROTO.items()}


def image_info_to_proto(image: ImageReader) -> pages_pb2.ImageInfo:
    """Describe an open image: its regions and every DATA/ZERO extent inside them."""
    info = pages_pb2.ImageInfo(
        image_id=image.image_id,
        page_size=image.page_size,
        total_bytes=image.total_bytes,
        data_bytes=image.data_bytes,
        zero_bytes=image.zero_bytes,
        checksum_algorithm=image.checksum_algorithm,
    )
    for region in image.regions:
        info.regions.append(
            pages_pb2.Region(
                image_address=region.start,
                length=region.length,
                page_size=region.page_size,
                name=region.name,
            )
        )
        for extent in image.extents(region.start, region.length):
            info.extents.append(
                pages_pb2.Extent(
                    image_address=extent.start,
                    length=extent.length,
                    kind=_KIND_TO_PROTO[extent.kind],
                )
            )
    return info


def image_info_from_proto(info: pages_pb2.ImageInfo) -> ImageInfo:
    """The client's typed view of an ImageInfo message."""
    try:
        extents = tuple(
            RemoteExtent(ImageAddr(e.image_address), e.length, _KIND_FROM_PROTO[e.kind])
            for e in info.extents
        )
    except KeyError as exc:
        raise PageServerDataError(f"image {info.image_id!r}: unknown extent kind") from exc
    return ImageInfo(
        image_id=info.image_id,
        page_size=info.page_size,
        regions=tuple(
            Region(ImageAddr(r.image_address), r.length, r.page_size, r.name) for r in info.regions
        ),
        extents=extents,
        total_bytes=info.total_bytes,
        data_bytes=info.data_bytes,
        zero_bytes=info.zero_bytes,
        checksum_algorithm=info.checksum_algorithm,
    )


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a number carried in-band (UNKNOWN if unknown)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_for_status(code: grpc.StatusCode, message: str) -> PageServerError:
    """The uffdd exception for a failed page-server request (unary or in-band).

    The status code's name leads the message so a log line says what the server said.
    """
    text = f"{code.name}: {message}"
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
        return PageServerNotFound(text)
    if code == grpc.StatusCode.DATA_LOSS:
        return PageServerDataError(text)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return PageServerUnavailable(text)
    return PageServerError(text)
