"""The executor's hand-off of a uffd batch to the core, for a process that ended.

A FORK message puts the child's new uffd in the daemon's fd table when it is read;
if the process ended before the core saw the batch (an install outcome taken while
its layout event was fenced can end it), nothing adopts that uffd, and the executor
must close it rather than leak it.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from uffdd.core.events import Fork, ProcId
from uffdd.executor import Executor


def test_a_fork_nobody_adopts_has_its_uffd_closed() -> None:
    async def scenario() -> None:
        executor = Executor()
        try:
            child_fd = os.eventfd(0)  # stands in for the child's uffd
            actions = executor._hand_batch(ProcId("ended"), [Fork(child_fd)], 0.0)
            assert actions == []
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(child_fd)
        finally:
            executor.close()

    asyncio.run(scenario())
