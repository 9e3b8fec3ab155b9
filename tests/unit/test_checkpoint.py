"""A process taken back after the daemon died knows exactly what the dead one knew.

What a restarted daemon must never get wrong is the layout (where each lazy page is now)
and the zeros (the image's ZERO extents and every range madvise dropped: snapshot data
must never land there again). A checkpoint written after any sequence of layout events
rebuilds both; everything else is missing until the kernel says otherwise.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from support.core_pages import POLICY, RUN, P, R, img, run

from uffdd.core.actions import Fetch, ZeroFill
from uffdd.core.addresses import RunAddr
from uffdd.core.events import Fork, PageFault, ProcId, Remap, Remove, Unmap
from uffdd.core.process import LazyProcess, LazyRegion
from uffdd.core.ranges import RangeSet
from uffdd.core.tracker import Tracker

PAGES = 32
DATA = [(int(img(p)), P) for p in range(PAGES) if p % 5 != 4]  # every 5th page a hole


def _process() -> LazyProcess:
    return LazyProcess(R, "img", [LazyRegion(run(0), img(0), PAGES * P)], DATA, 0.0, policy=POLICY)


def _mapped(process: LazyProcess) -> RangeSet[int]:
    return RangeSet((piece.image, piece.image_end) for piece in process.map)


layout_event = st.one_of(
    st.builds(
        lambda a, n: Remove(run(a), run(a + n)), st.integers(0, PAGES - 1), st.integers(1, 4)
    ),
    st.builds(lambda a, n: Unmap(run(a), run(a + n)), st.integers(0, PAGES - 1), st.integers(1, 4)),
    st.builds(
        lambda a, b, n: Remap(run(a), run(PAGES + 8 + b), n * P),
        st.integers(0, PAGES - 1),
        st.integers(0, PAGES),
        st.integers(1, 4),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(layout_event, max_size=12), st.lists(st.integers(0, 2 * PAGES + 12), max_size=6))
def test_a_resumed_process_has_the_layout_and_zeros_of_the_one_it_replaces(
    events: list[Remove | Unmap | Remap], faults: list[int]
) -> None:
    original = _process()
    original.handle_batch([PageFault(run(p)) for p in faults], 1.0)
    original.handle_batch(events, 2.0)
    checkpoint = original.checkpoint()

    resumed = LazyProcess.resumed(R, "img", checkpoint, 3.0, policy=POLICY)

    assert list(resumed.map) == list(original.map)
    assert resumed.zero == original.zero
    # everything mapped that is not zero is missing: the kernel tells resident by EEXIST
    expected = _mapped(original)
    for lo, hi in list(original.zero.spans()):
        expected.discard(lo, hi)
    assert resumed.missing == expected
    assert not resumed.inflight
    assert not resumed.installing


def test_a_removed_range_reads_zeros_after_a_resume_never_snapshot_data() -> None:
    original = _process()
    original.handle_batch([Remove(run(2), run(4))], 1.0)
    resumed = LazyProcess.resumed(R, "img", original.checkpoint(), 2.0, policy=POLICY)
    actions = resumed.handle_batch([PageFault(run(3))], 3.0)
    assert [type(a) for a in actions if isinstance(a, Fetch | ZeroFill)] == [ZeroFill]
    [fill] = [a for a in actions if isinstance(a, ZeroFill)]
    assert fill.run_addr <= run(3) < fill.run_addr + fill.length
    assert fill.run_addr + fill.length <= run(4)  # never over the data after the removed range


def test_a_moved_range_is_fetched_at_its_new_address_from_its_old_image_address() -> None:
    original = _process()
    new = RunAddr(RUN + 100 * P)
    original.handle_batch([Remap(run(0), new, 2 * P)], 1.0)
    resumed = LazyProcess.resumed(R, "img", original.checkpoint(), 2.0, policy=POLICY)
    fetches = [a for a in resumed.handle_batch([PageFault(new)], 3.0) if isinstance(a, Fetch)]
    assert fetches
    assert fetches[0].image_addr == img(0)


def test_pages_the_shell_found_resident_are_not_fetched_again() -> None:
    original = _process()
    resident = [(int(run(0)), int(run(8)))]
    resumed = LazyProcess.resumed(
        R, "img", original.checkpoint(), 2.0, resident=resident, policy=POLICY
    )
    assert not resumed.missing.overlaps(img(0), img(8))
    assert resumed.missing.overlaps(img(8), img(9))


def test_a_child_forked_after_a_resume_gets_a_name_no_earlier_child_has() -> None:
    tracker = Tracker(POLICY)
    tracker.add_process(R, "img", [LazyRegion(run(0), img(0), PAGES * P)], DATA, 0.0)
    tracker.handle_uffd(R, [Fork(child_fd=100)], 1.0)
    checkpoint = tracker.process(R).checkpoint()
    child_checkpoint = tracker.process(ProcId("r.1")).checkpoint()

    again = Tracker(POLICY)
    again.resume_process(R, "img", checkpoint, 2.0)
    again.resume_process(ProcId("r.1"), "img", child_checkpoint, 2.0, root=R, parent=R)
    again.handle_uffd(R, [Fork(child_fd=101)], 3.0)
    assert set(again.processes()) == {R, ProcId("r.1"), ProcId("r.2")}
    assert again.root(ProcId("r.1")) == R
    assert again.parent(ProcId("r.1")) == R
