"""The C threads and Python compute the same checksum (xxHash's XXH3-64).

Why: a chunk is summed by whoever writes it (the image writer, the page server's loop or
its C answerer) and checked by whoever receives it (the page client in Python, the
demand thread in C). The C calls XXH3 from the system's xxhash.h, Python the xxhash
package: any difference between them would make every chunk look corrupt to one side.
XXH3 takes a different path for each range of lengths (0, 1-3, 4-8, 9-16, 17-128,
129-240, longer in stripes and blocks), so every path is tried, on random bytes.
"""

from __future__ import annotations

import random

from uffdd.image.format import checksum
from uffdd.native._ffi import lib

LENGTHS = [
    *range(0, 300),
    *range(1000, 1100),
    1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536, 65537,
    (1 << 20) + 7, 4 << 20,
]  # fmt: skip


def test_c_and_python_agree_on_random_inputs_of_many_lengths() -> None:
    rng = random.Random(20240611)
    for length in LENGTHS:
        for _ in range(3 if length < 4096 else 1):
            data = rng.randbytes(length)
            assert lib.uffdd_checksum(data, length) == checksum(data), length


def test_the_checksum_is_xxh3_64() -> None:
    # XXH3_64bits of no bytes (seed 0), as xxHash's own tests give it
    assert lib.uffdd_checksum(b"", 0) == checksum(b"") == 0x2D06800538D394C2
