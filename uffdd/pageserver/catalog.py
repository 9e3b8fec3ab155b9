"""The images a page server serves, and the checks every request goes through.

Why separate from the gRPC code: the rules (which image, which range, which
alignment, how long) are the same for the unary Read and for every request on a
Stream; here they raise one ``RequestError`` carrying the gRPC status code, and each
caller decides how to deliver it (abort a unary call, or an in-band error chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.format import Extent, ImageNotFound
from uffdd.image.reader import ImageRangeError, ImageReader
from uffdd.image.store import ImageStore

DEFAULT_MAX_REQUEST_LENGTH = 64 * 1024 * 1024


class RequestError(Exception):
    """A request the server must refuse, with the gRPC status code to refuse it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ResolvedRange:
    """A validated request: the open image and the extents covering the range."""

    image: ImageReader
    extents: list[Extent]


class _Images(Protocol):
    def list(self) -> list[str]: ...
    def open(self, image_id: str) -> ImageReader: ...
    def close(self) -> None: ...


class ImageCatalog:
    """Every image under one directory, opened on first use and kept open (immutable;
    the store caches the readers). A CRIU images directory (it holds ``pstree.img``)
    is served as one image ``criu-<pid>`` per task."""

    def __init__(self, root: Path, *, max_request_length: int = DEFAULT_MAX_REQUEST_LENGTH):
        self.root = root
        self.max_request_length = max_request_length
        self._opened: dict[str, ImageReader] = {}
        self._watchers: list[Callable[[ImageReader], None]] = []
        self._store: _Images
        if (root / "pstree.img").is_file():
            from uffdd.image.criu.catalog import CriuImages  # noqa: PLC0415 - only for CRIU dirs

            self._store = CriuImages(root)
        else:
            self._store = ImageStore(root)

    def list(self) -> list[str]:
        return self._store.list()

    def image(self, image_id: str) -> ImageReader:
        """The open image; RequestError(NOT_FOUND) if the store does not hold it."""
        try:
            reader = self._store.open(image_id)
        except ImageNotFound as exc:  # includes ids that cannot name an image ("../x")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no image {image_id!r}") from exc
        except ImageError as exc:
            raise RequestError(grpc.StatusCode.DATA_LOSS, f"image {image_id!r}: {exc}") from exc
        if self._opened.get(image_id) is not reader:
            self._opened[image_id] = reader
            for watcher in self._watchers:
                watcher(reader)
        return reader

    def watch(self, opened: Callable[[ImageReader], None]) -> None:
        """Call ``opened`` with every image this catalog has opened, and from now on
        with each one it opens (the fast lane's C answerer serves only those it knows)."""
        self._watchers.append(opened)
        for reader in list(self._opened.values()):
            opened(reader)

    def resolve(self, image_id: str, address: int, length: int) -> ResolvedRange:
        """Check a request for [address, address + length) of ``image_id``."""
        if length <= 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "length must be positive")
        if length > self.max_request_length:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"length {length} exceeds the limit of {self.max_request_length} bytes",
            )
        image = self.image(image_id)
        page_size = image.page_size
        if address % page_size or length % page_size:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"[{address:#x}, +{length:#x}) is not aligned to the page size {page_size}",
            )
        try:
            extents = image.extents(ImageAddr(address), length)
        except ImageRangeError as exc:
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"[{address:#x}, +{length:#x}) is outside image {image_id!r}: {exc}",
            ) from exc
        for region in image.regions:
            inside = region.start <= address < region.start + region.length
            if inside and (address % region.page_size or length % region.page_size):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"[{address:#x}, +{length:#x}) is not aligned to the page size "
                    f"{region.page_size} of region {region.name or hex(region.start)}",
                )
        return ResolvedRange(image, extents)

    def close(self) -> None:
        self._watchers.clear()
        self._opened.clear()
        self._store.close()
