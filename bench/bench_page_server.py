"""Page server benchmark: bulk throughput and urgent latency, against references.

Run: ``python bench/bench_page_server.py [--size 1GiB] [--transport tcp,unix]
[--fast-lane all,urgent,off]``.

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from uffdd.core.addresses import ImageAddr
from uffdd.errors import PageServerError
from uffdd.image.format import DATA_NAME
from uffdd.image.writer import ImageWriter
from uffdd.kernel.memory import keep_freed_memory
from uffdd.kernel.sched import short_slice
from uffdd.remote import chunk_codec
from uffdd.remote.client import Chunk, PageClient
from uffdd.remote.convert import Priority
from uffdd.v1 import pages_pb2

GiB = 1024**3
MiB = 1024**2
PAGE = 4096
BASE = 0x7F0000000000
IMAGE_ID = "bench"
_UNITS = {"k": 1024, "m": MiB, "g": GiB}
ROUNDS = 4


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


@contextmanager
def page_server(root: Path, listen: str, chunk_size: int, scratch: Path) -> Iterator[str]:
    ready = scratch / f"ready-{time.monotonic_ns()}.json"
    process = subprocess.Popen(
        [
            sys.executable, "-c",
            "from uffdd.remote.commands import page_server; page_server()",
            "--images", str(root), "--listen", listen, "--ready-file", str(ready),
            "--chunk-size", str(chunk_size), "--log-level", "warning", "--grace", "0",
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("page server did not start")
            time.sleep(0.02)
        yield json.loads(ready.read_text())["addresses"][0]
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


async def urgent_latencies(client: PageClient, size: int, count: int) -> list[float]:
    rng = random.Random(42)
    latencies = []
    for _ in range(count):
        address = BASE + rng.randrange(size // PAGE) * PAGE
        started = time.perf_counter()
        await client.fetch(IMAGE_ID, ImageAddr(address), PAGE, Priority.URGENT).read_all()
        latencies.append(time.perf_counter() - started)
    return latencies


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


async def run_transport(
    target: str,
    size: int,
    *,
    request: int,
    lanes: int,
    window: int,
    urgent_count: int,
    fast_lane: str,
) -> dict[str, float]:
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
        await urgent_latencies(client, size, 200)  # warm up
        # Alternate idle and loaded rounds so that anything else running on the machine
        # disturbs both samples alike.
        alone: list[float] = []
        loaded: list[float] = []
        bulk_during: list[float] = []
        per_round = max(1, urgent_count // ROUNDS)
        for _ in range(ROUNDS):
            alone += await urgent_latencies(client, size, per_round)
            sweep = BulkSweep(client, size, request, loop=True)
            sweep.start(depth=64)
            await asyncio.sleep(0.3)  # let the sweep fill the pipe
            received_before = sweep.received
            started = time.perf_counter()
            loaded += await urgent_latencies(client, size, per_round)
            elapsed = time.perf_counter() - started
            bulk_during.append((sweep.received - received_before) / elapsed / GiB)
            sweep.stop()
            await sweep.finished.wait()
            if sweep.errors:
                raise RuntimeError(f"bulk sweep failed: {sweep.errors[0]}")
    return {
        "bulk": bulk,
        "bulk_during": statistics.mean(bulk_during),
        "alone_p50": statistics.median(alone),
        "alone_p99": percentile(alone, 0.99),
        "loaded_p50": statistics.median(loaded),
        "loaded_p99": percentile(loaded, 0.99),
    }


def report(
    transport: str, lanes: int, fast_lane: str, result: dict[str, float], reference: float
) -> None:
    urgent = {
        "all": "urgent and bulk on the fast lane",
        "urgent": "urgent on the fast lane, bulk on gRPC",
        "off": "urgent and bulk on gRPC",
    }[fast_lane]
    print(f"\n[{transport}, {lanes} gRPC lane{'s' if lanes > 1 else ''}, {urgent}]")
    print(
        f"  bulk throughput      {result['bulk']:6.2f} GiB/s  "
        f"({result['bulk'] / reference:.3f}x plain read; target >= 1 GiB/s)"
    )
    print(
        f"  urgent alone         p50 {fmt_us(result['alone_p50'])}  "
        f"p99 {fmt_us(result['alone_p99'])}"
    )
    print(
        f"  urgent under bulk    p50 {fmt_us(result['loaded_p50'])}  "
        f"p99 {fmt_us(result['loaded_p99'])}  "
        f"(bulk meanwhile {result['bulk_during']:.2f} GiB/s)"
    )
    print(
        f"  ratio under/alone    p50 {result['loaded_p50'] / result['alone_p50']:5.2f}x  "
        f"p99 {result['loaded_p99'] / result['alone_p99']:5.2f}x  (target p99 <= 2x)",
        flush=True,
    )


async def run_all(args: argparse.Namespace, scratch: Path, size: int, reference: float) -> None:
    # one event loop for every client: grpc.aio binds its poller to the first loop
    chunk, request, window = map(parse_size, (args.chunk_size, args.request, args.window))
    for transport in args.transport.split(","):
        listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{scratch}/pages.sock"
        with page_server(scratch / "images", listen, chunk, scratch) as target:
            for lanes in map(int, args.lanes.split(",")):
                for fast in args.fast_lane.split(","):
                    result = await run_transport(
                        target,
                        size,
                        request=request,
                        lanes=lanes,
                        window=window,
                        urgent_count=args.urgent,
                        fast_lane=fast,
                    )
                    report(transport, lanes, fast, result, reference)


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
    parser.add_argument("--urgent", type=int, default=2000, help="urgent requests per run")
    args = parser.parse_args()
    size = parse_size(args.size)

    with tempfile.TemporaryDirectory(prefix="uffdd-bench-") as scratch_name:
        scratch = Path(scratch_name)
        started = time.perf_counter()
        image = make_image(scratch / "images", size)
        print(f"image: {size / GiB:.2f} GiB random data in {time.perf_counter() - started:.1f} s")
        reference = plain_read_gib_s(image / DATA_NAME)
        print(f"reference: plain read() of {DATA_NAME}: {reference:.2f} GiB/s")
        print(
            f"settings: chunk {args.chunk_size}, bulk request {args.request}, "
            f"window {args.window}, {args.urgent} urgent 4 KiB requests per run",
            flush=True,
        )
        codec_costs(parse_size(args.chunk_size))
        keep_freed_memory()  # the client side as the daemon runs it: warm buffers,
        short_slice()  # and a short slice for the loop's thread
        asyncio.run(run_all(args, scratch, size, reference))


if __name__ == "__main__":
    main()
