"""Firecracker's handover message: framing off a byte stream, parsing, every refusal.

Why unit tests: everything a VMM (or anything else that connects) can get wrong in the
message is decided by pure code in ``uffdd.core.firecracker``; here each case must be a
clear error naming what is wrong, and a valid message must come out exact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffdd.core.firecracker import (
    HUGE_PAGE,
    MAX_MESSAGE_BYTES,
    GuestRegion,
    ImageRegion,
    PayloadError,
    lazy_regions,
    parse_regions,
    take_message,
)

pytestmark = pytest.mark.timeout(60)

P = 4096
BASE = 0x7F00_0000_0000


def region(base: Any = BASE, size: Any = 16 * P, offset: Any = 0, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"base_host_virt_addr": base, "size": size, "offset": offset}
    fields.update(extra or {"page_size": P})
    return fields


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_parses_regions_sorted_by_address() -> None:
    message = encode(
        [
            region(BASE + 64 * P, 8 * P, 16 * P),
            region(BASE, 16 * P, 0),
        ]
    )
    assert parse_regions(message) == (
        GuestRegion(BASE, 16 * P, 0, P),
        GuestRegion(BASE + 64 * P, 8 * P, 16 * P, P),
    )


def test_accepts_the_older_page_size_kib_field_which_holds_bytes() -> None:
    assert parse_regions(encode([region(page_size_kib=P)]))[0].page_size == P
    both = region(page_size=HUGE_PAGE, page_size_kib=HUGE_PAGE, size=HUGE_PAGE)
    assert parse_regions(encode([both]))[0].page_size == HUGE_PAGE


def test_huge_pages_need_huge_alignment() -> None:
    good = region(BASE, 2 * HUGE_PAGE, HUGE_PAGE, page_size=HUGE_PAGE)
    assert parse_regions(encode([good]))[0].size == 2 * HUGE_PAGE
    with pytest.raises(PayloadError, match="offset 0x1000 is not a multiple of its page size"):
        parse_regions(encode([region(BASE, HUGE_PAGE, P, page_size=HUGE_PAGE)]))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"[{", "not valid JSON"),
        (encode({"regions": []}), "is a JSON object, not an array of regions"),
        (encode("text"), "is a JSON string, not an array"),
        (encode([]), "the region list is empty"),
        (encode([7]), "region 0 is a JSON number, not an object"),
        (encode([{"size": P, "offset": 0, "page_size": P}]), "has no 'base_host_virt_addr'"),
        (encode([{"base_host_virt_addr": BASE, "offset": 0, "page_size": P}]), "has no 'size'"),
        (encode([{"base_host_virt_addr": BASE, "size": P, "page_size": P}]), "has no 'offset'"),
        (encode([{"base_host_virt_addr": BASE, "size": P, "offset": 0}]), "has no 'page_size'"),
        (encode([region(size="4096")]), "size is a JSON string, not an integer"),
        (encode([region(offset=True)]), "offset is a JSON boolean, not an integer"),
        (encode([region(size=4096.0)]), "size is a JSON number, not an integer"),
        (encode([region(base=-P)]), "is not an unsigned 64-bit integer"),
        (encode([region(base=1 << 64)]), "is not an unsigned 64-bit integer"),
        (encode([region(base=(1 << 64) - P, size=2 * P)]), "wraps around"),
        (encode([region(size=0)]), "has size 0"),
        (encode([region(base=BASE + 512)]), "base_host_virt_addr 0x7f0000000200 is not a multiple"),
        (encode([region(size=P + 1)]), "size 0x1001 is not a multiple"),
        (encode([region(offset=100)]), "offset 0x64 is not a multiple"),
        (encode([region(page_size=8192)]), "page size 8192 is neither 4 KiB nor 2 MiB"),
        (encode([region(page_size=1024)]), "page size 1024 is neither"),
        (
            encode([region(page_size=P, page_size_kib=4)]),
            "page_size 4096 and page_size_kib 4 disagree",
        ),
        (
            encode([region(BASE, 16 * P, 0), region(BASE + 8 * P, 16 * P, 64 * P)]),
            "overlap in the VMM",
        ),
        (
            encode([region(BASE, 16 * P, 0), region(BASE + 64 * P, 16 * P, 15 * P)]),
            "overlap in the memory file",
        ),
    ],
)
def test_refuses_with_a_clear_reason(message: bytes, error: str) -> None:
    with pytest.raises(PayloadError, match=error.replace("(", r"\(")):
        parse_regions(message)


def test_frames_one_message_at_a_time() -> None:
    first, second = encode([region()]), encode([region(offset=16 * P)])
    message, rest = take_message(b"\0 \n" + first + b"\0" + second[:5])
    assert message == first
    assert take_message(rest) == (None, second[:5])
    assert take_message(rest + second[5:]) == (second, b"")
    assert take_message(b"") == (None, b"")
    assert take_message(b"\0\0") == (None, b"")


def test_brackets_inside_strings_do_not_end_a_message() -> None:
    tricky = b'[{"name": "a]b}\\"]", "x": [1, {"y": "["}]}]'
    assert take_message(tricky + b"[") == (tricky, b"[")


@pytest.mark.parametrize("garbage", [b"hello", b"42", b'"text"', b"\x01\x02"])
def test_garbage_cannot_start_a_message(garbage: bytes) -> None:
    with pytest.raises(PayloadError, match="not a JSON array of regions"):
        take_message(garbage)


def test_an_endless_message_is_refused() -> None:
    with pytest.raises(PayloadError, match="exceeds"):
        take_message(b"[" * (MAX_MESSAGE_BYTES + 1))
    assert take_message(b"[" * 100)[0] is None


@given(
    st.lists(
        st.lists(
            st.integers(0, 1 << 40).map(lambda n: region(BASE, P, n * P)), min_size=1, max_size=3
        ),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(1, 50), max_size=8),
)
def test_framing_survives_any_split(messages: list[list[dict[str, Any]]], cuts: list[int]) -> None:
    """However the stream is cut into reads, the same messages come out, in order."""
    stream = b"\0".join(encode(m) for m in messages)
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(stream[position : position + cut])
        position += cut
    pieces.append(stream[position:])
    found: list[bytes] = []
    buffer = b""
    for piece in pieces:
        buffer += piece
        while True:
            message, buffer = take_message(buffer)
            if message is None:
                break
            found.append(message)
    assert [json.loads(m) for m in found] == messages


def test_lazy_regions_map_file_offsets_to_image_addresses() -> None:
    regions = parse_regions(encode([region(BASE, 16 * P, 32 * P)]))
    image = (ImageRegion(0, 64 * P, P),)
    (lazy,) = lazy_regions(regions, image, "img")
    assert (lazy.run, lazy.image, lazy.length, lazy.page_size) == (BASE, 32 * P, 16 * P, P)


def test_lazy_regions_refuse_ranges_outside_the_image() -> None:
    regions = parse_regions(encode([region(BASE, 16 * P, 56 * P)]))
    with pytest.raises(
        PayloadError, match=r"file range \[0x38000, 0x48000\) is not inside image img"
    ):
        lazy_regions(regions, (ImageRegion(0, 64 * P, P),), "img")


def test_lazy_regions_refuse_a_page_size_the_image_was_not_made_with() -> None:
    regions = parse_regions(encode([region(BASE, HUGE_PAGE, 0, page_size=HUGE_PAGE)]))
    with pytest.raises(PayloadError, match="made with page size 4096"):
        lazy_regions(regions, (ImageRegion(0, HUGE_PAGE, P),), "img")
