"""Property tests of the uffd_msg codec (uffdd/core/wire.py) against a test-side encoder.

The encoder is written from the kernel's struct layout, independently of the decoder,
so a round trip checks both the layout and the field mapping.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffdd.core.addresses import RunAddr
from uffdd.core.events import Fork, PageFault, Remap, Remove, UffdEvent, Unmap
from uffdd.core.wire import (
    EVENT_FORK,
    EVENT_PAGEFAULT,
    EVENT_REMAP,
    EVENT_REMOVE,
    EVENT_UNMAP,
    MSG_SIZE,
    PAGEFAULT_FLAG_MINOR,
    PAGEFAULT_FLAG_WP,
    PAGEFAULT_FLAG_WRITE,
    WireError,
    decode_message,
    decode_messages,
)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
ADDR = U64.map(RunAddr)
KNOWN_CODES = {EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP}


def encode(event: UffdEvent, reserved: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """struct uffd_msg, native byte order: header then the 24-byte union."""
    match event:
        case PageFault():
            flags = (
                (PAGEFAULT_FLAG_WRITE if event.write else 0)
                | (PAGEFAULT_FLAG_WP if event.wp else 0)
                | (PAGEFAULT_FLAG_MINOR if event.minor else 0)
            )
            code, body = EVENT_PAGEFAULT, struct.pack("=QQI4x", flags, event.address, event.tid)
        case Fork():
            code, body = EVENT_FORK, struct.pack("=I20x", event.child_fd)
        case Remap():
            code, body = EVENT_REMAP, struct.pack("=QQQ", event.old, event.new, event.length)
        case Remove():
            code, body = EVENT_REMOVE, struct.pack("=QQ8x", event.start, event.end)
        case Unmap():
            code, body = EVENT_UNMAP, struct.pack("=QQ8x", event.start, event.end)
    message = struct.pack("=BBHI", code, *reserved) + body
    assert len(message) == MSG_SIZE
    return message


@st.composite
def ranges(draw: st.DrawFn) -> tuple[RunAddr, RunAddr]:
    start = draw(U64)
    end = draw(st.integers(start, 2**64 - 1))
    return RunAddr(start), RunAddr(end)


page_faults = st.builds(
    PageFault, address=ADDR, write=st.booleans(), wp=st.booleans(), minor=st.booleans(), tid=U32
)
forks = st.builds(Fork, child_fd=U32)
remaps = st.builds(Remap, old=ADDR, new=ADDR, length=U64)
removes = ranges().map(lambda r: Remove(start=r[0], end=r[1]))
unmaps = ranges().map(lambda r: Unmap(start=r[0], end=r[1]))
events = st.one_of(page_faults, forks, remaps, removes, unmaps)
reserved_fields = st.tuples(st.integers(0, 255), st.integers(0, 2**16 - 1), U32)


@given(events, reserved_fields)
def test_every_event_round_trips(event: UffdEvent, reserved: tuple[int, int, int]) -> None:
    # The header's reserved fields carry nothing and must not matter.
    assert decode_message(encode(event, reserved)) == event


@given(st.lists(events, max_size=20))
def test_batches_decode_in_order(batch: list[UffdEvent]) -> None:
    data = b"".join(encode(e) for e in batch)
    assert decode_messages(data) == batch
    assert decode_messages(bytearray(data)) == batch
    assert decode_messages(memoryview(data)) == batch


@given(st.binary(max_size=8 * MSG_SIZE))
def test_arbitrary_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    try:
        decoded = decode_messages(data)
    except WireError:
        return
    assert len(decoded) * MSG_SIZE == len(data)
    # What decodes re-encodes to the same meaning.
    assert [decode_message(encode(e)) for e in decoded] == decoded


@given(st.binary(max_size=10 * MSG_SIZE).filter(lambda b: len(b) % MSG_SIZE != 0))
def test_lengths_not_a_multiple_of_32_are_rejected(data: bytes) -> None:
    with pytest.raises(WireError, match="multiple"):
        decode_messages(data)


@given(st.binary(min_size=0, max_size=2 * MSG_SIZE).filter(lambda b: len(b) != MSG_SIZE))
def test_a_single_record_must_be_32_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_message(data)


@given(
    st.integers(0, 255).filter(lambda c: c not in KNOWN_CODES),
    st.binary(min_size=MSG_SIZE - 1, max_size=MSG_SIZE - 1),
)
def test_unknown_event_codes_are_rejected(code: int, rest: bytes) -> None:
    with pytest.raises(WireError, match="unknown userfaultfd event"):
        decode_message(bytes([code]) + rest)


@given(
    U64.filter(lambda f: f & ~(PAGEFAULT_FLAG_WRITE | PAGEFAULT_FLAG_WP | PAGEFAULT_FLAG_MINOR)),
    U64,
)
def test_unknown_fault_flags_are_rejected(flags: int, address: int) -> None:
    record = struct.pack("=BBHIQQI4x", EVENT_PAGEFAULT, 0, 0, 0, flags, address, 0)
    with pytest.raises(WireError, match="unknown flags"):
        decode_message(record)


@given(ranges().filter(lambda r: r[0] != r[1]), st.sampled_from([EVENT_REMOVE, EVENT_UNMAP]))
def test_ranges_ending_before_they_start_are_rejected(bounds: tuple[int, int], code: int) -> None:
    start, end = bounds
    record = struct.pack("=BBHIQQ8x", code, 0, 0, 0, end, start)  # swapped
    with pytest.raises(WireError, match="before start"):
        decode_message(record)


def test_a_bad_record_in_a_batch_fails_the_batch() -> None:
    good = encode(PageFault(address=RunAddr(0x1000)))
    with pytest.raises(WireError):
        decode_messages(good + b"\xff" + bytes(MSG_SIZE - 1))


@given(events)
def test_memoryviews_of_any_item_size_count_bytes(event: UffdEvent) -> None:
    words = memoryview(encode(event)).cast("Q")  # 4 items, 32 bytes
    assert decode_message(words) == event
    assert decode_messages(words) == [event]
