"""PageChunk on the wire without protobuf's copies.

Why hand-written: the generated class copies page data three times on the server
(mmap -> bytes -> message arena -> serialized bytes) and twice on the client
(serialized -> arena -> a new ``bytes`` on every ``.data`` access). Here the server
builds the serialized message with one copy straight from the image's mmap, and the
client gets ``data`` as a memoryview into the buffer gRPC handed over: no copy. The
layout is the one protoc defines for ``uffdd.v1.PageChunk`` (pages.proto); tests check
both directions against the generated class. Error chunks are rare and use protobuf.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from uffdd.v1 import pages_pb2

# field tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited)
_REQUEST_ID = 0x08
_IMAGE_ADDRESS = 0x10
_LENGTH = 0x18
_DATA = 0x22
_CHECKSUM = 0x29
_ZERO = 0x30
_LAST = 0x38
_ERROR = 0x42

_FIXED64 = struct.Struct("<Q")
_EMPTY = memoryview(b"")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uint_field(tag: int, value: int) -> bytes:
    return b"" if value == 0 else bytes((tag,)) + _varint(value)


def encode_data_chunk(
    request_id: int, image_address: int, data: memoryview, checksum: int, last: bool
) -> bytes:
    """A data chunk, serialized; ``data`` is copied once, into the result."""
    head = b"".join(
        (
            _uint_field(_REQUEST_ID, request_id),
            _uint_field(_IMAGE_ADDRESS, image_address),
            _uint_field(_LENGTH, len(data)),
            bytes((_DATA,)),
            _varint(len(data)),
        )
    )
    tail = bytes((_CHECKSUM,)) + _FIXED64.pack(checksum)
    if last:
        tail += bytes((_LAST, 1))
    return b"".join((head, data, tail))


def encode_zero_chunk(request_id: int, image_address: int, length: int, last: bool) -> bytes:
    """A chunk saying ``length`` bytes at ``image_address`` read as zeros."""
    return b"".join(
        (
            _uint_field(_REQUEST_ID, request_id),
            _uint_field(_IMAGE_ADDRESS, image_address),
            _uint_field(_LENGTH, length),
            bytes((_ZERO, 1)),
            bytes((_LAST, 1)) if last else b"",
        )
    )


def encode_error_chunk(request_id: int, image_address: int, code: int, message: str) -> bytes:
    """The final chunk of a failed request (rare: plain protobuf)."""
    chunk = pages_pb2.PageChunk(
        request_id=request_id,
        image_address=image_address,
        last=True,
        error=pages_pb2.Status(code=code, message=message),
    )
    return chunk.SerializeToString()


@dataclass(frozen=True, slots=True)
class WireChunk:
    """A decoded PageChunk; ``data`` is a view into the received message."""

    request_id: int
    image_address: int
    length: int
    data: memoryview
    checksum: int
    zero: bool
    last: bool
    error_code: int  # 0 = OK (grpc.StatusCode value numbers)
    error_message: str


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip(buf: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 2:
        size, pos = _read_varint(buf, pos)
        return pos + size
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def _decode_status(buf: memoryview) -> tuple[int, str]:
    status = pages_pb2.Status.FromString(bytes(buf))
    # an error must never read as OK, even if a peer sends code 0
    return (status.code or 2), status.message  # 2 = UNKNOWN


def decode_chunk(message: bytes) -> WireChunk:
    """Parse a serialized PageChunk; raises ValueError on a malformed message."""
    buf = memoryview(message)
    end = len(buf)
    pos = 0
    request_id = image_address = length = checksum = error_code = 0
    zero = last = False
    data = _EMPTY
    error_message = ""
    try:
        while pos < end:
            key, pos = _read_varint(buf, pos)
            if key == _DATA:
                size, pos = _read_varint(buf, pos)
                data = buf[pos : pos + size]
                pos += size
            elif key == _REQUEST_ID:
                request_id, pos = _read_varint(buf, pos)
            elif key == _IMAGE_ADDRESS:
                image_address, pos = _read_varint(buf, pos)
            elif key == _LENGTH:
                length, pos = _read_varint(buf, pos)
            elif key == _CHECKSUM:
                (checksum,) = _FIXED64.unpack_from(buf, pos)
                pos += 8
            elif key == _ZERO:
                value, pos = _read_varint(buf, pos)
                zero = value != 0
            elif key == _LAST:
                value, pos = _read_varint(buf, pos)
                last = value != 0
            elif key == _ERROR:
                size, pos = _read_varint(buf, pos)
                error_code, error_message = _decode_status(buf[pos : pos + size])
                pos += size
            else:
                pos = _skip(buf, pos, key & 7)
    except (IndexError, struct.error) as exc:
        raise ValueError("truncated PageChunk") from exc
    if pos != end or len(data) != (0 if zero or error_code else length):
        raise ValueError("malformed PageChunk")
    return WireChunk(
        request_id, image_address, length, data, checksum, zero, last, error_code, error_message
    )
