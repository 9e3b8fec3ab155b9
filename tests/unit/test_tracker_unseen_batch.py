"""An install outcome taken while the shell holds a batch the core has not seen.

The executor fences a uffd whose read returned a layout event and feeds the core the
outcomes of that process's background copies before the batch. Such an outcome can
complete the restore; the batch may still hold faults (on zero or removed pages) that
need an answer, so a ``BatchHeld`` event holds the release until the batch is in.
(Found by the state machine: "released r with a fault at 0x10000 unanswered".)
"""

from __future__ import annotations

from uffdd.core.actions import AdoptChild, Copy, Fetch, Release, ZeroFill
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import (
    BatchHeld,
    Fork,
    InstallOutcome,
    InstallResult,
    PageFault,
    PagesArrived,
    ProcId,
)
from uffdd.core.policy import Policy
from uffdd.core.process import LazyRegion
from uffdd.core.tracker import Tracker

P = 4096
PROC = ProcId("p")
REGION = LazyRegion(RunAddr(0x10 * P), ImageAddr(0x100 * P), 2 * P)  # data, then zero


def _copy_outstanding(tracker: Tracker) -> Copy:
    actions = tracker.add_process(PROC, "img", [REGION], [(0x100 * P, P)], 0.0, handed_over=True)
    (fetch,) = [a for a in actions if isinstance(a, Fetch)]
    arrived = tracker.handle(PagesArrived(fetch.request_id, fetch.image_addr, P, b"x" * P), 0.0)
    (copy,) = [a for a in arrived if isinstance(a, Copy)]
    return copy


def test_no_release_before_the_held_batch_and_its_faults_are_answered() -> None:
    tracker = Tracker(Policy(fault_around=P))
    copy = _copy_outstanding(tracker)
    # read: [fault on the zero page, fork]; the copy ran before
    assert tracker.handle(BatchHeld(PROC), 0.0) == []
    done = InstallOutcome(PROC, copy.install_id, InstallResult.DONE, P)
    assert not any(isinstance(a, Release) for a in tracker.handle(done, 0.0))
    batch = tracker.handle_uffd(PROC, [PageFault(RunAddr(0x11 * P))], 0.0)
    (fill,) = [a for a in batch if isinstance(a, ZeroFill)]
    assert fill.run_addr == 0x11 * P
    assert not any(isinstance(a, Release) for a in batch)  # the fill is still out
    filled = InstallOutcome(PROC, fill.install_id, InstallResult.DONE, P)
    assert Release(PROC) in tracker.handle(filled, 0.0)


def test_without_a_held_batch_the_outcome_releases_at_once() -> None:
    tracker = Tracker(Policy(fault_around=P))
    copy = _copy_outstanding(tracker)
    done = InstallOutcome(PROC, copy.install_id, InstallResult.DONE, P)
    assert Release(PROC) in tracker.handle(done, 0.0)


def test_a_held_batch_with_a_fork_adopts_the_child_first() -> None:
    tracker = Tracker(Policy(fault_around=P))
    copy = _copy_outstanding(tracker)
    assert tracker.handle(BatchHeld(PROC), 0.0) == []
    tracker.handle(InstallOutcome(PROC, copy.install_id, InstallResult.DONE, P), 0.0)
    actions = tracker.handle_uffd(PROC, [Fork(child_fd=99)], 0.0)
    # The child is adopted first; the parent had everything at the fork, so both go.
    assert actions == [
        AdoptChild(PROC, ProcId("p.1"), 99),
        Release(ProcId("p.1")),
        Release(PROC),
    ]
