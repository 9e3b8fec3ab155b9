"""A token bucket for the page server's bulk lane (``--bulk-rate-limit``).

Why: a migration's background transfer competes with the source host's own work and
network; operators cap it (QEMU has max-postcopy-bandwidth for the same reason). Only
bulk data is limited: a demand fault's pages never wait for tokens, so the cap slows
residency, never a blocked thread.
"""

from __future__ import annotations

import asyncio
import time

from uffdd.config import parse_size


class TokenBucket:
    """``rate`` bytes per second with bursts up to ``burst`` bytes."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self, amount: int) -> float:
        """Seconds until the bucket holds ``amount`` bytes (at most a burst's worth);
        0.0 when it does now."""
        self._refill()
        return max(0.0, (min(amount, self.burst) - self._tokens) / self.rate)

    def take(self, amount: int) -> None:
        """Take ``amount`` bytes now (the bucket may go into debt)."""
        self._refill()
        self._tokens -= amount

    async def consume(self, amount: int) -> None:
        """Take ``amount`` bytes, sleeping until the bucket allows it (it may go into
        debt for one chunk larger than the burst, repaid by the next wait)."""
        self.take(amount)
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


def parse_rate(text: str) -> int:
    """``"50M"`` -> bytes per second (suffixes K, M, G: powers of 1024; plain bytes)."""
    try:
        value = parse_size(text.strip().upper().removesuffix("/S"))
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (e.g. 50M for 50 MiB/s)") from None
    if value < 4096:
        raise ValueError(f"rate {text!r} is below one page per second")
    return value
