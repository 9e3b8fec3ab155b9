"""What checksumming costs the page server: xxh3-64 vs crc32 vs copying the same bytes.

Why a benchmark: the image format checksums every 64 KiB chunk (verified once, on first
use) and the page server checksums every chunk it sends, so the checksum must cost
well under 5 % of serving a chunk. Absolute speeds vary between machines, so every
candidate is timed in the same run against two references over the same bytes:

* ``memcpy``: copying the chunk into a preallocated buffer, the least any server does;
* ``serve``: building and serializing a protobuf message holding the chunk
  (``BytesValue``), the minimum the gRPC page server does per chunk before the network;
* ``gRPC``: actually streaming the chunks over a loopback gRPC connection (one
  server-streaming call, raw bytes messages, no TLS), i.e. serving throughput.

Run: ``.venv/bin/python bench/bench_checksum.py [--mib 64] [--rounds 5]``. The ratios
(candidate time / reference time) are the result; the cost of xxh3 in serving is
``xxh3 / (gRPC + xxh3)``: the fraction of serving throughput lost by checksumming
every chunk sent (the image's own chunk checks run once per chunk per open image).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import xxhash
from google.protobuf import wrappers_pb2

from uffdd.image.format import checksum

Kernel = Callable[[memoryview, bytearray], object]


def _memcpy(chunk: memoryview, scratch: bytearray) -> object:
    scratch[: len(chunk)] = chunk
    return None


def _serve(chunk: memoryview, scratch: bytearray) -> object:
    return wrappers_pb2.BytesValue(value=bytes(chunk)).SerializeToString()


def _xxh3(chunk: memoryview, scratch: bytearray) -> object:
    return checksum(chunk)


def _xxh3_raw(chunk: memoryview, scratch: bytearray) -> object:
    return xxhash.xxh3_64_intdigest(chunk)


def _crc32(chunk: memoryview, scratch: bytearray) -> object:
    return zlib.crc32(chunk)


KERNELS: dict[str, Kernel] = {
    "memcpy": _memcpy,
    "serve": _serve,
    "xxh3-64": _xxh3,
    "xxh3-64 (raw call)": _xxh3_raw,
    "crc32 (zlib)": _crc32,
}


def measure(kernel: Kernel, data: memoryview, chunk_size: int, rounds: int) -> float:
    """Best-of-``rounds`` seconds to run ``kernel`` over ``data`` in ``chunk_size`` slices."""
    scratch = bytearray(chunk_size)
    chunks = [data[offset : offset + chunk_size] for offset in range(0, len(data), chunk_size)]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for chunk in chunks:
            kernel(chunk, scratch)
        best = min(best, time.perf_counter() - start)
    return best


def grpc_stream(data: memoryview, chunk_size: int, rounds: int) -> float:
    """Best-of-``rounds`` seconds to stream ``data`` in chunks over loopback gRPC."""

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for offset in range(0, len(data), chunk_size):
            yield bytes(data[offset : offset + chunk_size])

    limit = 2 * chunk_size + 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    handler = grpc.method_handlers_generic_handler(
        "bench.Pages", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    best = float("inf")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_stream(
                "/bench.Pages/Stream", request_serializer=None, response_deserializer=None
            )
            for _ in range(rounds):
                start = time.perf_counter()
                received = sum(len(message) for message in call(b""))
                best = min(best, time.perf_counter() - start)
                assert received == len(data)
    finally:
        server.stop(None)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="bytes to process per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = memoryview(os.urandom(args.mib << 20))
    print(f"cpu: {cpu_model()}; python {platform.python_version()}; xxhash {xxhash.VERSION}")
    print(f"{args.mib} MiB of random bytes, best of {args.rounds} rounds\n")
    for chunk_size in (4 << 10, 64 << 10, 1 << 20):
        times = {name: measure(k, data, chunk_size, args.rounds) for name, k in KERNELS.items()}
        times["gRPC"] = grpc_stream(data, chunk_size, max(2, args.rounds // 2))
        print(f"chunk {chunk_size >> 10} KiB")
        print(f"  {'kernel':<20} {'GB/s':>8} {'/ memcpy':>9} {'/ serve':>9} {'/ gRPC':>9}")
        for name, seconds in times.items():
            rate = len(data) / seconds / 1e9
            print(
                f"  {name:<20} {rate:>8.2f} {seconds / times['memcpy']:>9.3f} "
                f"{seconds / times['serve']:>9.3f} {seconds / times['gRPC']:>9.3f}"
            )
        for reference in ("serve", "gRPC"):
            share = times["xxh3-64"] / (times[reference] + times["xxh3-64"])
            crc = times["crc32 (zlib)"] / (times[reference] + times["crc32 (zlib)"])
            verdict = "within" if share < 0.05 else "OVER"
            print(
                f"  checksum cost vs {reference:<6} xxh3 {share:6.1%} ({verdict} the 5% budget)"
                f", crc32 {crc:6.1%}"
            )
        print()


if __name__ == "__main__":
    main()
