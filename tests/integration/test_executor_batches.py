"""The executor's hand-off of a uffd batch to the core, for a process that ended; and
the one timer it keeps for the core's next wakeup.

A FORK message puts the child's new uffd in the daemon's fd table when it is read;
if the process ended before the core saw the batch (an install outcome taken while
its layout event was fenced can end it), nothing adopts that uffd, and the executor
must close it rather than leak it.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from uffdd.core.events import Fork, ProcId
from uffdd.daemon.executor import Executor


def test_a_fork_nobody_adopts_has_its_uffd_closed() -> None:
    async def scenario() -> None:
        executor = Executor()
        try:
            child_fd = os.eventfd(0)  # stands in for the child's uffd
            actions = executor.hand_batch(ProcId("ended"), [Fork(child_fd)], 0.0)
            assert actions == []
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(child_fd)
        finally:
            executor.close()

    asyncio.run(scenario())


def test_the_tick_timer_is_kept_while_the_wakeup_stays_and_moved_when_it_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        executor = Executor()
        try:
            wakeup: list[float | None] = [None]
            monkeypatch.setattr(executor.tracker, "next_wakeup", lambda: wakeup[0])

            def armed_for(moment: float | None) -> asyncio.TimerHandle | None:
                wakeup[0] = moment
                executor._schedule_tick()
                return executor._tick

            later = time.monotonic() + 10.0
            first = armed_for(later)
            assert first is not None
            assert first.when() == pytest.approx(later, abs=0.01)
            assert armed_for(later + 0.0005) is first  # within the slack: the same timer
            assert not first.cancelled()
            second = armed_for(later - 5.0)  # earlier: re-armed for the new moment
            assert second is not None
            assert second is not first
            assert first.cancelled()
            assert second.when() == pytest.approx(later - 5.0, abs=0.01)
            assert armed_for(None) is None  # nothing to wait for: no timer
            assert second.cancelled()
        finally:
            executor.close()

    asyncio.run(scenario())
