"""The pure handover protocol: codec round trips, refusals, and region-set checks.

The region checks are compared with a naive model (every page of every region in a set)
over generated region sets, including unaligned and zero-length ones.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr
from uffdd.core.errors import PeerProtocolError
from uffdd.core.handover import (
    HUGE_2M,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Error,
    ErrorCode,
    Failed,
    HandoverLimits,
    HandoverRegion,
    HandoverRejected,
    HandoverRequest,
    Progress,
    Reply,
    ResidentSummary,
    validate_regions,
)
from uffdd.v1 import handover_pb2
from uffdd.wire.handover import decode_reply, decode_request, encode_reply, encode_request

pytestmark = pytest.mark.timeout(60)

P = PAGE_SIZE


def region(run: int, length: int, image: int | None = None, page_size: int = P) -> HandoverRegion:
    return HandoverRegion(
        RunAddr(run), ImageAddr(run if image is None else image), length, page_size
    )


def request(*regions: HandoverRegion, **fields: object) -> HandoverRequest:
    values: dict[str, object] = {"image_id": "img-1", "regions": regions or (region(P, P),)}
    values.update(fields)
    return HandoverRequest(**values)  # type: ignore[arg-type]


def rejected(data: bytes) -> HandoverRejected:
    with pytest.raises(HandoverRejected) as info:
        decode_request(data)
    return info.value


def refusal(regions: list[HandoverRegion]) -> HandoverRejected | None:
    """The refusal of ``regions``, or None when they are accepted."""
    try:
        validate_regions(regions)
    except HandoverRejected as exc:
        return exc
    return None


# -- requests -------------------------------------------------------------------------------


def test_request_round_trip_sorts_regions() -> None:
    original = request(
        region(0x20000, 2 * P, image=0x7000),
        region(0x10000, P, image=0x1000),
        pid=42,
        page_server="pages.example:7000",
        restorer="test",
        labels={"vm": "a", "zone": "b"},
    )
    decoded = decode_request(encode_request(original))
    assert decoded.regions == (original.regions[1], original.regions[0])
    assert (decoded.pid, decoded.image_id, decoded.page_server) == (
        42,
        "img-1",
        original.page_server,
    )
    assert decoded.restorer == "test"
    assert dict(decoded.labels) == {"vm": "a", "zone": "b"}
    assert decoded.version == PROTOCOL_VERSION
    assert decoded.total_bytes == 3 * P


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_any_bytes_either_decode_or_are_rejected(data: bytes) -> None:
    refused: HandoverRejected | None = None
    try:
        decode_request(data)
    except HandoverRejected as exc:
        refused = exc
    assert refused is None or (refused.code in set(ErrorCode) and refused.reason)


def test_garbage_is_malformed() -> None:
    exc = rejected(b"\xff\xff\xff\xff garbage")
    assert exc.code is ErrorCode.MALFORMED
    assert "not a HandoverRequest" in exc.reason


def test_empty_record_has_no_version() -> None:
    exc = rejected(b"")
    assert exc.code is ErrorCode.MALFORMED
    assert "no protocol version" in exc.reason


def test_unknown_version_names_the_spoken_one() -> None:
    exc = rejected(encode_request(request(version=7)))
    assert exc.code is ErrorCode.UNSUPPORTED_VERSION
    assert "version 7 is not supported" in exc.reason
    assert f"speaks version {PROTOCOL_VERSION}" in exc.reason


def test_unknown_version_is_refused_before_other_fields() -> None:
    # Another version may mean other fields: no region complaint for version 2.
    message = handover_pb2.HandoverRequest(version=2)  # type: ignore[arg-type]
    assert rejected(message.SerializeToString()).code is ErrorCode.UNSUPPORTED_VERSION


def test_invalid_utf8_is_malformed() -> None:
    valid = encode_request(request(image_id="abc"))
    assert b"abc" in valid
    assert rejected(valid.replace(b"abc", b"a\xffc")).code is ErrorCode.MALFORMED


def test_oversized_request_is_a_limit() -> None:
    assert rejected(bytes(MAX_REQUEST_BYTES + 1)).code is ErrorCode.LIMIT


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"image_id": ""}, ErrorCode.BAD_REQUEST, "image_id is empty"),
        ({"image_id": "a\nb"}, ErrorCode.BAD_REQUEST, "control characters"),
        ({"pid": -5}, ErrorCode.BAD_PID, "negative"),
        ({"page_server": "x" * 2000}, ErrorCode.LIMIT, "page_server is 2000 characters"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, ErrorCode.LIMIT, "65 labels"),
        ({"regions": ()}, ErrorCode.BAD_REGIONS, "no regions"),
    ],
)
def test_bad_fields(fields: dict[str, object], code: ErrorCode, words: str) -> None:
    values: dict[str, object] = {"image_id": "img", "regions": (region(P, P),)}
    values.update(fields)
    exc = rejected(encode_request(HandoverRequest(**values)))  # type: ignore[arg-type]
    assert exc.code is code
    assert words in exc.reason


# -- regions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("regions", "words"),
    [
        ([region(P + 1, P)], "run address 0x1001 is not a multiple of the page size 4096"),
        ([region(P, P, image=5)], "image address 0x5 is not a multiple"),
        ([region(P, P + 8)], "length 0x1008 is not a multiple"),
        ([region(P, 0)], "zero length"),
        ([region(P, P, page_size=8192)], "page size 8192 not one of"),
        ([region(P, 4 * P), region(3 * P, 2 * P)], "regions overlap: [0x1000, +0x4000)"),
        ([region(2 * P, P), region(2 * P, P)], "regions overlap"),
        ([region((1 << 56) - P, 2 * P)], "past"),
        ([region(0, HUGE_2M, page_size=HUGE_2M), region(HUGE_2M - P, P)], "overlap"),
    ],
)
def test_bad_regions(regions: list[HandoverRegion], words: str) -> None:
    with pytest.raises(HandoverRejected) as info:
        validate_regions(regions)
    assert info.value.code is ErrorCode.BAD_REGIONS
    assert words in info.value.reason


def test_region_limits() -> None:
    limits = HandoverLimits(max_regions=3, max_total_bytes=4 * P)
    with pytest.raises(HandoverRejected, match="4 regions, at most 3") as info:
        validate_regions([region(i * 2 * P, P) for i in range(4)], limits)
    assert info.value.code is ErrorCode.LIMIT
    with pytest.raises(HandoverRejected, match="20480 bytes in all") as info:
        validate_regions([region(P, 5 * P)], limits)
    assert info.value.code is ErrorCode.LIMIT


def test_adjacent_regions_and_shared_image_ranges_are_fine() -> None:
    regions = [region(2 * P, P, image=0), region(P, P, image=0), region(3 * P, 2 * P, image=0)]
    assert [r.run_address for r in validate_regions(regions)] == [P, 2 * P, 3 * P]


# A small address space (in pages) so generated regions collide often.
_region = st.builds(
    lambda start, count, skew, length_skew: region(start * P + skew, count * P + length_skew),
    st.integers(0, 32),
    st.integers(0, 6),
    st.sampled_from([0, 0, 0, 0, 1, P // 2]),
    st.sampled_from([0, 0, 0, 0, 8]),
)


def _model_accepts(regions: list[HandoverRegion]) -> bool:
    """Naive: every region page-aligned and non-empty, no page claimed twice."""
    if not regions:
        return False
    seen: set[int] = set()
    for r in regions:
        if r.length <= 0 or r.run_address % P or r.length % P:
            return False
        pages = set(range(r.run_address // P, r.run_end // P))
        if pages & seen:
            return False
        seen |= pages
    return True


@given(st.lists(_region, max_size=6))
@settings(max_examples=500, deadline=None)
def test_region_checks_match_a_page_model(regions: list[HandoverRegion]) -> None:
    refused = refusal(regions)
    assert (refused is None) == _model_accepts(regions)
    if refused is not None:
        assert refused.code is ErrorCode.BAD_REGIONS
    else:
        accepted = validate_regions(regions)
        assert sorted(accepted, key=lambda r: r.run_address) == list(accepted)
        assert sorted(accepted, key=repr) == sorted(regions, key=repr)


# -- replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Ack("0123abcd"),
        Error(ErrorCode.BAD_FD, "no fd attached"),
        Progress(4096, 1 << 30),
        ResidentSummary(
            pages=10,
            bytes=40960,
            faults=3,
            fault_p50_us=80.5,
            fault_p99_us=900.25,
            seconds_to_resident=1.5,
        ),
        Failed("page server gone"),
    ],
)
def test_reply_round_trip(reply: Reply) -> None:
    assert decode_reply(encode_reply(reply)) == reply


def test_unknown_error_code_decodes_as_unspecified() -> None:
    raw = handover_pb2.HandoverReply(
        error=handover_pb2.HandoverError(code=99, message="new")  # type: ignore[arg-type]
    ).SerializeToString()
    assert decode_reply(raw) == Error(ErrorCode.UNSPECIFIED, "new")


@pytest.mark.parametrize("data", [b"", b"\xff\xff\xff"])
def test_bad_replies_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(PeerProtocolError):
        decode_reply(data)


def test_the_version_mirrors_the_proto() -> None:
    assert PROTOCOL_VERSION == handover_pb2.HANDOVER_VERSION_CURRENT


def test_error_codes_mirror_the_proto() -> None:
    names = {
        name.removeprefix("HANDOVER_ERROR_CODE_"): number
        for name, number in handover_pb2.HandoverErrorCode.items()
    }
    assert names == {code.name: code.value for code in ErrorCode}
