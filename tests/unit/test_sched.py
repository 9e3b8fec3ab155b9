"""short_slice: the calling thread alone gets the short EEVDF slice (Linux 6.18 here)."""

from __future__ import annotations

import threading
from pathlib import Path

from uffdd.kernel.sched import short_slice


def _own_slice() -> int:
    for line in Path("/proc/thread-self/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    raise AssertionError("no se.slice in /proc/thread-self/sched")


def test_the_calling_thread_gets_the_slice_and_others_keep_theirs() -> None:
    seen: dict[str, int] = {}

    def worker() -> None:
        seen["default"] = _own_slice()
        assert short_slice(200_000) is True
        seen["short"] = _own_slice()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["short"] == 200_000
    assert seen["default"] > 200_000
    assert _own_slice() == seen["default"]  # this thread was not touched
