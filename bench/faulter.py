"""The restored process of every scenario: maps a region, gets it served, reads it.

Run by the scenarios, never by hand. Why this shape: the memory must live in the
process that faults, and that process must hand its userfaultfd to whoever serves it:

* ``--handler daemon``: ``uffdd.restorer.Restorer`` maps the region and hands the
  uffd to the daemon under test over the native handover (production code path);
* ``--handler serve|bulk``: the same mapping and uffd setup by hand, the uffd passed
  to the C reference (``bench/c/refhandler.c``) as an inherited fd, pinned as asked;
* ``--handler remote``: the same, passed to the remote C reference
  (``bench/c/remoteref.c handle``), which fetches from the C page server on
  ``--ref-port``, with a sweep of ``--ref-sweep``-byte requests unless that is 0
  (with ``--ref-image``: from the fast lane of ``uffdd page-server`` on that port).

Accesses are timed by the C loop of ``bench/c/faulter.c`` (loaded with ctypes, GIL
released, one volatile byte read per page between two clock_gettime calls), never by
Python. The same loop is run again on the then-resident pages: that is the timing
overhead, reported beside every result. Per-access latencies go to ``--lat-out`` as
raw native uint64 nanoseconds (with ``--stamps-out``, each access's CLOCK_MONOTONIC
start too, to place it against another process's events); one JSON line on stdout
carries the rest. ``--verify all`` checks every page read against the image, not a
sample of 64.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import mmap
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from uffdd.kernel.uffd import RegisterMode, Uffd
from uffdd.restorer import RegionSpec, Restorer, map_anonymous

PAGE = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python 3.11's mmap module does not name it


def warm_memory(length: int) -> float:
    """Touch ``length`` bytes of fresh anonymous memory, free it; return the seconds.

    Why: on a VM the first write to a guest page the host has not backed (never used,
    or handed back by free page reporting a few seconds after it was freed) costs
    several microseconds, far more than the copy into it. Whoever runs first after a
    pause pays that for the whole restored region, whichever handler serves it. Every
    residency run (uffdd's and the C reference's) warms the same amount first, so both
    install into recently freed pages, and the warm-up's own time is the fresh-memory
    floor at that moment, printed beside the results.
    """
    start = time.monotonic()
    with mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as region:
        region.madvise(MADV_POPULATE_WRITE)
    return time.monotonic() - start


def addresses(args: argparse.Namespace) -> array.array[int]:
    """The access order: random blocks (one random page each), every page, or none."""
    rng = random.Random(args.seed)
    base, pages = args.address, args.length // PAGE
    if args.pattern == "none":
        return array.array("Q")
    if args.pattern == "all":
        order = list(range(pages))
        rng.shuffle(order)
        return array.array("Q", (base + page * PAGE for page in order))
    per_block = args.window // PAGE
    blocks = rng.sample(range(pages // per_block), min(args.count, pages // per_block))
    return array.array(
        "Q", (base + (b * per_block + rng.randrange(per_block)) * PAGE for b in blocks)
    )


class Timer:
    """The C timing loop."""

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._lib.touch.restype = ctypes.c_uint64
        self._lib.touch.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip

    def touch(
        self,
        where: array.array[int],
        latencies: array.array[int] | None,
        starts: array.array[int] | None = None,
    ) -> int:
        """Read a byte of each address; latencies and starts (each if given) in ns."""
        if not where:
            return 0
        start = None if starts is None else starts.buffer_info()[0]
        out = None if latencies is None else latencies.buffer_info()[0]
        total: int = self._lib.touch(where.buffer_info()[0], len(where), start, out)
        return total


def start_reference(args: argparse.Namespace) -> tuple[subprocess.Popen[str], Uffd]:
    map_anonymous(args.length, address=args.address)
    uffd = Uffd.create(nonblocking=True)
    uffd.api()
    uffd.register(args.address, args.length, RegisterMode.MISSING)
    if args.handler == "remote":
        command = [
            str(args.refhandler), "handle", str(uffd.fd), str(args.address),
            str(args.length), str(args.ref_port), str(args.window), str(args.ref_sweep),
        ]  # fmt: skip
        if args.ref_image:
            command.append(args.ref_image)
    else:
        size = args.window if args.handler == "serve" else args.chunk
        command = [
            str(args.refhandler), args.handler, str(uffd.fd), str(args.address),
            str(args.length), str(args.data), str(size),
        ]  # fmt: skip
    if args.handler_cpu is not None:
        command = ["taskset", "-c", str(args.handler_cpu), *command]
    handler = subprocess.Popen(
        command, pass_fds=[uffd.fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    if args.handler != "bulk":
        assert handler.stdout is not None
        if handler.stdout.readline().strip() != "ready":
            raise RuntimeError("the reference handler did not start")
    return handler, uffd


def verify(args: argparse.Namespace, where: array.array[int]) -> int:
    """Compare touched pages (up to 64 of them, or all with ``--verify all``) with the
    image data file; returns mismatches."""
    if args.verify == "all":
        sample = sorted(where)
    else:
        sample = random.Random(1).sample(list(where), min(64, len(where)))
    bad = 0
    with open(args.data, "rb") as data:
        for address in sample:
            data.seek(address - args.address)
            if ctypes.string_at(address, PAGE) != data.read(PAGE):
                bad += 1
    return bad


def wait_for_start(path: Path, timeout: float = 300.0) -> None:
    """Many faulters start together: each waits (bounded) for the go file."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no start signal ({path}) after {timeout:g} s")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handler", choices=("daemon", "serve", "bulk", "remote"), required=True)
    parser.add_argument("--timer-lib", type=Path, required=True)
    parser.add_argument("--address", type=lambda v: int(v, 0), required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the image's pages.bin")
    parser.add_argument("--handover", type=Path)
    parser.add_argument("--image")
    parser.add_argument("--refhandler", type=Path, help="the C reference's executable")
    parser.add_argument("--ref-port", type=int, help="remote: the C page server's port")
    parser.add_argument("--ref-sweep", type=int, default=0, help="remote: sweep request bytes")
    parser.add_argument("--ref-image", help="remote: this image from uffdd's page server")
    parser.add_argument("--handler-cpu", type=int)
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--pattern", choices=("blocks", "all", "none"), default="blocks")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--window", type=int, default=64 << 10)
    parser.add_argument("--chunk", type=int, default=4 << 20)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--wait-resident", type=float, default=0.0)
    parser.add_argument("--lat-out", type=Path)
    parser.add_argument("--stamps-out", type=Path, help="each access's start, monotonic ns")
    parser.add_argument("--verify", choices=("sample", "all"), default="sample")
    parser.add_argument("--handed-over-file", type=Path, help="created once handed over")
    parser.add_argument("--start-file", type=Path, help="start once this file exists")
    parser.add_argument("--warm-memory", type=int, default=0, help="bytes; see warm_memory")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    timer = Timer(args.timer_lib)
    where = addresses(args)
    latencies = array.array("Q", bytes(8 * len(where)))  # allocated before the clock
    starts = array.array("Q", bytes(8 * len(where))) if args.stamps_out else None
    result: dict[str, Any] = {"pid": os.getpid()}
    if args.warm_memory:
        result["warm_s"] = warm_memory(args.warm_memory)
    if args.start_file is not None:
        wait_for_start(args.start_file)
    t0 = time.monotonic()
    result["t0"] = t0
    handler = None
    restore = None
    if args.handler == "daemon":
        restore = Restorer(args.handover, timeout=60).restore(
            args.image, [RegionSpec(args.address, args.length, run_address=args.address)]
        )
    else:
        handler, uffd = start_reference(args)
    result["handover_s"] = time.monotonic() - t0
    if args.handed_over_file is not None:
        args.handed_over_file.touch()
    result["touch_s"] = timer.touch(where, latencies, starts) / 1e9
    if restore is not None and args.wait_resident:
        summary = restore.wait_resident(timeout=args.wait_resident)
        result["resident_s"] = time.monotonic() - t0
        result["daemon_seconds_to_resident"] = summary.seconds_to_resident
        result["daemon_faults"] = summary.faults
    if handler is not None:
        if args.handler == "bulk":
            out, _ = handler.communicate(timeout=600)
            result["resident_s"] = time.monotonic() - t0
            result["reference"] = json.loads(out)
        else:
            out, _ = handler.communicate("", timeout=60)
            result["reference"] = json.loads(out)
        uffd.close()
    result["t_end"] = time.monotonic()
    resident = array.array("Q", bytes(8 * len(where)))
    timer.touch(where, resident)
    result["resident_read_ns_p50"] = sorted(resident)[len(resident) // 2] if resident else 0
    result["mismatches"] = verify(args, where)
    if args.lat_out is not None:
        with args.lat_out.open("wb") as out_file:
            latencies.tofile(out_file)
    if args.stamps_out is not None and starts is not None:
        with args.stamps_out.open("wb") as out_file:
            starts.tofile(out_file)
    if restore is not None:
        restore.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
