"""The demo's program: builds memory (``source``) or restores and checks it (``restored``).

Why a separate program: the process whose memory is restored must never be the one
serving its faults (a Python thread faulting while holding the GIL would deadlock a
Python handler), and a migration has two processes anyway: the one dumped and the one
restored. Both roles derive the same layout and pattern from ``--size-mib`` and
``--seed``, so the restored process checks every byte without a copy of the snapshot.

The restored role speaks JSON lines on stdout (one object per line, ``event`` names it)
for the ``uffdd demo`` command, which draws the progress bar and the report:

- ``handed_over`` (seconds), ``first_access`` (microseconds for the first page),
- ``phase`` (name, pages checked, mismatches, seconds) for each step of the script,
- ``progress`` (resident and total bytes, from the daemon), ``resident`` (its summary),
- ``done`` (ok, bytes verified, mismatches, first wrong addresses).

The ``storm`` mode (the fault-injection suite's workload, ``tests/faults/``) adds
``forked`` (a child's pid, as soon as fork returns) and a ``phase`` named ``storm: OP``
for each operation, and ``done`` counts the forked children that were killed (a kill is
never a wrong byte).

The script exercises what uffdd must follow: random-order reads, a fork whose child and
grandchild read memory the parent never touched, madvise(DONTNEED) (those pages must
then read zeros, never snapshot data), mremap that moves, shrinks and grows, and munmap
mid-transfer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from uffdd.core.addresses import PAGE_SIZE
from uffdd.demo import vm
from uffdd.demo.pattern import (
    ZERO_PAGE,
    DemoRegion,
    PageKind,
    Pattern,
    demo_layout,
    expected_page,
)
from uffdd.restorer import RegionSpec, Restorer, map_anonymous

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout (threads share it: the progress reader and the checker)."""
    line = json.dumps({"event": event, **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# -- the source ------------------------------------------------------------------------


def build_source(layout: tuple[DemoRegion, ...], pattern: Pattern) -> None:
    """Map the regions at their fixed addresses and fill them as the layout says."""
    for region in layout:
        map_anonymous(region.length, address=region.start)
        for index in range(region.pages):
            address = region.start + index * PAGE_SIZE
            kind = region.kind(index)
            if kind is PageKind.DATA:
                vm.write(address, expected_page(pattern, region, index))
            elif kind is PageKind.ZEROED:
                vm.write(address, pattern.page(region.start))  # dirty it, then clear it
                vm.zero(address, PAGE_SIZE)


# -- the restored process --------------------------------------------------------------


@dataclass
class Checker:
    """Compares pages with what they must hold, counting and remembering mismatches."""

    pattern: Pattern
    checked_bytes: int = 0
    mismatches: int = 0
    first_wrong: list[str] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)
    """Image addresses of pages that must read zeros now: dropped with
    madvise(DONTNEED), or unmapped by an mremap shrink and regrown."""

    def page(self, region: DemoRegion, index: int, run_start: int | None = None) -> bool:
        """Check one page, read at ``run_start`` (the region's start unless it moved)."""
        image_address = region.start + index * PAGE_SIZE
        address = (region.start if run_start is None else run_start) + index * PAGE_SIZE
        want = (
            ZERO_PAGE
            if image_address in self.dropped
            else expected_page(self.pattern, region, index)
        )
        got = vm.read(address, PAGE_SIZE)
        self.checked_bytes += PAGE_SIZE
        if got == want:
            return True
        self.mismatches += 1
        if len(self.first_wrong) < 8:
            self.first_wrong.append(f"{address:#x} (image {image_address:#x})")
        return False

    def pages(
        self, region: DemoRegion, indexes: list[int] | range, run_start: int | None = None
    ) -> int:
        return sum(not self.page(region, i, run_start) for i in indexes)


def _phase(name: str, checker: Checker, body: Any) -> None:
    started = time.monotonic()
    before_bytes, before_bad = checker.checked_bytes, checker.mismatches
    body()
    emit(
        "phase",
        name=name,
        pages=(checker.checked_bytes - before_bytes) // PAGE_SIZE,
        mismatches=checker.mismatches - before_bad,
        seconds=round(time.monotonic() - started, 4),
    )


def _child_checks(checker: Checker, work: list[tuple[DemoRegion, range]], depth: int) -> int:
    """In a forked child: check ``work[0]``, fork again for the rest; exit status = bad."""
    region, indexes = work[0]
    bad = checker.pages(region, indexes)
    if len(work) > 1:
        pid = os.fork()
        if pid == 0:
            os._exit(min(_child_checks(checker, work[1:], depth + 1), 255))
        _, status = os.waitpid(pid, 0)
        bad += os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 255
    return bad


def run_restored(
    layout: tuple[DemoRegion, ...],
    pattern: Pattern,
    handover: str,
    image_id: str,
    page_server: str,
    resident_timeout: float,
    mode: str = "exercise",
    storm_seed: int = 0,
    rounds: int = 24,
) -> bool:
    """Restore the layout lazily through the daemon and check every byte; True if right.

    ``mode``: ``exercise`` (the full script), ``idle`` (one access, then wait for the
    daemon to make everything resident, then check), ``exit-early`` (one access, then
    exit while the transfer is in flight), ``storm`` (``rounds`` random operations drawn
    from ``storm_seed``: reads, forks, mremap, madvise(DONTNEED), munmap; see
    :class:`_Storm`)."""
    heap, sparse, zeroed, moved = layout
    checker = Checker(pattern)
    started = time.monotonic()
    restore = Restorer(socket_path=Path(handover)).restore(
        image_id,
        [RegionSpec(r.start, r.length, run_address=r.start) for r in layout],
        page_server=page_server,
    )
    emit("handed_over", seconds=round(time.monotonic() - started, 4), handover=restore.handover_id)

    outcome: dict[str, Any] = {}

    def follow_progress() -> None:
        try:
            summary = restore.wait_resident(
                timeout=resident_timeout,
                on_progress=lambda p: emit(
                    "progress", resident=p.resident_bytes, total=p.total_bytes
                ),
            )
            outcome["summary"] = summary
            emit(
                "resident",
                pages=summary.pages,
                bytes=summary.bytes,
                faults=summary.faults,
                fault_p50_us=summary.fault_p50_us,
                fault_p99_us=summary.fault_p99_us,
                seconds=summary.seconds_to_resident,
            )
        except Exception as exc:  # reported, and the run fails
            outcome["error"] = str(exc)
            emit("failed", reason=str(exc))

    progress = threading.Thread(target=follow_progress, name="progress", daemon=True)
    progress.start()

    rng = random.Random(pattern.seed)
    first = time.perf_counter()
    checker.page(heap, 0)
    emit("first_access", microseconds=round((time.perf_counter() - first) * 1e6, 1))
    if mode == "exit-early":
        # Leave while the background transfer is in flight: the daemon must notice.
        emit("done", ok=checker.mismatches == 0, verified_bytes=checker.checked_bytes)
        sys.stdout.flush()
        os._exit(0)
    if mode == "idle":
        # Touch nothing more until the daemon says everything is resident.
        progress.join(resident_timeout)
        return _finish(checker, outcome, lambda: _check_all(checker, layout, None, None))
    if mode == "storm":
        storm = _Storm(checker, layout, random.Random(storm_seed))
        for _ in range(rounds):
            storm.step()
        _phase("every byte, all regions", checker, storm.check_all)
        progress.join(resident_timeout)
        return _finish(checker, outcome, storm.check_all, killed_children=storm.killed_children)

    half = list(range(1, heap.pages // 2))
    rng.shuffle(half)
    _phase("random reads (heap, first half)", checker, lambda: checker.pages(heap, half))

    # madvise(DONTNEED) a stretch that is partly resident (read above) and partly not.
    drop_from, drop_to = heap.pages * 3 // 8, heap.pages * 5 // 8
    vm.drop(heap.start + drop_from * PAGE_SIZE, (drop_to - drop_from) * PAGE_SIZE)
    checker.dropped.update(heap.start + i * PAGE_SIZE for i in range(drop_from, drop_to))
    _phase(
        "madvise(DONTNEED) reads zeros",
        checker,
        lambda: checker.pages(heap, range(drop_from, drop_to)),
    )

    def forked() -> None:
        # Child: the sparse region; grandchild: the zeroed region; great-grandchild:
        # the last heap pages. None of them was touched by the parent.
        work = [
            (sparse, range(sparse.pages)),
            (zeroed, range(zeroed.pages)),
            (heap, range(heap.pages * 7 // 8, heap.pages)),
        ]
        pid = os.fork()
        if pid == 0:
            os._exit(min(_child_checks(checker, work, 1), 255))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        # SIGKILL is uffdd's fail-stop (this process dies next): no page was read wrong.
        # Any other signal (SIGBUS, SIGSEGV) is a failure to serve.
        bad = code if code >= 0 else int(code != -signal.SIGKILL)
        checker.mismatches += bad
        checker.checked_bytes += sum(len(r) for _, r in work) * PAGE_SIZE
        if bad:
            checker.first_wrong.append(f"forked children saw {bad} wrong page(s)")

    _phase("fork tree, 3 levels, untouched memory", checker, forked)

    new_home = moved.start + (1 << 36)  # far away, still in the demo's area
    vm.move(moved.start, moved.length, new_home)
    _phase(
        "mremap to a new address",
        checker,
        lambda: checker.pages(moved, range(moved.pages), run_start=new_home),
    )

    # Shrink in place (the tail is unmapped, snapshot and all), then grow back: the
    # regrown tail is fresh memory and must read zeros, never the snapshot's data.
    keep = moved.pages * 3 // 4
    vm.resize(new_home, moved.length, keep * PAGE_SIZE)
    vm.resize(new_home, keep * PAGE_SIZE, moved.length)
    checker.dropped.update(moved.start + i * PAGE_SIZE for i in range(keep, moved.pages))
    _phase(
        "mremap shrink then grow: the tail reads zeros",
        checker,
        lambda: checker.pages(moved, range(moved.pages), run_start=new_home),
    )

    cut = sparse.pages * 3 // 4
    vm.unmap(sparse.start + cut * PAGE_SIZE, (sparse.pages - cut) * PAGE_SIZE)
    _phase("munmap mid-transfer", checker, lambda: None)

    def everything() -> None:
        _check_all(checker, layout, cut, new_home)

    _phase("every byte, all regions", checker, everything)
    progress.join(resident_timeout)
    return _finish(checker, outcome, everything)


def _check_all(
    checker: Checker, layout: tuple[DemoRegion, ...], cut: int | None, new_home: int | None
) -> None:
    """Check every page still mapped: ``cut`` pages of the sparse region remain after
    the munmap, and the last region lives at ``new_home`` after the mremap (None: as
    restored)."""
    heap, sparse, zeroed, moved = layout
    checker.pages(heap, range(heap.pages))
    checker.pages(sparse, range(sparse.pages if cut is None else cut))
    checker.pages(zeroed, range(zeroed.pages))
    checker.pages(moved, range(moved.pages), run_start=new_home)


def _finish(
    checker: Checker,
    outcome: dict[str, Any],
    everything: Callable[[], None],
    killed_children: int = 0,
) -> bool:
    """Once resident (or failed): check everything again, then report."""
    if "summary" in outcome:
        _phase("every byte again, fully resident", checker, everything)
    ok = checker.mismatches == 0 and "summary" in outcome
    emit(
        "done",
        ok=ok,
        verified_bytes=checker.checked_bytes,
        mismatches=checker.mismatches,
        first_wrong=checker.first_wrong,
        error=outcome.get("error"),
        killed_children=killed_children,
    )
    return ok


_FAR = 1 << 36
"""How far the storm's mremap moves a region (still inside the demo's area)."""


@dataclass
class _Home:
    """Where a region's page 0 lives now, and which of its pages are still mapped."""

    region: DemoRegion
    start: int
    live: set[int]


class _Storm:
    """Random operations on the restored memory, each checked against the pattern.

    Every operation is one the daemon must follow while pages are still missing: reads
    in random order; fork (the child, and sometimes a grandchild, checks pages the
    parent never touched); mremap of the last region between two homes, and a shrink
    then grow of its tail (which then reads zeros); madvise(DONTNEED) of a live span
    (zeros from then on); munmap of a span of the first two regions (never read again).
    """

    def __init__(
        self, checker: Checker, layout: tuple[DemoRegion, ...], rng: random.Random
    ) -> None:
        self.checker = checker
        self.rng = rng
        self.homes = [_Home(r, r.start, set(range(r.pages))) for r in layout]
        self.killed_children = 0
        self._ops: list[tuple[str, Callable[[], None]]] = [
            ("read", self.read),
            ("read", self.read),
            ("fork", self.fork),
            ("drop", self.drop),
            ("unmap", self.unmap),
            ("move", self.move),
            ("shrink-grow", self.shrink_grow),
        ]

    def step(self) -> None:
        name, op = self.rng.choice(self._ops)
        _phase(f"storm: {name}", self.checker, op)

    def _sample(self, count: int) -> list[tuple[_Home, int]]:
        picks = []
        for _ in range(count):
            home = self.rng.choice(self.homes)
            if home.live:
                picks.append((home, self.rng.choice(tuple(home.live))))
        return picks

    def _check(self, picks: list[tuple[_Home, int]]) -> int:
        return sum(not self.checker.page(h.region, i, h.start) for h, i in picks)

    def _span(self, home: _Home, most: int) -> range:
        """A run of live pages of ``home`` starting at a random live page."""
        first = self.rng.choice(sorted(home.live))
        end = first + 1
        while end - first < most and end in home.live:
            end += 1
        return range(first, end)

    def read(self) -> None:
        self._check(self._sample(self.rng.randint(16, 256)))

    def fork(self) -> None:
        picks = self._sample(128)
        deeper = self.rng.random() < 0.5
        pid = os.fork()
        if pid == 0:
            bad = self._check(picks)
            if deeper:
                bad += self._child(self._sample(128))
            os._exit(min(bad, 254))
        emit("forked", pid=pid)
        self._account(pid, len(picks))

    def _child(self, picks: list[tuple[_Home, int]]) -> int:
        """In a forked child: fork a grandchild that checks ``picks``; its bad count."""
        pid = os.fork()
        if pid == 0:
            os._exit(min(self._check(picks), 254))
        # One write, not emit(): a lock copied by fork() may be held by a thread that
        # the child does not have.
        os.write(1, (json.dumps({"event": "forked", "pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 0

    def _account(self, pid: int, pages: int) -> None:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            self.killed_children += 1  # killed (with its reason, in the daemon's log)
            return
        bad = os.waitstatus_to_exitcode(status)
        self.checker.checked_bytes += pages * PAGE_SIZE
        self.checker.mismatches += bad
        if bad:
            self.checker.first_wrong.append(f"a forked child saw {bad} wrong page(s)")

    def drop(self) -> None:
        home = self.rng.choice(self.homes)
        if not home.live:
            return
        span = self._span(home, max(home.region.pages // 8, 1))
        vm.drop(home.start + span.start * PAGE_SIZE, len(span) * PAGE_SIZE)
        self.checker.dropped.update(home.region.start + i * PAGE_SIZE for i in span)
        self._check([(home, i) for i in span])

    def unmap(self) -> None:
        home = self.rng.choice(self.homes[:2])
        if len(home.live) < 2:
            return
        span = self._span(home, max(home.region.pages // 16, 1))
        vm.unmap(home.start + span.start * PAGE_SIZE, len(span) * PAGE_SIZE)
        home.live.difference_update(span)

    def move(self) -> None:
        home = self.homes[-1]
        to = home.region.start if home.start != home.region.start else home.start + _FAR
        vm.move(home.start, home.region.length, to)
        home.start = to
        self._check([(home, i) for i in self.rng.sample(range(home.region.pages), 64)])

    def shrink_grow(self) -> None:
        home = self.homes[-1]
        keep = self.rng.randrange(home.region.pages // 2, home.region.pages)
        vm.resize(home.start, home.region.length, keep * PAGE_SIZE)
        vm.resize(home.start, keep * PAGE_SIZE, home.region.length)
        tail = range(keep, home.region.pages)
        self.checker.dropped.update(home.region.start + i * PAGE_SIZE for i in tail)
        self._check([(home, i) for i in tail])

    def check_all(self) -> None:
        for home in self.homes:
            self.checker.pages(home.region, sorted(home.live), home.start)


# -- command line ----------------------------------------------------------------------


@click.group()
def main() -> None:
    """The demo's workload process (run by `uffdd demo`)."""


@main.command()
@click.option("--size-mib", type=click.IntRange(8), default=256, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
def source(size_mib: int, seed: int) -> None:
    """Build the memory, say ready, and wait (for the dump) until stdin closes."""
    build_source(demo_layout(size_mib), Pattern(seed))
    emit("ready", pid=os.getpid())
    sys.stdin.read()


@main.command()
@click.option("--size-mib", type=click.IntRange(8), default=256, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--handover", required=True, help="The daemon's handover socket.")
@click.option("--image", "image_id", required=True)
@click.option("--page-server", default="", help="Page server (default: the daemon's).")
@click.option("--resident-timeout", type=float, default=300.0, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["exercise", "idle", "exit-early", "storm"]),
    default="exercise",
    show_default=True,
)
@click.option("--storm-seed", type=int, default=0, show_default=True)
@click.option("--rounds", type=click.IntRange(0), default=24, show_default=True)
def restored(
    size_mib: int,
    seed: int,
    handover: str,
    image_id: str,
    page_server: str,
    resident_timeout: float,
    mode: str,
    storm_seed: int,
    rounds: int,
) -> None:
    """Restore lazily through the daemon, exercise it, check every byte."""
    ok = run_restored(
        demo_layout(size_mib),
        Pattern(seed),
        handover,
        image_id,
        page_server,
        resident_timeout,
        mode,
        storm_seed,
        rounds,
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
