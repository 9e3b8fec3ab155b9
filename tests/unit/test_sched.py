"""short_slice / default_slice: only the calling thread's EEVDF slice changes (Linux
6.18 here), and a real-time thread is not touched."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from uffdd.kernel.sched import default_slice, short_slice


def _own_slice() -> int:
    for line in Path("/proc/thread-self/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    raise AssertionError("no se.slice in /proc/thread-self/sched")


def test_the_calling_thread_gets_the_slice_and_others_keep_theirs() -> None:
    # (An earlier test may have run the daemon in this process, which sets this
    # thread's slice: compare against what it is now, not against the default.)
    parent = _own_slice()
    wanted = 300_000 if parent == 200_000 else 200_000
    seen: dict[str, int] = {}

    def worker() -> None:
        seen["inherited"] = _own_slice()
        seen["ok"] = int(short_slice(wanted))
        seen["set"] = _own_slice()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"inherited": parent, "ok": 1, "set": wanted}
    assert _own_slice() == parent  # this thread was not touched


def test_default_slice_gives_the_kernel_s_slice_back() -> None:
    seen: dict[str, int] = {}

    def worker() -> None:
        assert short_slice(150_000) is True
        seen["short"] = _own_slice()
        assert default_slice() is True
        seen["default"] = _own_slice()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["short"] == 150_000
    assert seen["default"] > 150_000  # the kernel's base slice (1.4 ms here)


def test_a_real_time_thread_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_FIFO)
    assert short_slice() is False
    assert default_slice() is False
