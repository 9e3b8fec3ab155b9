"""RangeSet and RegionMap against naive models (a Python set of ints, a dict of pages)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.ranges import Piece, RangeSet, RegionMap

spans = st.tuples(st.integers(0, 60), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1]))
ops = st.lists(st.tuples(st.booleans(), spans), max_size=30)


def _as_set(ranges: RangeSet[int]) -> set[int]:
    return {a for s, e in ranges.spans() for a in range(s, e)}


@settings(max_examples=200)
@given(ops, spans, st.integers(-1, 75))
def test_rangeset_matches_a_set_of_ints(
    operations: list[tuple[bool, tuple[int, int]]], probe: tuple[int, int], point: int
) -> None:
    ranges: RangeSet[int] = RangeSet()
    model: set[int] = set()
    for add, (start, end) in operations:
        if add:
            ranges.add(start, end)
            model |= set(range(start, end))
        else:
            removed = ranges.discard(start, end)
            assert removed == len(model & set(range(start, end)))
            model -= set(range(start, end))
        assert _as_set(ranges) == model
        assert ranges.total == len(model)
        listed = list(ranges.spans())
        # sorted, disjoint, never adjacent (always merged)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(listed))
        assert all(s < e for s, e in listed)
    lo, hi = probe
    inside = {a for s, e in ranges.intersect(lo, hi) for a in range(s, e)}
    assert inside == model & set(range(lo, hi))
    assert ranges.overlaps(lo, hi) == bool(model & set(range(lo, hi)))
    assert (point in ranges) == (point in model)
    span = ranges.span_at(point)
    if point in model:
        assert span is not None
        assert span[0] <= point < span[1]
        assert set(range(*span)) <= model
    else:
        assert span is None
    first = ranges.first()
    assert (first[0] if first else None) == (min(model) if model else None)
    clone = ranges.copy()
    assert clone == ranges
    clone.add(100, 101)
    assert clone != ranges


def test_rangeset_merges_adjacent_spans_and_splits_on_discard() -> None:
    ranges: RangeSet[ImageAddr] = RangeSet([(0, 4), (4, 8), (12, 16)])
    assert list(ranges.spans()) == [(0, 8), (12, 16)]
    assert len(ranges) == 2
    assert ranges.total == 12
    assert ranges.discard(2, 14) == 8
    assert list(ranges.spans()) == [(0, 2), (14, 16)]
    assert ranges.discard(5, 6) == 0
    ranges.clear()
    assert not ranges
    assert ranges.total == 0
    assert ranges.first() is None


def test_rangeset_ignores_empty_spans() -> None:
    ranges: RangeSet[int] = RangeSet()
    ranges.add(5, 5)
    assert not ranges
    assert ranges.discard(3, 3) == 0
    assert ranges.intersect(4, 4) == []
    assert not ranges.overlaps(0, 0)


def _piece(run: int, image: int, length: int) -> Piece:
    return Piece(RunAddr(run), ImageAddr(image), length, 1)


def test_region_map_translates_both_ways() -> None:
    regions = RegionMap([_piece(100, 0, 10), _piece(200, 50, 10)])
    found = regions.lookup(205)
    assert found is not None
    assert found.to_image(205) == 55
    assert regions.lookup(110) is None
    by_image = regions.lookup_image(52)
    assert by_image is not None
    assert by_image.to_run(52) == 202
    assert regions.pieces_in_image(5, 55) == [_piece(105, 5, 5), _piece(200, 50, 5)]
    assert regions.total == 20
    with pytest.raises(ValueError, match="already mapped"):
        regions.insert(_piece(105, 900, 2))


def test_region_map_drop_splits_pieces() -> None:
    regions = RegionMap([_piece(100, 0, 10)])
    assert regions.drop(103, 105) == [_piece(103, 3, 2)]
    assert list(regions) == [_piece(100, 0, 3), _piece(105, 5, 5)]


def test_region_map_move_keeps_image_addresses_and_displaces_the_target() -> None:
    regions = RegionMap([_piece(100, 0, 10), _piece(300, 50, 10)])
    moved, displaced = regions.move(102, 305, 4)
    assert moved == [_piece(305, 2, 4)]
    assert displaced == [_piece(305, 55, 4)]
    assert list(regions) == [
        _piece(100, 0, 2),
        _piece(106, 6, 4),
        _piece(300, 50, 5),
        _piece(305, 2, 4),
        _piece(309, 59, 1),
    ]


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["drop", "move"]),
            st.integers(0, 40),
            st.integers(0, 40),
            st.integers(1, 8),
        ),
        max_size=12,
    )
)
def test_region_map_matches_a_page_dict(ops: list[tuple[str, int, int, int]]) -> None:
    regions = RegionMap([_piece(0, 1000, 16), _piece(20, 2000, 8)])
    model = {run: 1000 + run for run in range(16)} | {20 + i: 2000 + i for i in range(8)}
    for op, a, b, length in ops:
        if op == "drop":
            regions.drop(a, a + length)
            for run in range(a, a + length):
                model.pop(run, None)
        else:
            if a < b + length and b < a + length:
                continue  # mremap never overlaps source and destination
            regions.move(a, b, length)
            moving = {run: model.pop(run) for run in range(a, a + length) if run in model}
            for run in range(b, b + length):
                model.pop(run, None)
            model.update({run - a + b: image for run, image in moving.items()})
    actual = {}
    for piece in regions:
        for offset in range(piece.length):
            actual[piece.run + offset] = piece.image + offset
    assert actual == model
    for run, image in model.items():
        found = regions.lookup_image(image)
        assert found is not None
        assert found.to_run(image) == run
