"""The snapshot image format: the typed vocabulary and the on-disk framing, in one place.

Why one module: the writer, the reader, the store and the page server must agree on
every constant (file names, magic, version, checksum function, chunk size) and on the
value types (``Region``, ``Extent``); a second definition anywhere would be a format
fork. The layout itself is described in ``proto/uffdd/v1/image.proto``.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import xxhash

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.v1 import image_pb2

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.pb"
DATA_NAME = "pages.bin"
MANIFEST_MAGIC = b"UFFDDIMG"
_MANIFEST_HEADER = struct.Struct("<8sQQ")  # magic, body length, xxh3-64 of the body
MANIFEST_HEADER_SIZE = _MANIFEST_HEADER.size

CHECKSUM_ALGORITHM = "xxh3-64"
DEFAULT_CHUNK_SIZE = 64 * 1024
"""Bytes of the data file per stored checksum.

64 KiB: the reader verifies a chunk the first time any page of it is served, so a
demand fault for one 4 KiB page pays for hashing at most one chunk (~3 us at xxh3
speed) rather than a megabyte; and it costs the manifest 8 bytes per 64 KiB of data
(0.012 %: 1 MiB of checksums per 8 GiB stored). A corruption report names a 64 KiB
range, which is precise enough to find the damaged pages.
"""

TEMP_PREFIX = ".tmp-"
"""Writers build images in ``<root>/.tmp-<id>-<random>``; no image id starts with '.'."""

_IMAGE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+:@-]{0,199}")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The one checksum of uffdd: xxh3-64 of ``data`` (image chunks and wire chunks)."""
    return xxhash.xxh3_64_intdigest(data)


class ExtentKind(enum.Enum):
    """Whether a run of pages is stored (DATA) or reads as zeros (ZERO, not stored)."""

    DATA = image_pb2.IMAGE_EXTENT_KIND_DATA
    ZERO = image_pb2.IMAGE_EXTENT_KIND_ZERO


@dataclass(frozen=True, slots=True)
class Region:
    """A range of image addresses the image describes, e.g. one mapping of a process."""

    start: ImageAddr
    length: int
    page_size: int
    name: str

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of pages of one kind; ``data_offset`` is where DATA lives in the data file."""

    start: ImageAddr
    length: int
    kind: ExtentKind
    data_offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class ImageSource:
    """Where an image's memory came from (informational; never used to serve pages)."""

    kind: str = ""
    pid: int = 0
    cmdline: tuple[str, ...] = ()
    host: str = ""
    path: str = ""


class ImageNotFound(ImageError):
    """No image with this id exists (or can exist) in the store."""


class InvalidImageId(ImageNotFound):
    """An image id that cannot name an image (empty, '..', a '/', a leading '.', ...)."""


def validate_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is a safe directory name, else raise InvalidImageId.

    Allowed: 1-200 characters of ``A-Z a-z 0-9 _ . + : @ -``, not starting with '.' or
    '-' (so no '..', no hidden or temp directories, no option look-alikes, no '/').
    """
    if not isinstance(image_id, str) or _IMAGE_ID.fullmatch(image_id) is None:
        raise InvalidImageId(
            f"invalid image id {image_id!r}: use 1-200 of [A-Za-z0-9_.+:@-], "
            "not starting with '.' or '-'"
        )
    return image_id


def encode_manifest(manifest: image_pb2.ImageManifest) -> bytes:
    """The bytes of manifest.pb: header (magic, length, checksum) + serialized body."""
    body = manifest.SerializeToString(deterministic=True)
    return _MANIFEST_HEADER.pack(MANIFEST_MAGIC, len(body), checksum(body)) + body


def decode_manifest(raw: bytes) -> image_pb2.ImageManifest:
    """Parse manifest.pb; ImageError says exactly what is wrong with it."""
    if len(raw) < MANIFEST_HEADER_SIZE:
        raise ImageError(
            f"{MANIFEST_NAME}: truncated: {len(raw)} bytes, "
            f"shorter than its {MANIFEST_HEADER_SIZE}-byte header"
        )
    magic, length, stored = _MANIFEST_HEADER.unpack_from(raw)
    if magic != MANIFEST_MAGIC:
        raise ImageError(f"{MANIFEST_NAME}: bad magic {magic!r} (not a uffdd image manifest)")
    body = raw[MANIFEST_HEADER_SIZE:]
    if len(body) != length:
        raise ImageError(
            f"{MANIFEST_NAME}: body is {len(body)} bytes, the header says {length} "
            f"({'truncated' if len(body) < length else 'trailing garbage'})"
        )
    actual = checksum(body)
    if actual != stored:
        raise ImageError(
            f"{MANIFEST_NAME}: checksum mismatch (stored {stored:#018x}, actual {actual:#018x})"
        )
    manifest = image_pb2.ImageManifest()
    try:
        manifest.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError (and others) on bad input
        raise ImageError(f"{MANIFEST_NAME}: cannot parse the manifest: {exc}") from exc
    return manifest


def source_to_proto(source: ImageSource) -> image_pb2.ImageSource:
    return image_pb2.ImageSource(
        kind=source.kind,
        pid=source.pid,
        cmdline=list(source.cmdline),
        host=source.host,
        path=source.path,
    )


def source_from_proto(source: image_pb2.ImageSource) -> ImageSource:
    return ImageSource(
        kind=source.kind,
        pid=source.pid,
        cmdline=tuple(source.cmdline),
        host=source.host,
        path=source.path,
    )


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class ExtentLike(Protocol):
    """An extent as any room describes it (local ``Extent``, the page service's)."""

    @property
    def start(self) -> ImageAddr: ...
    @property
    def length(self) -> int: ...
    @property
    def kind(self) -> ExtentKind: ...


def stored_ranges(extents: Iterable[ExtentLike]) -> list[tuple[int, int]]:
    """``(image address, length)`` of every DATA extent: what the core's
    ``Tracker.add_process(data=...)`` takes (everything else reads zeros)."""
    return [(int(e.start), e.length) for e in extents if e.kind is ExtentKind.DATA]
