"""A directory of images, named by id: what a page server serves from.

Why a store: image ids arrive from the network, so resolving an id to a directory is a
security boundary (no '..', no '/', no hidden temp directories) and belongs in one
place; and images are immutable, so an opened reader can be cached and shared.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

from uffdd.image.format import (
    MANIFEST_NAME,
    ImageNotFound,
    InvalidImageId,
    validate_image_id,
)
from uffdd.image.reader import ImageReader

__all__ = ["ImageNotFound", "ImageStore", "InvalidImageId"]


class ImageStore:
    """The images under ``root``: ``<root>/<image id>/{manifest.pb,pages.bin}``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._open: dict[str, ImageReader] = {}
        self._lock = threading.Lock()

    def list(self) -> list[str]:
        """Ids of the complete images (temp dirs of unfinished writers are not images)."""
        if not self.root.is_dir():
            return []
        ids: list[str] = []
        for entry in self.root.iterdir():
            try:
                validate_image_id(entry.name)
            except InvalidImageId:
                continue
            if entry.is_dir() and (entry / MANIFEST_NAME).is_file():
                ids.append(entry.name)
        return sorted(ids)

    def path(self, image_id: str) -> Path:
        """The directory of ``image_id`` (validated; it may not exist)."""
        return self.root / validate_image_id(image_id)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str):
            return False
        try:
            return (self.path(image_id) / MANIFEST_NAME).is_file()
        except InvalidImageId:
            return False

    def open(self, image_id: str) -> ImageReader:
        """The open reader for ``image_id`` (cached); ImageNotFound if there is none.

        A broken image raises ImageError (not cached, so a repaired image opens later).
        """
        with self._lock:
            reader = self._open.get(image_id)
            if reader is not None:
                return reader
            directory = self.path(image_id)
            if not (directory / MANIFEST_NAME).is_file():
                raise ImageNotFound(f"no image {image_id!r} in {self.root}")
            reader = ImageReader.open(directory)
            self._open[image_id] = reader
            return reader

    def close(self) -> None:
        """Close every cached reader."""
        with self._lock:
            for reader in self._open.values():
                reader.close()
            self._open.clear()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
