"""Per-stage timings inside the daemon under test (``daemon_host.py --stages FILE``).

Why: a fault's latency seen by the restored process is the sum of stages inside the
daemon (the event loop getting to the uffd, reading it, the core deciding, the page
fetch round trip, UFFDIO_COPY, the wake) plus the kernel's. Wrapping those calls with
``perf_counter_ns`` (bench process only; ~0.1 us per call) gives each stage's
distribution. ``loop lag`` is how late a 2 ms timer fires: how long anything that
becomes ready waits for the busy loop. Samples are dumped as JSON when the daemon stops.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from uffdd.client.page_client import Chunk, ChunkCallback, DoneCallback
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.tracker import Tracker
from uffdd.daemon.sources import FetchHandle, PageSource
from uffdd.kernel.uffd import Uffd

SAMPLES: dict[str, list[float]] = {}
"""Stage name -> durations in microseconds."""
_MAX_SAMPLES = 200_000
F = TypeVar("F", bound=Callable[..., Any])


def record(stage: str, micros: float) -> None:
    samples = SAMPLES.setdefault(stage, [])
    if len(samples) < _MAX_SAMPLES:
        samples.append(micros)


def _timed(stage: str, function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            record(stage, (time.perf_counter_ns() - started) / 1000)

    return wrapper  # type: ignore[return-value]


def _gc_timer() -> Callable[[str, dict[str, int]], None]:
    """A gc callback recording each collection as ``gc gen N`` (it stops the loop)."""
    started = [0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter_ns()
        else:
            record(f"gc gen {info['generation']}", (time.perf_counter_ns() - started[0]) / 1000)

    return callback


def install() -> None:
    """Wrap the uffd operations and the core's entry point (class-wide, this process),
    and time the garbage collector."""
    gc.callbacks.append(_gc_timer())
    Uffd.read_events = _timed("uffd read", Uffd.read_events)  # type: ignore[method-assign]
    Uffd.copy = _timed("UFFDIO_COPY", Uffd.copy)  # type: ignore[method-assign]
    Uffd.zeropage = _timed("UFFDIO_ZEROPAGE", Uffd.zeropage)  # type: ignore[method-assign]
    Uffd.wake = _timed("UFFDIO_WAKE", Uffd.wake)  # type: ignore[method-assign]
    Tracker.handle_uffd = _timed("core handle_uffd", Tracker.handle_uffd)  # type: ignore[method-assign]
    Tracker.handle = _timed("core handle (data, outcomes)", Tracker.handle)  # type: ignore[method-assign]


class TimedSource:
    """A PageSource wrapper: request round trips (submit -> first chunk, -> done)."""

    def __init__(self, inner: PageSource) -> None:
        self.inner = inner

    def submit(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        *,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        deadline: float | None = None,
    ) -> FetchHandle:
        lane = "urgent" if priority == Priority.URGENT else "bulk"
        started = time.perf_counter_ns()
        first = [True]

        def chunk(data: Chunk) -> None:
            if first[0]:
                first[0] = False
                record(f"fetch {lane}: submit -> first chunk", _since(started))
            inner_started = time.perf_counter_ns()
            on_chunk(data)
            record(f"install {lane} chunk (core + COPY + wake)", _since(inner_started))

        def done(error: Any) -> None:
            record(f"fetch {lane}: submit -> done", _since(started))
            on_done(error)

        return self.inner.submit(
            image_id, address, length, priority, on_chunk=chunk, on_done=done, deadline=deadline
        )


def _since(started: int) -> float:
    return (time.perf_counter_ns() - started) / 1000


async def loop_lag(interval: float = 0.002) -> None:
    """Forever: how late a timer of ``interval`` fires (the loop's queueing delay)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        record("loop lag (2 ms timer lateness)", (loop.time() - due) * 1e6)


def dump(path: Path) -> None:
    path.write_text(json.dumps(SAMPLES))
