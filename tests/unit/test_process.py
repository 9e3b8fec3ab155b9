"""The ordering rules of LazyProcess and Tracker, one named scenario each.

The state machine in test_tracker_machine.py explores interleavings; these pin down the
individual rules (and document them) with exact expected actions.
"""

from __future__ import annotations

from typing import TypeVar

import pytest
from support.core_pages import IMG, POLICY, RUN, P, R, img, run

from uffdd.core.actions import (
    Action,
    AdoptChild,
    CancelFetch,
    Copy,
    Delegate,
    Fetch,
    Kill,
    Priority,
    Release,
    Wake,
    ZeroFill,
)
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import (
    EventsDrained,
    Exited,
    FastServed,
    FetchFailed,
    Fork,
    HandoverComplete,
    InstallOutcome,
    InstallResult,
    PageFault,
    PagesArrived,
    ProcId,
    Remap,
    Remove,
    Tick,
    Unmap,
)
from uffdd.core.policy import Policy
from uffdd.core.process import LazyProcess, LazyRegion, State
from uffdd.core.tracker import Tracker

T = TypeVar("T")


def make(
    data_pages: range | list[int] = range(16),
    *,
    pages: int = 16,
    handed_over: bool = False,
    policy: Policy = POLICY,
) -> tuple[Tracker, list[Action]]:
    tracker = Tracker(policy)
    data = [(int(img(p)), P) for p in data_pages]
    actions = tracker.add_process(
        R, "img", [LazyRegion(run(0), img(0), pages * P)], data, 0.0, handed_over=handed_over
    )
    return tracker, actions


def only(actions: list[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def done(tracker: Tracker, action: Copy | ZeroFill, now: float = 1.0) -> list[Action]:
    outcome = InstallOutcome(action.proc, action.install_id, InstallResult.DONE, action.length)
    return tracker.handle(outcome, now)


def test_a_fault_on_a_zero_page_zero_fills_its_window_at_once() -> None:
    tracker, _ = make(data_pages=[])
    [zero] = tracker.handle_uffd(R, [PageFault(RunAddr(run(3) + 123))], 1.0)
    assert isinstance(zero, ZeroFill)
    # the aligned fault-around window (4 pages here), like a data fault's
    assert zero == ZeroFill(R, zero.install_id, run(0), 4 * P, P)
    assert tracker.process(R).stats.faults == 1


def test_a_zero_window_stops_at_data_and_goes_on_past_a_present_page() -> None:
    tracker, _ = make(data_pages=[0])
    [zero] = tracker.handle_uffd(R, [PageFault(run(2))], 1.0)
    assert isinstance(zero, ZeroFill)
    assert zero == ZeroFill(R, zero.install_id, run(1), 3 * P, P)
    # page 2 was present already (the kernel did page 1, then met page 2)
    outcome = InstallOutcome(R, zero.install_id, InstallResult.RETRY, P)
    [rest] = tracker.handle(outcome, 1.1)
    assert isinstance(rest, ZeroFill)
    assert rest == ZeroFill(R, rest.install_id, run(2), 2 * P, P)
    outcome = InstallOutcome(R, rest.install_id, InstallResult.EXISTS, 0)
    [last] = [a for a in tracker.handle(outcome, 1.2) if isinstance(a, ZeroFill)]
    assert last == ZeroFill(R, last.install_id, run(3), P, P)


def test_grown_memory_is_zero_filled_forward_to_the_block_end_short_of_a_piece() -> None:
    # the lazy region starts at page 2; pages 0-1 and 16 on were never in the image
    tracker = Tracker(POLICY)
    data = [(int(img(p)), P) for p in range(14)]
    tracker.add_process(R, "img", [LazyRegion(run(2), img(0), 14 * P)], data, 0.0)
    [below] = only(tracker.handle_uffd(R, [PageFault(run(0))], 1.0), ZeroFill)
    assert below == ZeroFill(R, below.install_id, run(0), 2 * P, P)  # not into page 2
    [above] = only(tracker.handle_uffd(R, [PageFault(run(17))], 1.1), ZeroFill)
    assert above == ZeroFill(R, above.install_id, run(17), 3 * P, P)  # to the block's end
    # a fill the kernel refuses as a whole (past the mapping's end): half as far next
    # time, down to a page
    refused = InstallOutcome(R, above.install_id, InstallResult.LAYOUT_CHANGED, 0)
    assert only(tracker.handle(refused, 1.2), Wake)
    [shorter] = only(tracker.handle_uffd(R, [PageFault(run(17))], 1.3), ZeroFill)
    assert shorter == ZeroFill(R, shorter.install_id, run(17), P, P)  # 3 pages -> 1


def test_a_deferred_zero_window_resolves_every_waiting_page() -> None:
    tracker, _ = make(data_pages=[])
    # two threads in one window: one fill answers both
    [zero] = tracker.handle_uffd(R, [PageFault(run(1)), PageFault(run(3))], 1.0)
    assert isinstance(zero, ZeroFill)
    assert zero == ZeroFill(R, zero.install_id, run(0), 4 * P, P)
    assert tracker.handle(InstallOutcome(R, zero.install_id, InstallResult.RETRY, 0), 1.1) == []
    # deferred (events queued): after the drain each waiting page is resolved again
    # (the first new fill covers the second page, so one fill goes)
    [again] = tracker.handle(EventsDrained(R), 1.2)
    assert isinstance(again, ZeroFill)
    assert again == ZeroFill(R, again.install_id, run(0), 4 * P, P)
    outcome = InstallOutcome(R, again.install_id, InstallResult.DONE, 4 * P)
    assert only(tracker.handle(outcome, 1.3), Wake) == []  # the kernel woke both


def test_a_fault_on_data_fetches_the_aligned_window_urgently() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(5))], 1.0)
    assert isinstance(fetch, Fetch)
    assert (fetch.image_addr, fetch.length, fetch.priority) == (img(4), 4 * P, Priority.URGENT)


def test_fault_around_is_clipped_to_what_is_still_missing() -> None:
    tracker, _ = make(data_pages=[0, 1, 3])  # page 2 is zero: the window stops there
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    assert (fetch.image_addr, fetch.length) == (img(0), 2 * P)
    # page 3 is missing still; a fault there fetches it alone
    [fetch] = tracker.handle_uffd(R, [PageFault(run(3))], 1.1)
    assert isinstance(fetch, Fetch)
    assert (fetch.image_addr, fetch.length) == (img(3), P)


def test_duplicate_faults_wait_for_the_same_fetch_and_are_all_woken() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1)), PageFault(run(1))], 1.0)
    assert tracker.handle_uffd(R, [PageFault(run(2))], 1.5) == []  # in flight: no refetch
    assert isinstance(fetch, Fetch)
    copies = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "buf"), 2.0)
    [copy] = copies
    assert isinstance(copy, Copy)
    assert copy == Copy(R, copy.install_id, run(0), img(0), 4 * P, "buf", 0, dontwake=False)
    assert done(tracker, copy, 2.5) == []
    latency = tracker.process(R).stats.latency
    assert latency.count == 3  # every fault was answered by the one copy
    summary = tracker.summary(R, 3.0)
    assert summary.faults == 3
    assert summary.bytes_resident == 4 * P
    assert summary.latency_p99 is not None
    assert summary.latency_p99 >= 1.5


def test_data_arriving_after_a_remove_is_never_installed() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    actions = tracker.handle_uffd(R, [Remove(run(0), run(4))], 1.1)
    # the blocked thread is woken to fault again, C gets the new tables, and the request
    # is cancelled
    assert actions == [Wake(R, run(1), P), Delegate(R), CancelFetch(fetch.request_id)]
    assert tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "late"), 1.2) == []
    [zero] = tracker.handle_uffd(R, [PageFault(run(1))], 1.3)
    assert isinstance(zero, ZeroFill)
    assert (zero.run_addr, zero.length) == (run(0), 4 * P)  # the removed window


def test_a_remove_of_part_of_a_request_keeps_the_rest() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    assert tracker.handle_uffd(R, [Remove(run(2), run(3))], 1.1) == [Delegate(R)]
    copies = only(tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.2), Copy)
    assert [(c.run_addr, c.length, c.data_offset) for c in copies] == [
        (run(0), 2 * P, 0),
        (run(3), P, 3 * P),
    ]


def test_an_unmap_drops_ranges_and_in_flight_work() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    actions = tracker.handle_uffd(R, [Unmap(run(0), run(8))], 1.1)
    assert actions == [Wake(R, run(1), P), Delegate(R), CancelFetch(fetch.request_id)]
    assert tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "late"), 1.2) == []
    # a stale fault on the unmapped address: zero fill fails, the thread is woken
    [zero] = tracker.handle_uffd(R, [PageFault(run(1))], 1.3)
    assert isinstance(zero, ZeroFill)
    outcome = InstallOutcome(R, zero.install_id, InstallResult.LAYOUT_CHANGED)
    assert tracker.handle(outcome, 1.4) == [Wake(R, run(1), P)]
    assert tracker.process(R).map.total == 8 * P


def test_data_arriving_after_a_remap_goes_to_the_new_address() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    new = RunAddr(0x800000)
    actions = tracker.handle_uffd(R, [Remap(run(0), new, 2 * P)], 1.1)
    # the thread waits on an address now gone; C gets the moved tables
    assert actions == [Wake(R, run(1), P), Delegate(R)]
    copies = only(tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.2), Copy)
    assert [(c.run_addr, c.image_addr, c.length) for c in copies] == [
        (new, img(0), 2 * P),
        (run(2), img(2), 2 * P),
    ]


def test_a_remap_wakes_threads_waiting_at_the_displaced_destination() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(9))], 1.0)
    assert isinstance(fetch, Fetch)
    actions = tracker.handle_uffd(R, [Remap(run(0), run(9), P)], 1.1)
    assert Wake(R, run(9), P) in actions
    # page 9 now holds image page 0; image page 9 is gone
    piece = tracker.process(R).map.lookup(run(9))
    assert piece is not None
    assert piece.to_image(run(9)) == img(0)


def test_faults_in_a_batch_are_answered_against_the_layout_after_the_batch() -> None:
    # page 5 is zero, page 0 is data; the fault on 5 is read together with a remap
    # that moves page 0 onto 5: zero-filling 5 now would destroy data
    tracker, _ = make(data_pages=[0])
    actions = tracker.handle_uffd(R, [PageFault(run(5)), Remap(run(0), run(5), P)], 1.0)
    assert not only(actions, ZeroFill)
    assert only(actions, Wake) == [Wake(R, run(5), P)]


def test_fork_children_inherit_requests_and_data_is_installed_in_both() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    child = ProcId("r.1")
    # the child is adopted, then C gets its tables and the parent's (a fork changes them)
    assert tracker.handle_uffd(R, [Fork(42)], 1.1) == [
        AdoptChild(R, child, 42),
        Delegate(child),
        Delegate(R),
    ]
    assert tracker.parent(child) == R
    assert tracker.root(child) == R
    # the child removes one of the pages before the data comes
    tracker.handle_uffd(child, [Remove(run(0), run(1))], 1.2)
    copies = only(tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.3), Copy)
    assert sorted((c.proc, c.run_addr, c.length) for c in copies) == [
        (R, run(0), 4 * P),
        (child, run(1), 3 * P),
    ]


def test_a_deferred_copy_is_inherited_by_a_fork_child() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    [copy] = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.1)
    assert isinstance(copy, Copy)
    tracker.handle(InstallOutcome(R, copy.install_id, InstallResult.RETRY, 0), 1.2)
    actions = tracker.handle_uffd(R, [Fork(7)], 1.3)
    assert isinstance(actions[0], AdoptChild)
    # the child's uffd is fresh: its copy goes at once
    [child_copy] = only(actions, Copy)
    assert (child_copy.proc, child_copy.run_addr, child_copy.data) == ("r.1", run(0), "d")
    [retry] = tracker.handle(EventsDrained(R), 1.4)
    assert isinstance(retry, Copy)
    assert (retry.proc, retry.run_addr, retry.length) == (R, run(0), 4 * P)


def test_eagain_defers_until_the_events_are_drained() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(1))], 1.0)
    assert isinstance(fetch, Fetch)
    [copy] = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.1)
    assert isinstance(copy, Copy)
    assert tracker.handle(InstallOutcome(R, copy.install_id, InstallResult.RETRY, 0), 1.2) == []
    assert tracker.process(R).deferred == 1
    # the queued event is a remove of page 3: the retry must skip it
    tracker.handle_uffd(R, [Remove(run(3), run(4))], 1.3)
    [retry] = tracker.handle(EventsDrained(R), 1.4)
    assert isinstance(retry, Copy)
    assert (retry.run_addr, retry.length, retry.data_offset) == (run(0), 3 * P, 0)


def test_a_tick_retries_a_deferred_install_when_no_drain_comes() -> None:
    tracker, _ = make()
    [zero] = tracker.handle_uffd(R, [PageFault(RunAddr(0x900000))], 1.0)
    assert isinstance(zero, ZeroFill)
    tracker.handle(InstallOutcome(R, zero.install_id, InstallResult.RETRY, 0), 1.0)
    assert tracker.next_wakeup() == pytest.approx(1.0 + POLICY.retry_interval)
    assert tracker.handle(Tick(), 1.0 + POLICY.retry_interval / 2) == []
    [again] = tracker.handle(Tick(), 1.0 + POLICY.retry_interval)
    assert isinstance(again, ZeroFill)
    assert again.run_addr == 0x900000


def test_a_partial_copy_goes_on_and_eexist_counts_as_resident() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(3))], 1.0)
    assert isinstance(fetch, Fetch)
    [copy] = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.1)
    assert isinstance(copy, Copy)
    # one page done, then a present page: go on at once from page 1
    [rest] = tracker.handle(InstallOutcome(R, copy.install_id, InstallResult.RETRY, P), 1.2)
    assert isinstance(rest, Copy)
    assert (rest.run_addr, rest.length, rest.data_offset) == (run(1), 3 * P, P)
    # page 1 is present: resident; the rest goes on
    [last] = tracker.handle(InstallOutcome(R, rest.install_id, InstallResult.EXISTS, 0), 1.3)
    assert isinstance(last, Copy)
    assert (last.run_addr, last.length, last.data_offset) == (run(2), 2 * P, 2 * P)
    # page 3 (the fault) present too: its waiter is woken by us, not by the kernel
    outcome = InstallOutcome(R, last.install_id, InstallResult.EXISTS, P)
    assert tracker.handle(outcome, 1.4) == [Wake(R, run(3), P)]
    process = tracker.process(R)
    assert not process.installing
    assert process.stats.latency.count == 1


def test_enoent_over_and_over_kills_rather_than_guess() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    [copy] = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.1)
    kills: list[Kill] = []
    for attempt in range(POLICY.max_layout_retries + 1):
        assert isinstance(copy, Copy), attempt
        outcome = InstallOutcome(R, copy.install_id, InstallResult.LAYOUT_CHANGED)
        kills = only(tracker.handle(outcome, 1.2), Kill)
        if kills:
            break
        [copy] = tracker.handle(EventsDrained(R), 1.3)
    assert kills
    assert "ENOENT" in kills[0].reason
    assert tracker.process(R).state is State.KILLED


def test_an_install_finding_the_process_gone_releases_it() -> None:
    tracker, _ = make(data_pages=[])
    [zero] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(zero, ZeroFill)
    outcome = InstallOutcome(R, zero.install_id, InstallResult.GONE)
    assert tracker.handle(outcome, 1.1) == [Release(R, exited=True)]
    assert tracker.complete(R)


def test_exit_cancels_what_only_it_waited_for() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    assert tracker.handle(Exited(R), 1.1) == [
        Release(R, exited=True),
        CancelFetch(fetch.request_id),
    ]
    assert tracker.handle_uffd(R, [PageFault(run(5))], 1.2) == []


def test_release_comes_only_when_nothing_is_missing() -> None:
    tracker, actions = make(data_pages=range(8), handed_over=True)
    fetches = only(actions, Fetch)
    assert [(f.image_addr, f.length, f.priority) for f in fetches] == [
        (img(0), 4 * P, Priority.BULK),
        (img(4), 4 * P, Priority.BULK),
    ]
    [first] = tracker.handle(PagesArrived(fetches[0].request_id, img(0), 4 * P, "a"), 1.0)
    assert isinstance(first, Copy)
    assert first.dontwake  # nobody waits: no wake needed
    assert done(tracker, first, 1.1) == []
    [second] = tracker.handle(PagesArrived(fetches[1].request_id, img(4), 4 * P, "b"), 1.2)
    assert isinstance(second, Copy)
    assert done(tracker, second, 1.5) == [Release(R)]
    assert tracker.complete(R)
    summary = tracker.summary(R, 2.0)
    assert summary.time_to_resident == 1.5
    assert summary.bytes_resident == summary.bytes_total == 8 * P
    assert tracker.progress().fraction == 1.0


def test_nothing_is_released_before_the_handover_completes() -> None:
    tracker, actions = make(data_pages=[])
    assert actions == [Delegate(R)]
    assert tracker.handle(HandoverComplete(R), 1.0) == [Release(R)]


def test_a_failed_fetch_kills_the_whole_tree() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    tracker.handle_uffd(R, [Fork(5)], 1.1)
    actions = tracker.handle(FetchFailed(fetch.request_id, "server gone"), 1.2)
    kills = only(actions, Kill)
    assert sorted(k.proc for k in kills) == [R, "r.1"]
    assert all("server gone" in k.reason for k in kills)
    assert tracker.complete(R)
    assert tracker.requests_in_flight() == 0


def test_a_fetch_past_its_deadline_kills() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    deadline = 1.0 + POLICY.urgent_deadline
    assert tracker.next_wakeup() == deadline
    assert tracker.handle(Tick(), deadline - 0.1) == []
    [kill] = tracker.handle(Tick(), deadline)
    assert isinstance(kill, Kill)
    assert "deadline" in kill.reason


def test_the_next_wakeup_is_the_earliest_deadline_of_a_request_still_out() -> None:
    tracker, _ = make()
    [first] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    [second] = tracker.handle_uffd(R, [PageFault(run(8))], 2.0)
    assert isinstance(first, Fetch)
    assert isinstance(second, Fetch)
    assert tracker.next_wakeup() == 1.0 + POLICY.urgent_deadline
    copies = only(
        tracker.handle(PagesArrived(first.request_id, img(0), first.length, "d"), 2.5), Copy
    )
    assert copies
    # the answered request's deadline no longer counts; the other's does
    assert tracker.next_wakeup() == 2.0 + POLICY.urgent_deadline
    tracker.handle(PagesArrived(second.request_id, img(8), second.length, "d"), 3.0)
    assert tracker.next_wakeup() is None


def test_data_outside_the_request_kills_instead_of_installing() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    [kill] = tracker.handle(PagesArrived(fetch.request_id, img(2), 4 * P, "bad"), 1.1)
    assert isinstance(kill, Kill)
    assert "outside" in kill.reason


def test_late_and_duplicate_data_is_ignored() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    [copy] = tracker.handle(PagesArrived(fetch.request_id, img(0), 2 * P, "a"), 1.1)
    assert isinstance(copy, Copy)
    assert tracker.handle(PagesArrived(fetch.request_id, img(0), 2 * P, "a"), 1.2) == []
    [rest] = tracker.handle(PagesArrived(fetch.request_id, img(2), 2 * P, "b"), 1.3)
    assert isinstance(rest, Copy)
    assert tracker.requests_in_flight() == 0
    assert tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "c"), 1.4) == []


def test_huge_pages_are_fetched_and_zero_filled_whole() -> None:
    huge = 2 * 1024 * 1024
    tracker = Tracker(POLICY)
    regions = [LazyRegion(RunAddr(0x40000000), ImageAddr(0x80000000), 4 * huge, huge)]
    tracker.add_process(R, "img", regions, [(0x80000000, huge)], 0.0)
    [fetch] = tracker.handle_uffd(R, [PageFault(RunAddr(0x40000000 + 5 * P))], 1.0)
    assert isinstance(fetch, Fetch)
    assert (fetch.image_addr, fetch.length) == (0x80000000, huge)
    [zero] = tracker.handle_uffd(R, [PageFault(RunAddr(0x40000000 + huge + P))], 1.1)
    assert isinstance(zero, ZeroFill)
    assert zero == ZeroFill(R, zero.install_id, RunAddr(0x40000000 + huge), huge, huge)


def test_regions_must_be_page_aligned_and_disjoint() -> None:
    with pytest.raises(ValueError, match="aligned"):
        LazyProcess(R, "i", [LazyRegion(RunAddr(RUN + 1), img(0), P)], [], 0.0)
    with pytest.raises(ValueError, match="overlaps"):
        LazyProcess(
            R,
            "i",
            [LazyRegion(run(0), img(0), 2 * P), LazyRegion(run(8), img(1), P)],
            [],
            0.0,
        )
    with pytest.raises(ValueError, match="splits a page"):
        LazyProcess(R, "i", [LazyRegion(run(0), img(0), P)], [(IMG + 1, 100)], 0.0)
    tracker, _ = make()
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add_process(R, "img", [], [], 0.0)


def test_the_shell_can_kill_a_tree_and_orphaned_requests_are_cancelled() -> None:
    tracker, _ = make()
    [fetch] = tracker.handle_uffd(R, [PageFault(run(0))], 1.0)
    assert isinstance(fetch, Fetch)
    tracker.handle_uffd(R, [Fork(5)], 1.1)
    actions = tracker.kill_tree(ProcId("r.1"), "restorer died", 1.2)
    assert sorted(a.proc for a in only(actions, Kill)) == [R, "r.1"]
    assert only(actions, CancelFetch) == [CancelFetch(fetch.request_id)]
    assert tracker.live() == []
    assert tracker.kill_tree(R, "again", 1.3) == []


def test_without_the_sweep_only_faults_fetch_and_nothing_is_released() -> None:
    quiet = Policy(fault_around=4 * P, bulk_min=4 * P, bulk_max=16 * P, sweep=False)
    tracker, actions = make(handed_over=True, policy=quiet)
    assert only(actions, Fetch) == []
    [fetch] = tracker.handle_uffd(R, [PageFault(run(5))], 1.0)
    assert isinstance(fetch, Fetch)
    assert fetch.priority is Priority.URGENT
    # The same process with the sweep on streams the rest at once.
    _, swept = make(handed_over=True)
    assert [f.priority for f in only(swept, Fetch)] == [Priority.BULK] * len(only(swept, Fetch))
    assert only(swept, Fetch)


def test_a_fault_on_a_page_only_the_sweep_asked_for_asks_again_urgently() -> None:
    tracker, actions = make(handed_over=True)
    [bulk] = [f for f in only(actions, Fetch) if f.image_addr <= img(5) < f.image_addr + f.length]
    assert bulk.priority is Priority.BULK
    [urgent] = only(tracker.handle_uffd(R, [PageFault(run(5))], 1.0), Fetch)
    assert (urgent.priority, urgent.image_addr, urgent.length) == (Priority.URGENT, img(4), 4 * P)
    # A second fault there waits for that urgent request: no third fetch.
    assert only(tracker.handle_uffd(R, [PageFault(run(6))], 1.0), Fetch) == []
    # The urgent answer installs the pages; the bulk answer then skips them.
    data = bytes(4 * P)
    [copy] = only(tracker.handle(PagesArrived(urgent.request_id, img(4), 4 * P, data), 1.0), Copy)
    assert (copy.run_addr, copy.length) == (run(4), 4 * P)
    done(tracker, copy)
    late = tracker.handle(
        PagesArrived(bulk.request_id, bulk.image_addr, bulk.length, bytes(bulk.length)), 2.0
    )
    installed = {
        page for c in only(late, Copy) for page in range(c.run_addr, c.run_addr + c.length, P)
    }
    assert installed.isdisjoint(range(run(4), run(8), P))  # the urgent answer got them
    assert installed  # the rest of the bulk answer still goes in


def test_the_sweep_reaches_across_zero_gaps_but_only_missing_pages_go_in_flight() -> None:
    # Data on every fourth page, zeros between: one bulk request, not four.
    wide = Policy(fault_around=4 * P, bulk_min=16 * P, bulk_max=16 * P, max_in_flight=32 * P)
    tracker, actions = make(data_pages=[0, 4, 8, 12], handed_over=True, policy=wide)
    [bulk] = only(actions, Fetch)
    assert (bulk.priority, bulk.image_addr, bulk.length) == (Priority.BULK, img(0), 13 * P)
    core = tracker.process(R)
    assert core.inflight.total == 4 * P
    # Zero runs in the answer install nothing; the data pages do.
    copies = only(
        tracker.handle(PagesArrived(bulk.request_id, img(0), 13 * P, bytes(13 * P)), 1.0), Copy
    )
    assert sorted(c.run_addr for c in copies) == [run(0), run(4), run(8), run(12)]


def test_the_sweep_reaches_across_short_resident_runs_but_not_long_ones() -> None:
    # Pages 2-3 and 8-13 are resident (the demand thread put them in) when the sweep
    # starts: it reaches over the two pages, not over the six.
    wide = Policy(
        fault_around=4 * P, bulk_min=32 * P, bulk_max=32 * P, max_in_flight=64 * P,
        resident_gap=2 * P,
    )  # fmt: skip
    tracker, _ = make(data_pages=range(20), pages=20, policy=wide)
    core = tracker.process(R)
    installs = ((run(2), 2 * P), (run(8), 6 * P))
    tracker.handle_uffd(R, [FastServed(R, installs, 0, 1.0)], 1.0)
    fetches = only(tracker.handle(HandoverComplete(R), 1.0), Fetch)
    assert [(f.image_addr, f.length) for f in fetches] == [(img(0), 8 * P), (img(14), 6 * P)]
    # only the missing pages are in flight: the resident ones stay as they are
    assert core.inflight.total == 12 * P


def test_a_fork_child_takes_its_parents_sweep_instead_of_fetching_again() -> None:
    tracker, _ = make(data_pages=range(8), pages=8)
    tracker.handle_uffd(R, [Fork(5)], 1.0)
    child = ProcId("r.1")
    fetches = only(tracker.handle(HandoverComplete(R), 1.1), Fetch)
    # one sweep for the tree: the child holds its own while the parent sweeps
    assert [(f.proc, f.priority, f.image_addr, f.length) for f in fetches] == [
        (R, Priority.BULK, img(0), 4 * P),
        (R, Priority.BULK, img(4), 4 * P),
    ]
    fetch = fetches[0]
    copies = only(tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.2), Copy)
    assert sorted((c.proc, c.run_addr, c.length) for c in copies) == [
        (R, run(0), 4 * P),
        (child, run(0), 4 * P),
    ]
    assert tracker.process(child).installing.total == 4 * P
    assert tracker.process(child).missing.total == 4 * P


def test_a_fork_child_sweeps_what_is_left_once_its_parent_is_done() -> None:
    tracker, _ = make(data_pages=range(8), pages=8)
    tracker.handle_uffd(R, [Fork(5)], 1.0)
    child = ProcId("r.1")
    tracker.handle_uffd(R, [Remove(run(4), run(8))], 1.1)  # the parent drops the tail
    [fetch] = only(tracker.handle(HandoverComplete(R), 1.2), Fetch)
    actions = tracker.handle(PagesArrived(fetch.request_id, img(0), 4 * P, "d"), 1.3)
    parent_copy = next(c for c in only(actions, Copy) if c.proc == R)
    actions = done(tracker, parent_copy, 1.4)
    assert only(actions, Release) == [Release(R, exited=False)]
    # the parent is resident; the child now fetches the tail it still misses itself
    [tail] = only(actions, Fetch)
    assert (tail.proc, tail.image_addr, tail.length) == (child, img(4), 4 * P)


def test_a_finished_tree_is_forgotten() -> None:
    tracker, _ = make(data_pages=[0], pages=1, handed_over=True)
    tracker.handle(Exited(R), 1.0)
    assert tracker.processes() == [R]
    tracker.forget_tree(R)
    assert tracker.processes() == []
    assert tracker.requests_in_flight() == 0
    assert tracker.progress(R).bytes_total == 0
    assert tracker.handle(Exited(R), 1.1) == []
