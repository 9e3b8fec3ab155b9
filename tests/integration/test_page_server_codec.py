"""The hand-written PageChunk codec agrees with protoc's, both ways."""

from __future__ import annotations

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from uffdd.core.actions import Priority
from uffdd.v1 import pages_pb2
from uffdd.wire import chunk_codec
from uffdd.wire.convert import priority_to_proto

u64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(request_id=u64, address=u64, data=st.binary(min_size=1, max_size=5000), last=st.booleans())
def test_data_chunk_matches_protobuf(
    request_id: int, address: int, data: bytes, last: bool
) -> None:
    checksum = xxhash.xxh3_64_intdigest(data)
    encoded = chunk_codec.encode_data_chunk(request_id, address, memoryview(data), checksum, last)
    parsed = pages_pb2.PageChunk.FromString(encoded)
    assert (parsed.request_id, parsed.image_address, parsed.length) == (
        request_id,
        address,
        len(data),
    )
    assert (parsed.data, parsed.checksum, parsed.last, parsed.zero) == (data, checksum, last, False)
    expected = pages_pb2.PageChunk(
        request_id=request_id,
        image_address=address,
        length=len(data),
        data=data,
        checksum=checksum,
        last=last,
    )
    decoded = chunk_codec.decode_chunk(expected.SerializeToString())
    assert bytes(decoded.data) == data
    assert (decoded.request_id, decoded.image_address, decoded.length) == (
        request_id,
        address,
        len(data),
    )
    assert (decoded.checksum, decoded.last, decoded.zero, decoded.error_code) == (
        checksum,
        last,
        False,
        0,
    )


@given(request_id=u64, address=u64, length=u64, last=st.booleans())
def test_zero_chunk_matches_protobuf(
    request_id: int, address: int, length: int, last: bool
) -> None:
    encoded = chunk_codec.encode_zero_chunk(request_id, address, length, last)
    assert pages_pb2.PageChunk.FromString(encoded) == pages_pb2.PageChunk(
        request_id=request_id, image_address=address, length=length, zero=True, last=last
    )
    decoded = chunk_codec.decode_chunk(encoded)
    assert (decoded.length, decoded.zero, decoded.last, len(decoded.data)) == (
        length,
        True,
        last,
        0,
    )


def test_error_chunk_and_unknown_fields() -> None:
    encoded = chunk_codec.encode_error_chunk(7, 0x1000, 15, "bad page")
    decoded = chunk_codec.decode_chunk(encoded + b"\xf8\x01\x05")  # unknown field 31 = 5
    assert (decoded.request_id, decoded.error_code, decoded.error_message, decoded.last) == (
        7,
        15,
        "bad page",
        True,
    )


def test_decoded_data_is_a_view_not_a_copy() -> None:
    message = pages_pb2.PageChunk(request_id=1, length=4, data=b"abcd").SerializeToString()
    decoded = chunk_codec.decode_chunk(message)
    assert decoded.data.obj is message


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x22\x10abc",  # data length past the end
        b"\x08",  # truncated varint
        b"\x18\x08\x22\x02ab",  # length says 8, data holds 2
        b"\x29\x01\x02",  # truncated fixed64
    ],
)
def test_malformed_chunks_raise_value_error(garbage: bytes) -> None:
    with pytest.raises(ValueError, match="PageChunk"):
        chunk_codec.decode_chunk(garbage)


def test_the_cores_priorities_are_the_wires_numbers() -> None:
    assert [priority_to_proto(p) for p in Priority] == [
        pages_pb2.PRIORITY_URGENT,
        pages_pb2.PRIORITY_BULK,
    ]
    assert pages_pb2.Priority.Name(priority_to_proto(Priority.BULK)) == "PRIORITY_BULK"
