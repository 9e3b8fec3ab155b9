"""The bulk-lane token bucket and the rate syntax of --bulk-rate-limit."""

from __future__ import annotations

import asyncio
import time

import pytest

from uffdd.pageserver.ratelimit import TokenBucket, parse_rate


@pytest.mark.parametrize(
    ("text", "rate"),
    [("4096", 4096), ("50M", 50 << 20), ("1.5G", 3 << 29), ("64KiB/s", 64 << 10), ("2mb", 2 << 20)],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "", "10", "-5M", "M"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@pytest.mark.timeout(10)
def test_bucket_spends_its_burst_then_waits_for_the_rate() -> None:
    async def spend() -> float:
        bucket = TokenBucket(rate=1 << 20, burst=1 << 20)
        await bucket.consume(1 << 20)  # the burst: no wait
        started = time.monotonic()
        await bucket.consume(256 << 10)  # a quarter second's worth at 1 MiB/s
        return time.monotonic() - started

    # A lower bound only: sleeping never ends early, while a busy machine may be late.
    assert asyncio.run(spend()) >= 0.24
