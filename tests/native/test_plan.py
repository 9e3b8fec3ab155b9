"""C answers a fault exactly as the core's policy says: ``csrc/plan.c`` against
``core.policy.plan_fault``.

Why: the fault plan is the core's (what a fault gets: its block, clipped to its table
row; with a whole-block plan the block's other data rows and its zero rows); the fast
serve and the demand thread execute it in C without asking. Hypothesis draws tables
(sorted, disjoint page runs of data and of zeros, the two disjoint too), plans and
pages, and the two implementations must give the same spans in the same order.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from uffdd.core.policy import FaultPlan, plan_fault
from uffdd.native import fast_serve

P = 4096
PAGES = 96  # the address space drawn from: pages 0x100..0x160


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Data and zero tables: each page of the space is data, zero or neither, in runs."""
    kinds = draw(st.lists(st.sampled_from("dz."), min_size=PAGES, max_size=PAGES))
    cuts = draw(st.sets(st.integers(1, PAGES - 1), max_size=24))  # run ends inside a kind
    data: list[tuple[int, int]] = []
    zeros: list[tuple[int, int]] = []
    start = 0
    for page in range(1, PAGES + 1):
        if page == PAGES or kinds[page] != kinds[start] or page in cuts:
            rows = {"d": data, "z": zeros}.get(kinds[start])
            if rows is not None:
                rows.append(((0x100 + start) * P, (0x100 + page) * P))
            start = page
    return data, zeros


plans = st.builds(
    FaultPlan, block=st.sampled_from([P, 4 * P, 16 * P, 64 * P]), whole_block=st.booleans()
)


@settings(max_examples=400, deadline=None)
@given(tables(), plans, st.integers(0x100 - 4, 0x100 + PAGES + 4))
def test_c_gives_every_fault_the_spans_the_core_plans(
    drawn: tuple[list[tuple[int, int]], list[tuple[int, int]]], plan: FaultPlan, page: int
) -> None:
    data, zeros = drawn
    expected = [(s.start, s.end, s.zero, s.table) for s in plan_fault(plan, data, zeros, page * P)]
    assert fast_serve.plan_fault(plan, data, zeros, page * P) == expected


def test_the_differential_test_sees_a_difference() -> None:
    """A plan C did not get (a smaller block) gives other spans: the comparison bites."""
    data, zeros = [(0x100 * P, 0x110 * P)], [(0x110 * P, 0x120 * P)]
    c = fast_serve.plan_fault(FaultPlan(4 * P, whole_block=True), data, zeros, 0x105 * P)
    core = plan_fault(FaultPlan(16 * P, whole_block=True), data, zeros, 0x105 * P)
    assert c == [(0x104 * P, 0x108 * P, False, 0)]
    assert c != [(s.start, s.end, s.zero, s.table) for s in core]
