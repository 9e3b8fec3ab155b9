"""Page server benchmark: bulk throughput and urgent latency, against references.

Run: ``python bench/bench_page_server.py [--size 1GiB] [--transport tcp,unix]
[--fast-lane all,urgent,off] [--urgent 4000] [--per-round 200] [--urgent-thread on,off]``.

Why these numbers: the daemon's background sweep needs bulk throughput (compared with
a plain read() of the same data file, in the same run, so the machine's speed cancels
out), and a demand fault needs low latency even while the sweep saturates the stream
(compared with the same urgent requests on an idle server). The page server runs in
its own process (``uffdd page-server``), as in production; this process is the client.
Targets: bulk >= 1 GiB/s over loopback; urgent p99 under bulk <= 2x urgent p99 alone.
``--fast-lane all`` (the client's default) sends urgent and bulk requests over the
server's raw sockets, ``urgent`` only urgent ones (bulk on gRPC, the client before
bulk moved), ``off`` everything over gRPC: side by side in one run they show what each
lane saves.

How urgent latency is measured: in many short rounds (``--per-round`` requests per
condition, until each condition has ``--urgent``), each round urgent requests alone,
then under a bulk sweep started fresh (given FILL_S to fill the pipe), stopped at the
round's end. Why so fine: a virtual machine's speed drifts over seconds (a halted vCPU
takes ~70 us or more to wake, neighbours come and go), and a p99 is made by its slowest spells;
with a few long rounds one spell could land on one condition only and flip the ratio
from one run to the next. Fine rounds spread every spell over both. The p50/p99 are
plain percentiles over all samples of a condition; the spread of the per-round p99
ratios is printed beside them to show how much a single round can swing.

Three probes make the urgent round trips, one after the other in each round and
condition (under bulk while the same sweep still runs), as many each:

* ``urgent, uffdd client``: ``PageClient.fetch`` on this process's event loop, which
  also takes the sweep's chunks (what a Python program using the client sees);
* ``urgent, C client``: ``bench/c/roundtrip.c fastlane``, the same 4 KiB UFL1 fetches
  from a C process on the page server's fast lane, as the daemon's demand thread
  sends them: the page server's own latency, no Python client around it;
* ``C pair, no uffdd``: ``roundtrip.c tcp|unix``, a 16-byte request and a 32 +
  4096-byte answer between two C processes over the same kind of socket (loopback TCP
  with TCP_NODELAY, or a Unix socket). Its ratio under bulk / alone is the machine's
  own under the same load: the part of a ratio that no page server could remove.

The C programs are compiled here by ``suite.build`` and inherit this process's short
scheduler slice, as the page server's threads have one. ``--urgent-thread on,off``
runs each configuration against a page server answering urgent requests on its C
thread and against one answering them on its event loop (the page server's engine
knob ``urgent_thread=off``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import xxhash

from uffdd.client.page_client import Chunk, PageClient
from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import PageServerError
from uffdd.image.format import DATA_NAME
from uffdd.image.writer import ImageWriter
from uffdd.kernel.memory import keep_freed_memory
from uffdd.kernel.sched import short_slice
from uffdd.v1 import pages_pb2
from uffdd.wire import chunk_codec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.build import build_roundtrip

GiB = 1024**3
MiB = 1024**2
PAGE = 4096
BASE = 0x7F0000000000
IMAGE_ID = "bench"
_UNITS = {"k": 1024, "m": MiB, "g": GiB}
FILL_S = 0.15
"""How long each round's sweep runs before the samples under bulk: long enough to fill
the client's window (32 MiB at ~2 GiB/s takes ~16 ms) and the socket buffers."""


def per_call_us(action: Callable[[], object], repeat: int = 200) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            action()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6


def codec_costs(chunk_size: int) -> None:
    """The copies per chunk in Python: uffdd's codec against protobuf's, and memcpy."""
    source = memoryview(os.urandom(chunk_size))
    checksum = xxhash.xxh3_64_intdigest(source)
    encoded = chunk_codec.encode_data_chunk(1, BASE, source, checksum, True)
    memcpy = per_call_us(lambda: bytes(source))
    ours_out = per_call_us(lambda: chunk_codec.encode_data_chunk(1, BASE, source, checksum, True))
    proto_out = per_call_us(
        lambda: pages_pb2.PageChunk(
            request_id=1, image_address=BASE, length=chunk_size, data=bytes(source),
            checksum=checksum, last=True,
        ).SerializeToString()
    )  # fmt: skip
    ours_in = per_call_us(lambda: chunk_codec.decode_chunk(encoded).data)
    proto_in = per_call_us(lambda: pages_pb2.PageChunk.FromString(encoded).data)
    hashing = per_call_us(lambda: xxhash.xxh3_64_intdigest(source))
    print(
        f"per {chunk_size // 1024} KiB chunk: memcpy {memcpy:.1f} us, xxh3 {hashing:.1f} us; "
        f"encode uffdd {ours_out:.1f} us (1 copy) vs protobuf {proto_out:.1f} us; "
        f"decode uffdd {ours_in:.1f} us (0 copies) vs protobuf {proto_in:.1f} us"
    )


def parse_size(text: str) -> int:
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def make_image(root: Path, size: int) -> Path:
    piece = 64 * MiB
    with ImageWriter(root, IMAGE_ID) as writer:
        writer.add_region(ImageAddr(BASE), size, name="bench")
        for offset in range(0, size, piece):
            writer.write(ImageAddr(BASE + offset), os.urandom(min(piece, size - offset)))
        return writer.commit()


def plain_read_gib_s(path: Path) -> float:
    """Reference: read() the data file into one reused buffer (page cache warm)."""
    buffer = bytearray(8 * MiB)
    best = 0.0
    for _ in range(3):
        total = 0
        started = time.perf_counter()
        with path.open("rb", buffering=0) as file:
            while count := file.readinto(buffer):
                total += count
        best = max(best, total / (time.perf_counter() - started) / GiB)
    return best


@contextlib.contextmanager
def page_server(
    root: Path, listen: str, chunk_size: int, scratch: Path, *, urgent_thread: bool
) -> Iterator[tuple[str, str | None]]:
    """``uffdd page-server`` in its own process: yields its gRPC address and its first
    fast lane's (None without one)."""
    ready = scratch / f"ready-{time.monotonic_ns()}.json"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uffdd", "page-server",
            "--images", str(root), "--listen", listen, "--ready-file", str(ready),
            "--chunk-size", str(chunk_size), "--log-level", "warning", "--grace", "0",
            "--engine", f"urgent_thread={'on' if urgent_thread else 'off'}",
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("page server did not start")
            time.sleep(0.02)
        found = json.loads(ready.read_text())
        yield found["addresses"][0], (found["fast_lane_addresses"] or [None])[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


class BulkSweep:
    """Fetch the whole image in bulk requests, window-limited, chunks dropped on arrival."""

    def __init__(self, client: PageClient, size: int, request: int, *, loop: bool) -> None:
        self.client = client
        self.size = size
        self.request = request
        self.loop = loop
        self.received = 0
        self.errors: list[PageServerError] = []
        self.finished = asyncio.Event()
        self._next = 0
        self._in_flight = 0
        self._stopped = False

    def start(self, depth: int) -> None:
        for _ in range(depth):
            self._submit()

    def stop(self) -> None:
        self._stopped = True

    def _submit(self) -> None:
        if self._stopped or (self._next >= self.size and not self.loop):
            if self._in_flight == 0:
                self.finished.set()
            return
        offset = self._next % self.size
        self._next += self.request
        self._in_flight += 1
        self.client.submit(
            IMAGE_ID,
            ImageAddr(BASE + offset),
            min(self.request, self.size - offset),
            Priority.BULK,
            on_chunk=self._on_chunk,
            on_done=self._on_done,
            deadline=120,
        )

    def _on_chunk(self, chunk: Chunk) -> None:
        self.received += chunk.length

    def _on_done(self, error: PageServerError | None) -> None:
        self._in_flight -= 1
        if error is not None:
            self.errors.append(error)
        self._submit()


async def bulk_throughput(client: PageClient, size: int, request: int) -> float:
    sweep = BulkSweep(client, size, request, loop=False)
    started = time.perf_counter()
    sweep.start(depth=64)
    await sweep.finished.wait()
    elapsed = time.perf_counter() - started
    if sweep.errors or sweep.received != size:
        raise RuntimeError(f"bulk sweep failed: {sweep.errors[:1]} {sweep.received}")
    return size / elapsed / GiB


async def urgent_latencies(
    client: PageClient, size: int, count: int, rng: random.Random
) -> list[float]:
    latencies = []
    for _ in range(count):
        address = BASE + rng.randrange(size // PAGE) * PAGE
        started = time.perf_counter()
        await client.fetch(IMAGE_ID, ImageAddr(address), PAGE, Priority.URGENT).read_all()
        latencies.append(time.perf_counter() - started)
    return latencies


class RoundTrip:
    """The C round-trip reference (``bench/c/roundtrip.c``): one process and its server.

    Asked over its stdin for N round trips, it answers with one line of N latencies in
    nanoseconds; the event loop keeps serving the bulk sweep meanwhile.
    """

    def __init__(self, requests: asyncio.StreamWriter, answers: asyncio.StreamReader) -> None:
        self.requests = requests
        self.answers = answers

    async def latencies(self, count: int) -> list[float]:
        self.requests.write(f"{count}\n".encode())
        await self.requests.drain()
        line = await self.answers.readline()
        values = [int(field) / 1e9 for field in line.split()]
        if len(values) != count:
            raise RuntimeError(f"the C round trip answered {line[:200]!r}")
        return values


@contextlib.asynccontextmanager
async def round_trip(program: Path, *where: str) -> AsyncIterator[RoundTrip]:
    """Run ``bench/c/roundtrip`` with ``where`` (its mode and arguments)."""
    process = await asyncio.create_subprocess_exec(
        program,
        *where,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=16 * MiB,
    )
    requests, answers = process.stdin, process.stdout
    try:
        if requests is None or answers is None or await answers.readline() != b"ready\n":
            raise RuntimeError("the C round trip did not start")
        yield RoundTrip(requests, answers)
    finally:
        if requests is not None:
            requests.close()  # EOF: it closes the connection and reaps its server
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the C round trip exited with {process.returncode}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:7.0f} us"


async def wait_fast_lane(client: PageClient, bulk: bool) -> None:
    await client.image_info(IMAGE_ID)  # starts the fast lanes' discovery
    for _ in range(500):
        if client.fast_lane_address is not None and (
            not bulk or client.fast_bulk_lane_address is not None
        ):
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the fast lane did not connect")


Probe = Callable[[int], Awaitable[list[float]]]
"""Makes N sequential urgent round trips; returns their latencies in seconds."""


class Samples:
    """One probe's latencies alone and under bulk, and the bulk rate while it ran."""

    def __init__(self) -> None:
        self.alone: list[float] = []
        self.loaded: list[float] = []
        self.bulk_during: list[float] = []
        self.round_ratios: list[float] = []

    def add_round(self, alone: list[float], loaded: list[float], bulk: float) -> None:
        self.alone += alone
        self.loaded += loaded
        self.bulk_during.append(bulk)
        self.round_ratios.append(percentile(loaded, 0.99) / percentile(alone, 0.99))

    def summary(self) -> dict[str, float]:
        return {
            "bulk_during": statistics.mean(self.bulk_during),
            "alone_p50": statistics.median(self.alone),
            "alone_p99": percentile(self.alone, 0.99),
            "loaded_p50": statistics.median(self.loaded),
            "loaded_p99": percentile(self.loaded, 0.99),
            **spread("round_ratio", self.round_ratios),
        }


async def run_transport(
    target: str,
    size: int,
    *,
    request: int,
    lanes: int,
    window: int,
    urgent_count: int,
    per_round: int,
    fast_lane: str,
    references: dict[str, RoundTrip],
) -> dict[str, dict[str, float]]:
    """Bulk throughput, then the rounds; per probe (uffdd's client, then each C
    reference in ``references``) its summary, and "bulk" the throughput."""
    started_config = time.perf_counter()
    rng = random.Random(42)
    async with PageClient(
        target,
        lanes=lanes,
        window_bytes=window,
        deadline=120,
        fast_lane=fast_lane != "off",
        fast_bulk=fast_lane == "all",
    ) as client:
        await client.wait_ready(30)
        if fast_lane != "off":
            await wait_fast_lane(client, bulk=fast_lane == "all")
        await bulk_throughput(client, min(size, 256 * MiB), request)  # warm up
        bulk = max([await bulk_throughput(client, size, request) for _ in range(2)])

        async def uffdd_client(count: int) -> list[float]:
            return await urgent_latencies(client, size, count, rng)

        probes: dict[str, Probe] = {"uffdd": uffdd_client}
        probes |= {name: ref.latencies for name, ref in references.items()}
        for probe in probes.values():
            await probe(200)  # warm up
        # Many short rounds, each: every probe alone, then every probe under a fresh
        # sweep. A slow spell of the VM (they last seconds) falls on both conditions.
        samples = {name: Samples() for name in probes}
        rounds = max(1, -(-urgent_count // per_round))
        # The client holds bulk requests beyond its window, so two more than the window
        # takes keep it full; more would only lengthen each round's drain at the end.
        depth = window // request + 2
        for _ in range(rounds):
            alone = {name: await probe(per_round) for name, probe in probes.items()}
            sweep = BulkSweep(client, size, request, loop=True)
            sweep.start(depth=depth)
            await asyncio.sleep(FILL_S)  # let the sweep fill the pipe
            for name, probe in probes.items():
                received_before = sweep.received
                started = time.perf_counter()
                loaded = await probe(per_round)
                rate = (sweep.received - received_before) / (time.perf_counter() - started)
                samples[name].add_round(alone[name], loaded, rate / GiB)
            sweep.stop()
            await sweep.finished.wait()
            if sweep.errors:
                raise RuntimeError(f"bulk sweep failed: {sweep.errors[0]}")
    results = {name: found.summary() for name, found in samples.items()}
    results["run"] = {
        "bulk": bulk,
        "rounds": rounds,
        "per_round": per_round,
        "seconds": time.perf_counter() - started_config,
    }
    return results


def spread(name: str, values: list[float]) -> dict[str, float]:
    quartiles = (
        statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    )
    return {
        f"{name}_min": min(values),
        f"{name}_q1": quartiles[0],
        f"{name}_median": statistics.median(values),
        f"{name}_q3": quartiles[2],
        f"{name}_max": max(values),
    }


PROBES = {
    "uffdd": "urgent, uffdd client",
    "fast lane": "urgent, C client",
    "pair": "C pair, no uffdd",
}
"""How each probe is labelled: uffdd's PageClient, a C client on the page server's
fast lane (what the daemon's demand thread sees), and the C ping-pong reference."""


def report(
    transport: str,
    lanes: int,
    fast_lane: str,
    thread: bool,
    results: dict[str, dict[str, float]],
    reference: float,
) -> None:
    urgent = {
        "all": "urgent and bulk on the fast lane",
        "urgent": "urgent on the fast lane, bulk on gRPC",
        "off": "urgent and bulk on gRPC",
    }[fast_lane]
    answered = "urgent answers on the C thread" if thread else "urgent answers on the loop"
    if fast_lane == "off":
        answered = "no fast lane"
    run = results["run"]
    print(f"\n[{transport}, {lanes} gRPC lane{'s' if lanes > 1 else ''}, {urgent}; {answered}]")
    print(
        f"  bulk throughput        {run['bulk']:6.2f} GiB/s  "
        f"({run['bulk'] / reference:.3f}x plain read; target >= 1 GiB/s)"
    )
    print(
        "  round trip, 4 KiB      alone p50 / p99      under bulk p50 / p99  "
        "ratio p50 / p99 (target p99 <= 2x)   per-round p99 ratio: min | quartiles | max"
    )
    for name, result in results.items():
        if name == "run":
            continue
        q = [result[f"round_ratio_{k}"] for k in ("min", "q1", "median", "q3", "max")]
        print(
            f"  {PROBES[name]:21s} {fmt_us(result['alone_p50'])} / {fmt_us(result['alone_p99'])}"
            f"  {fmt_us(result['loaded_p50'])} / {fmt_us(result['loaded_p99'])}"
            f"   {result['loaded_p50'] / result['alone_p50']:5.2f}x / "
            f"{result['loaded_p99'] / result['alone_p99']:5.2f}x"
            f"   (bulk meanwhile {result['bulk_during']:.2f} GiB/s)"
            f"   {q[0]:.2f} | {q[1]:.2f} {q[2]:.2f} {q[3]:.2f} | {q[4]:.2f}x"
        )
    print(
        f"  ({run['rounds']:.0f} rounds of {run['per_round']:.0f} per probe and condition; "
        f"{run['seconds']:.0f} s)",
        flush=True,
    )


async def open_references(
    stack: contextlib.AsyncExitStack,
    program: Path,
    fast_address: str | None,
    size: int,
    pair: list[str],
) -> dict[str, RoundTrip]:
    """The C probes: a C client of the fast lane (when there is one), the C pair."""
    references = {}
    if fast_address is not None:
        lane = ["fastlane", fast_address, IMAGE_ID, str(BASE), str(size)]
        references["fast lane"] = await stack.enter_async_context(round_trip(program, *lane))
    references["pair"] = await stack.enter_async_context(round_trip(program, *pair))
    return references


async def run_all(
    args: argparse.Namespace, scratch: Path, size: int, reference: float, program: Path
) -> None:
    # one event loop for every client: grpc.aio binds its poller to the first loop
    chunk, request, window = map(parse_size, (args.chunk_size, args.request, args.window))
    for transport in args.transport.split(","):
        listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{scratch}/pages.sock"
        pair = ["tcp"] if transport == "tcp" else ["unix", str(scratch / "roundtrip.sock")]
        for lanes in map(int, args.lanes.split(",")):
            for fast in args.fast_lane.split(","):
                for thread in (t == "on" for t in args.urgent_thread.split(",")):
                    with page_server(
                        scratch / "images", listen, chunk, scratch, urgent_thread=thread
                    ) as (target, fast_address):
                        async with contextlib.AsyncExitStack() as stack:
                            lane = fast_address if fast != "off" else None
                            results = await run_transport(
                                target,
                                size,
                                request=request,
                                lanes=lanes,
                                window=window,
                                urgent_count=args.urgent,
                                per_round=args.per_round,
                                fast_lane=fast,
                                references=await open_references(stack, program, lane, size, pair),
                            )
                    report(transport, lanes, fast, thread, results, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GiB", help="image size (default 1GiB)")
    parser.add_argument("--transport", default="tcp,unix", help="tcp, unix or both")
    parser.add_argument("--chunk-size", default="512KiB", help="server chunk size")
    parser.add_argument("--request", default="8MiB", help="bulk request size")
    parser.add_argument("--window", default="32MiB", help="client bulk window")
    parser.add_argument("--lanes", default="2,1", help="client lanes to compare")
    parser.add_argument(
        "--fast-lane",
        default="all,urgent,off",
        help="requests over the fast lane: all, urgent (bulk on gRPC), off; comma-separated",
    )
    parser.add_argument(
        "--urgent",
        type=int,
        default=4000,
        help="urgent requests per condition (alone, under bulk) and configuration",
    )
    parser.add_argument(
        "--per-round", type=int, default=200, help="urgent requests per condition per round"
    )
    parser.add_argument(
        "--urgent-thread",
        default="on",
        help="the page server's urgent answers on its C thread (on) or its loop (off), "
        "or both side by side (on,off): engine knob urgent_thread, in the same run",
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    program = build_roundtrip()

    with tempfile.TemporaryDirectory(prefix="uffdd-bench-") as scratch_name:
        scratch = Path(scratch_name)
        started = time.perf_counter()
        image = make_image(scratch / "images", size)
        print(f"image: {size / GiB:.2f} GiB random data in {time.perf_counter() - started:.1f} s")
        reference = plain_read_gib_s(image / DATA_NAME)
        print(f"reference: plain read() of {DATA_NAME}: {reference:.2f} GiB/s")
        print(
            f"settings: chunk {args.chunk_size}, bulk request {args.request}, "
            f"window {args.window}, {args.urgent} urgent 4 KiB requests per condition "
            f"in rounds of {args.per_round}, as many from each C probe",
            flush=True,
        )
        codec_costs(parse_size(args.chunk_size))
        keep_freed_memory()  # the client side as the daemon runs it: warm buffers,
        short_slice()  # and a short slice for the loop's thread
        asyncio.run(run_all(args, scratch, size, reference, program))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
