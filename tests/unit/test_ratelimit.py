"""The bulk-lane token bucket and the rate syntax of --bulk-rate-limit.

The bucket runs on a fake clock here: its waits are checked exactly, without timing
anything.
"""

from __future__ import annotations

import asyncio

import pytest

from uffdd.pageserver import ratelimit
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


class FakeClock:
    """The bucket's clock and sleep: time moves only when the bucket sleeps (or the
    test says so), so every wait is exact and nothing is measured."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(ratelimit, "time", fake)
    monkeypatch.setattr(ratelimit, "asyncio", fake)
    return fake


def test_bucket_spends_its_burst_then_waits_for_the_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1 << 20, burst=1 << 20)
    asyncio.run(bucket.consume(1 << 20))  # the burst: no wait
    assert clock.slept == []
    asyncio.run(bucket.consume(256 << 10))  # a quarter second's worth at 1 MiB/s
    assert clock.slept == [0.25]


def test_bucket_refills_at_the_rate_up_to_the_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1 << 20, burst=256 << 10)
    bucket.take(256 << 10)
    assert bucket.delay(128 << 10) == 0.125  # empty: half the burst takes 1/8 s
    clock.now += 0.0625
    assert bucket.delay(128 << 10) == 0.0625  # a quarter of the burst came back
    clock.now += 60
    assert bucket.delay(1 << 30) == 0.0  # full, and never more than the burst ...
    bucket.take(1 << 30)
    assert bucket.delay(0) == ((1 << 30) - (256 << 10)) / (1 << 20)  # ... so in debt
