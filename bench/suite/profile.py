"""Where the daemon's time goes: py-spy samples grouped by stage, CPU per thread.

Why stages: the issue's levers are per stage (uffd read, core decisions, gRPC receive,
UFFDIO_COPY, wake), so samples of the event loop thread are attributed to the stage of
their innermost recognised frame; samples waiting in epoll are the loop being idle.
gRPC's C-core threads are invisible to py-spy, so CPU seconds per thread come from
``/proc/<pid>/task/*/stat`` instead (taken before and after the block).

``python bench/suite/profile.py FILE...`` summarises recorded files.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# (stage, substrings of a frame); checked frame by frame from the leaf up.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("UFFDIO_COPY/ZEROPAGE", ("Uffd.copy (", "Uffd.zeropage (")),
    ("UFFDIO_WAKE", ("Uffd.wake (",)),
    ("uffd read + decode", ("Uffd.read_events", "Uffd.read_raw", "core/wire.py")),
    ("checksum (xxh3)", ("xxh3", "xxhash")),
    (
        "page data receive (gRPC, codec)",
        ("client/page_client.py", "chunk_codec", "grpc/", "cygrpc"),
    ),
    ("core decisions (tracker, process, ranges, policy)", ("uffdd/core/",)),
    ("executor glue", ("uffdd/daemon/executor.py", "uffdd/daemon/sources.py")),
    ("idle (epoll wait)", ("select (selectors.py", "epoll_wait", "EpollSelector.select")),
    ("handover, logging, other uffdd", ("uffdd/",)),
    ("asyncio loop overhead", ("asyncio/",)),
)


def stage_of(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for stage, needles in RULES:
            if any(needle in frame for needle in needles):
                return stage
    return "other"


def summarize(path: Path) -> str:
    """A table: stage, samples, share of the event loop thread's samples."""
    main: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        if "MainThread" in thread:
            main[stage_of(frames[1:])] += int(count)
        else:
            others[thread.split(":", 1)[1].strip()] += int(count)
    idle = main.pop("idle (epoll wait)", 0)
    busy = sum(main.values()) or 1
    lines = [
        f"{path.name}: event loop thread {busy + idle} samples, "
        f"{100 * idle / max(busy + idle, 1):.0f} % idle in epoll over the daemon's life; "
        "busy samples by stage:",
        "",
        "| stage | samples | share of busy |",
        "|---|---|---|",
    ]
    for stage, samples in main.most_common():
        lines.append(f"| {stage} | {samples} | {100 * samples / busy:.1f} % |")
    if others:
        lines.append("")
        lines.append(
            "other Python threads (samples): "
            + ", ".join(f"{name} {count}" for name, count in others.most_common(5))
        )
    return "\n".join(lines)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every thread of ``pid``, with its name."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except FileNotFoundError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        threads[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return threads


def thread_cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> str:
    """CPU seconds used between two snapshots, summed by thread name."""
    used: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        used[name] = used.get(name, 0.0) + seconds - before.get(tid, (name, 0.0))[1]
    ranked = sorted(used.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in ranked if seconds)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summarize(Path(argument)), end="\n\n")
