"""The core's side of answering faults in C: ``fast_ranges``, ``Delegate``, ``FastServed``.

Why separate from test_process.py: these rules are the contract between the core and a
shell that answers faults itself; each is pinned here with exact expectations (the
state machine in test_tracker_machine.py explores their interleavings).
"""

from __future__ import annotations

from support.core_pages import POLICY, P, R, img, run

from uffdd.core.actions import Action, CancelFetch, Copy, Delegate, Fetch, Release
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import (
    EventsDrained,
    FastServed,
    Fork,
    InstallOutcome,
    InstallResult,
    PageFault,
    PagesArrived,
    ProcId,
    Remap,
    Remove,
    UffdEvent,
    Unmap,
)
from uffdd.core.process import LazyRegion
from uffdd.core.stats import LatencyHistogram
from uffdd.core.tracker import Tracker


def make(
    data_pages: range | list[int] = range(16), *, handed_over: bool = False, huge: bool = False
) -> Tracker:
    tracker = Tracker(POLICY)
    data = [(int(img(p)), P) for p in data_pages]
    regions = [LazyRegion(run(0), img(0), 16 * P)]
    if huge:
        regions.append(LazyRegion(RunAddr(0x400000), ImageAddr(0x400000), 2 << 20, 2 << 20))
        data.append((0x400000, 2 << 20))
    tracker.add_process(R, "img", regions, data, 0.0, handed_over=handed_over)
    return tracker


def served(*installs: tuple[int, int], faults: int = 1, at: float = 1.0) -> FastServed:
    return FastServed(R, tuple((RunAddr(a), n) for a, n in installs), faults, at)


def test_fast_ranges_are_the_data_pages_of_base_page_pieces() -> None:
    tracker = make(data_pages=[0, 1, 2, 5, 6, 15], huge=True)
    # zero pages (3, 4, 7..14) and the huge-page region are the core's business
    assert tracker.process(R).fast_ranges() == [
        (run(0), img(0), 3 * P),
        (run(5), img(5), 2 * P),
        (run(15), img(15), P),
    ]


def delegations(actions: list[Action]) -> list[Delegate]:
    return [a for a in actions if isinstance(a, Delegate)]


def test_a_process_starts_with_a_delegation() -> None:
    tracker = Tracker(POLICY)
    regions = [LazyRegion(run(0), img(0), 16 * P)]
    actions = tracker.add_process(R, "img", regions, [(int(img(0)), 16 * P)], 0.0)
    assert delegations(actions) == [Delegate(R)]


def test_removed_pages_leave_the_fast_ranges_and_the_delegation_is_renewed() -> None:
    tracker = make()
    process = tracker.process(R)
    actions = tracker.handle_uffd(R, [Remove(run(2), run(4))], 1.0)
    assert delegations(actions) == [Delegate(R)]
    assert process.fast_ranges() == [(run(0), img(0), 2 * P), (run(4), img(4), 12 * P)]


def test_zero_ranges_are_the_known_zero_and_removed_pages_of_base_page_pieces() -> None:
    tracker = make(data_pages=[0, 1, 2, 5, 6, 15], huge=True)
    process = tracker.process(R)
    # the image's zero pages; the huge-page region stays the core's business
    assert process.zero_ranges() == [(run(3), 2 * P), (run(7), 8 * P)]
    tracker.handle_uffd(R, [Remove(run(1), run(2))], 1.0)
    assert process.zero_ranges() == [(run(1), P), (run(3), 2 * P), (run(7), 8 * P)]
    assert (run(1), img(1), P) not in process.fast_ranges()


def test_remap_and_unmap_move_the_fast_ranges_with_the_map() -> None:
    tracker = make()
    process = tracker.process(R)
    remapped = tracker.handle_uffd(R, [Remap(run(0), RunAddr(0x900000), 4 * P)], 1.0)
    unmapped = tracker.handle_uffd(R, [Unmap(run(8), run(16))], 1.1)
    assert delegations(remapped) == delegations(unmapped) == [Delegate(R)]
    assert process.fast_ranges() == [
        (run(4), img(4), 4 * P),
        (RunAddr(0x900000), img(0), 4 * P),
    ]


def test_faults_and_drains_leave_the_delegation_alone() -> None:
    tracker = make()
    actions = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    actions += tracker.handle(EventsDrained(R), 1.1)
    actions += tracker.handle_uffd(R, [served((run(8), 4 * P))], 1.2)
    assert delegations(actions) == []


def test_one_delegation_per_batch_however_many_layout_events() -> None:
    tracker = make()
    batch: list[UffdEvent] = [
        Remove(run(2), run(4)),
        Unmap(run(8), run(10)),
        Remove(run(12), run(13)),
    ]
    assert delegations(tracker.handle_uffd(R, batch, 1.0)) == [Delegate(R)]


def test_fast_served_pages_are_resident_and_counted() -> None:
    tracker = make()
    assert tracker.handle_uffd(R, [served((run(0), 4 * P), faults=2, at=1.0)], 1.00001) == []
    process = tracker.process(R)
    assert process.stats.faults == 2
    assert process.stats.latency.count == 2
    assert process.stats.data_installed == 4 * P
    assert not process.missing.overlaps(img(0), img(4))
    # a later fault there (a stale one) only wakes: nothing is fetched again
    actions = tracker.handle_uffd(R, [PageFault(run(1))], 2.0)
    assert not [a for a in actions if isinstance(a, Fetch)]


def test_fast_served_pages_in_flight_cancel_the_fetch_and_late_data_does_nothing() -> None:
    tracker = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    # the slow path fetched pages 0..3; then the chunk verified and C served them
    actions = tracker.handle_uffd(R, [served((run(0), 4 * P))], 1.1)
    assert actions == [CancelFetch(fetch.request_id)]
    assert tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "late"), 1.2) == []
    process = tracker.process(R)
    assert process.stats.data_installed == 4 * P
    # the thread blocked on page 1 was woken by C's copy: its latency counts
    assert process.stats.latency.count == 2


def test_a_deferred_copy_of_fast_served_pages_is_not_retried() -> None:
    tracker = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    [copy] = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.1)
    assert isinstance(copy, Copy)
    tracker.handle(InstallOutcome(R, copy.install_id, InstallResult.RETRY, 0), 1.2)
    assert tracker.process(R).deferred == 1
    # C served two of the four pages meanwhile: the retry covers only the others
    tracker.handle_uffd(R, [served((run(0), 2 * P))], 1.3)
    [retry] = tracker.handle(EventsDrained(R), 1.4)
    assert isinstance(retry, Copy)
    assert (retry.run_addr, retry.length, retry.data_offset) == (run(2), 2 * P, 2 * P)


def test_fast_served_to_full_residency_releases_after_the_rest_of_the_batch() -> None:
    tracker = make(data_pages=range(8), handed_over=True)
    sweeps = set(tracker.process(R).requests)
    # C fills everything; a fork read right after it is still followed, then both go
    actions = tracker.handle_uffd(R, [served((run(0), 8 * P)), Fork(77)], 1.0)
    kinds = [type(a).__name__ for a in actions]
    assert kinds[:3] == ["AdoptChild", "Release", "Release"], kinds
    assert {a.request_id for a in actions if isinstance(a, CancelFetch)} == sweeps
    assert {a.proc for a in actions if isinstance(a, Release)} == {R, ProcId("r.1")}


def test_fast_served_ends_only_the_requests_it_leaves_with_nothing_in_flight() -> None:
    tracker = make()
    [first] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)  # pages 0..3
    [second] = tracker.handle_uffd(R, [PageFault(run(9))], 1.0)  # pages 8..11
    assert isinstance(first, Fetch)
    assert isinstance(second, Fetch)
    # C put pages 0..3 and 8..9 in: the first request is moot, the second still waits
    actions = tracker.handle_uffd(R, [served((run(0), 4 * P), (run(8), 2 * P))], 1.1)
    assert actions == [CancelFetch(first.request_id)]
    assert set(tracker.process(R).requests) == {second.request_id}
    # its answer installs only the pages C did not
    copies = [
        a
        for a in tracker.handle(PagesArrived(second.request_id, img(8), 4 * P, bytes(4 * P)), 1.2)
        if isinstance(a, Copy)
    ]
    assert [(c.run_addr, c.length) for c in copies] == [(run(10), 2 * P)]


def test_a_late_report_counts_the_time_c_took_not_the_time_the_core_heard() -> None:
    tracker = make()
    # C read the fault at 1.0 and answered it at 1.0002; the core hears of it at 5.0
    event = FastServed(R, ((RunAddr(run(0)), 4 * P),), 1, 1.0, 1.0002)
    tracker.handle_uffd(R, [event], 5.0)
    took = LatencyHistogram()
    took.record(1.0002 - 1.0)  # the 200 us C took, not the 4 s the report waited
    assert tracker.process(R).stats.latency == took


def test_an_ended_process_delegates_nothing_more() -> None:
    """Its Kill (or Release) ends what the shell delegated: no Delegate follows it."""
    tracker = make()
    actions = tracker.kill_tree(R, "page server gone", 1.0)
    assert [type(a).__name__ for a in actions] == ["Kill"]
    assert tracker.process(R).fast_ranges() == []
    assert tracker.process(R).zero_ranges() == []
