"""Fetch policy (fault-around, bulk chunk growth, the in-flight bound) and latency stats."""

from __future__ import annotations

import pytest

from uffdd.core.actions import Copy, Expedite, Fetch, Priority
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import InstallOutcome, InstallResult, PageFault, PagesArrived, ProcId
from uffdd.core.policy import FaultPlan, KiB, MiB, Policy, chunk_length, plan_fault
from uffdd.core.process import LazyRegion
from uffdd.core.ranges import RangeSet
from uffdd.core.stats import LatencyHistogram, Progress
from uffdd.core.tracker import Tracker

P = 4096
R = ProcId("r")


def test_defaults_follow_criu_and_validate() -> None:
    policy = Policy()
    assert (policy.bulk_min, policy.bulk_max) == (64 * KiB, 4 * MiB)
    with pytest.raises(ValueError, match="power of two"):
        Policy(fault_around=3 * P)
    with pytest.raises(ValueError, match="bulk_min"):
        Policy(bulk_min=8 * MiB)


def test_bulk_chunks_double_up_to_the_maximum() -> None:
    policy = Policy()
    chunk = policy.bulk_min
    sizes = []
    for _ in range(8):
        chunk = policy.next_chunk(chunk)
        sizes.append(chunk)
    assert sizes == [128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 4 * MiB, 4 * MiB]


def test_fault_window_is_aligned_and_clipped() -> None:
    policy = Policy(fault_around=16 * P)
    missing: RangeSet[ImageAddr] = RangeSet([(0, 10 * P), (12 * P, 40 * P)])
    assert policy.fault_window(5 * P, P, 0, 64 * P, missing) == (0, 10 * P)
    assert policy.fault_window(13 * P, P, 0, 64 * P, missing) == (12 * P, 16 * P)
    assert policy.fault_window(17 * P, P, 0, 20 * P, missing) == (16 * P, 20 * P)
    # a huge page is never split, even when it is larger than the window
    huge = 512 * P
    missing_huge: RangeSet[ImageAddr] = RangeSet([(0, 4 * huge)])
    assert policy.fault_window(huge + 3 * P, huge, 0, 4 * huge, missing_huge) == (huge, 2 * huge)


def test_bulk_window_respects_the_budget_but_never_starves() -> None:
    policy = Policy(max_in_flight=64 * KiB)
    assert policy.bulk_window((0, 1 * MiB), P, 256 * KiB, 0) == (0, 256 * KiB)
    assert policy.bulk_window((0, 1 * MiB), P, 32 * KiB, 48 * KiB) is None
    assert policy.bulk_window((0, 1 * MiB), P, 16 * KiB, 48 * KiB) == (0, 16 * KiB)
    assert policy.bulk_window((0, 3 * P), P, 64 * KiB, 0) == (0, 3 * P)


def _sweep(policy: Policy, pages: int) -> tuple[Tracker, list[Fetch]]:
    tracker = Tracker(policy)
    region = LazyRegion(RunAddr(0x10000), ImageAddr(0), pages * P)
    actions = tracker.add_process(R, "i", [region], [(0, pages * P)], 0.0, handed_over=True)
    return tracker, [a for a in actions if isinstance(a, Fetch)]


def test_the_sweep_goes_up_in_image_order_within_the_in_flight_bound() -> None:
    policy = Policy(bulk_min=4 * P, bulk_max=16 * P, max_in_flight=32 * P)
    tracker, fetches = _sweep(policy, 256)
    assert [(f.image_addr // P, f.length // P) for f in fetches] == [(0, 4), (4, 8), (12, 16)]
    assert all(f.priority is Priority.BULK for f in fetches)
    # 28 pages in flight, chunk now 16: installing 4 pages is not room enough
    assert _install(tracker, fetches[0], 1.0) == []
    # installing 8 more is: the sweep goes on where it stopped
    more = _install(tracker, fetches[1], 1.1)
    assert [(f.image_addr // P, f.length // P) for f in more] == [(28, 16)]


def _install(tracker: Tracker, fetch: Fetch, now: float) -> list[Fetch]:
    """Deliver and install a whole request; return the fetches that follows."""
    event = PagesArrived(fetch.request_id, fetch.image_addr, fetch.length, "d")
    [copy] = tracker.handle(event, now)
    assert isinstance(copy, Copy)
    outcome = InstallOutcome(R, copy.install_id, InstallResult.DONE, copy.length)
    return [a for a in tracker.handle(outcome, now) if isinstance(a, Fetch)]


def test_a_fault_leaves_the_bulk_chunk_alone() -> None:
    policy = Policy(bulk_min=4 * P, bulk_max=16 * P, max_in_flight=64 * P)
    tracker, fetches = _sweep(policy, 256)
    assert [f.length // P for f in fetches] == [4, 8, 16, 16, 16]
    [urgent] = tracker.handle_uffd(R, [PageFault(RunAddr(0x10000 + 200 * P))], 1.0)
    assert isinstance(urgent, Fetch)
    assert urgent.priority is Priority.URGENT
    # the urgent fetch goes beyond the budget (60 + 16 of 64 pages in flight)
    assert tracker.process(R).inflight.total == 76 * P
    assert _install(tracker, fetches[0], 1.1) == []
    assert _install(tracker, urgent, 1.2) == []  # 56 + 16 pages would not fit yet
    # once there is room, the sweep goes on at its full chunk size
    more = _install(tracker, fetches[1], 1.3)
    assert [(f.image_addr // P, f.length // P) for f in more] == [(60, 16)]


def test_latency_histogram_uses_power_of_two_microsecond_buckets() -> None:
    histogram = LatencyHistogram()
    assert histogram.quantile(0.5) is None
    for seconds in [0.0000005, 0.000003, 0.000003, 0.0001, 0.01]:
        histogram.record(seconds)
    assert histogram.count == 5
    assert histogram.buckets[0] == 1  # < 2 us
    assert histogram.buckets[1] == 2  # [2, 4) us
    assert histogram.buckets[6] == 1  # 100 us in [64, 128)
    assert histogram.buckets[13] == 1  # 10 ms in [8192, 16384) us
    assert histogram.quantile(0.5) == pytest.approx(4e-6)
    assert histogram.quantile(0.99) == pytest.approx(16384e-6)
    other = LatencyHistogram()
    other.record(1.0)
    histogram.merge(other)
    assert histogram.count == 6
    assert histogram.quantile(1.0) == pytest.approx(2**20 / 1e6)


def test_progress_fraction() -> None:
    assert Progress(0, 0).fraction == 1.0
    assert Progress(1, 4).fraction == 0.25


# -- what C executes: the fault plan and the chunk rule -----------------------------------

DATA = [(0x10000, 0x13000), (0x14000, 0x15000), (0x1F000, 0x22000)]
ZEROS = [(0x13000, 0x14000), (0x15000, 0x1F000)]
"""A 64 KiB block at 0x10000: data 0x10000-0x13000, zero, data, zero..., data from
0x1F000 on into the next block."""


def spans(plan: FaultPlan, page: int) -> list[tuple[int, int, bool, int]]:
    return [(s.start, s.end, s.zero, s.table) for s in plan_fault(plan, DATA, ZEROS, page)]


def test_the_fault_plan_gives_whole_blocks_only_where_answers_cost_a_round_trip() -> None:
    policy = Policy(fault_around=16 * P)
    assert policy.fault_plan(round_trip=True) == FaultPlan(16 * P, whole_block=True)
    assert policy.fault_plan(round_trip=False) == FaultPlan(16 * P, whole_block=False)
    assert Policy(whole_block=False).fault_plan(round_trip=True).whole_block is False


def test_a_data_fault_gets_its_block_clipped_to_its_row() -> None:
    plan = FaultPlan(16 * P, whole_block=False)
    assert spans(plan, 0x11000) == [(0x10000, 0x13000, False, 0)]
    # the row reaches into the next block: only this block's part
    assert spans(plan, 0x1F000) == [(0x1F000, 0x20000, False, 2)]
    assert spans(plan, 0x21000) == [(0x20000, 0x22000, False, 2)]


def test_a_whole_block_brings_the_other_data_rows_then_the_zero_rows() -> None:
    plan = FaultPlan(16 * P, whole_block=True)
    assert spans(plan, 0x14000) == [
        (0x14000, 0x15000, False, 1),  # the fault's own, first
        (0x10000, 0x13000, False, 0),
        (0x1F000, 0x20000, False, 2),
        (0x13000, 0x14000, True, 0),
        (0x15000, 0x1F000, True, 1),
    ]


def test_a_zero_fault_gets_its_zero_span_only() -> None:
    for whole in (False, True):
        plan = FaultPlan(16 * P, whole_block=whole)
        assert spans(plan, 0x16000) == [(0x15000, 0x1F000, True, 1)]


def test_a_page_in_neither_table_is_the_cores() -> None:
    assert spans(FaultPlan(16 * P, whole_block=True), 0x30000) == []


def test_chunks_cut_data_and_take_zero_extents_whole() -> None:
    assert chunk_length(3 * MiB, MiB, zero=False) == MiB
    assert chunk_length(100 * P, MiB, zero=False) == 100 * P
    assert chunk_length(3 * MiB, MiB, zero=True) == 3 * MiB


def test_a_fault_on_a_page_being_installed_asks_for_that_install_first() -> None:
    tracker = Tracker(Policy(fault_around=4 * P))
    region = LazyRegion(RunAddr(0x10000), ImageAddr(0x10000), 4 * P)
    tracker.add_process(R, "img", [region], [(0x10000, 4 * P)], 0.0)
    [fetch] = tracker.handle_uffd(R, [PageFault(RunAddr(0x10000))], 1.0)
    assert isinstance(fetch, Fetch)
    arrived = tracker.handle(PagesArrived(fetch.request_id, fetch.image_addr, 4 * P, b""), 1.1)
    assert [a for a in arrived if isinstance(a, Copy)]  # the copy is out, not ended yet
    actions = tracker.handle_uffd(R, [PageFault(RunAddr(0x12000))], 1.2)
    assert actions == [Expedite(R, RunAddr(0x12000))]
