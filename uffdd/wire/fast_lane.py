"""The fast lane's frames (pages.proto, "Fast lane"), shared by its server and client.

Why fixed binary headers: a demand fault's round trip is the whole point of the fast
lane, and the bulk transfer's cost per chunk is what bounds residency, so a frame is
one ``struct`` call to build and one to parse; no varints, no HTTP/2, no per-message
objects beyond the header tuple.
"""

from __future__ import annotations

import struct

# A request frame's magic says what it asks ("uffdd fast lane", protocol version 1):
MAGIC = b"UFL1"  # an urgent fetch (a demand fault)
BULK_MAGIC = b"UFB1"  # a bulk fetch (the background transfer)
CANCEL_MAGIC = b"UFC1"  # stop answering request_id (address, length, image id unused)
KNOWN_MAGICS = frozenset({MAGIC, BULK_MAGIC, CANCEL_MAGIC})
# magic, request_id, image_address, length, image_id length; then the image id
REQUEST = struct.Struct("<4sQQIH")
# request_id, image_address, length, flags, error code, message length, checksum
RESPONSE = struct.Struct("<QQIBBHQ")
ResponseHeader = tuple[int, int, int, int, int, int, int]
"""A RESPONSE header as ``RESPONSE.unpack`` gives it, in that order."""

FLAG_ZERO = 1
FLAG_LAST = 2
FLAG_ERROR = 4
KNOWN_FLAGS = FLAG_ZERO | FLAG_LAST | FLAG_ERROR

MAX_IMAGE_ID_BYTES = 1024
MAX_REQUEST_LENGTH = 0xFFFF_FFFF  # the u32 field; the server's own limit is lower
MAX_MESSAGE_BYTES = 0xFFFF

# Unix socket of the fast lane next to a gRPC listener "unix:PATH": "unix:PATH.urgent"
UNIX_SUFFIX = ".urgent"


def encode_request(
    request_id: int, image_id: bytes, address: int, length: int, *, bulk: bool = False
) -> bytes:
    magic = BULK_MAGIC if bulk else MAGIC
    return REQUEST.pack(magic, request_id, address, length, len(image_id)) + image_id


def encode_cancel(request_id: int) -> bytes:
    return REQUEST.pack(CANCEL_MAGIC, request_id, 0, 0, 0)


def encode_zero(request_id: int, address: int, length: int, last: bool) -> bytes:
    flags = FLAG_ZERO | (FLAG_LAST if last else 0)
    return RESPONSE.pack(request_id, address, length, flags, 0, 0, 0)


def encode_data_header(
    request_id: int, address: int, length: int, checksum: int, last: bool
) -> bytes:
    """The header of a data chunk; its ``length`` bytes of data follow."""
    return RESPONSE.pack(request_id, address, length, FLAG_LAST if last else 0, 0, 0, checksum)


def encode_error(request_id: int, address: int, code: int, message: str) -> bytes:
    """The final chunk of a failed request: header and UTF-8 message."""
    text = message.encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]
    header = RESPONSE.pack(
        request_id, address, 0, FLAG_ERROR | FLAG_LAST, code & 0xFF, len(text), 0
    )
    return header + text


def body_length(length: int, flags: int, message_length: int) -> int:
    """How many bytes follow a response header."""
    if flags & FLAG_ERROR:
        return message_length
    if flags & FLAG_ZERO:
        return 0
    return length


def unix_path(address: str) -> str | None:
    """The file system path of a gRPC-style ``unix:`` address, else None."""
    if address.startswith("unix://"):
        return address.removeprefix("unix://")
    if address.startswith("unix:"):
        return address.removeprefix("unix:")
    return None


def tcp_host(address: str) -> str:
    """The host of ``host:port`` (brackets of an IPv6 literal removed; may be '')."""
    host = address.removeprefix("dns:///").rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def tcp_host_port(address: str) -> tuple[str, int]:
    """The host (as ``tcp_host`` gives it) and the port of ``host:port``, to connect."""
    return tcp_host(address), int(address.rpartition(":")[2])
