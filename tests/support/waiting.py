"""Waiting for a state nobody announces: look again until it holds, bounded, failing loudly.

Why: a test that must wait for something waits on an event when there is one (a future,
a JSON line from a child, a readiness file, ``waitpid``, a counter the product exposes).
Some states can only be seen by looking: another process's fd table, a thread's
``/proc`` entry once it was joined, a peer's bookkeeping. These helpers look until
``check()`` holds and otherwise fail with what was awaited once ``timeout`` has passed.
The bound guards against a hang; it is never a measurement, and no test asserts how
long the wait took.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

WAIT = 30.0
"""Seconds a state may take to arrive before the test fails (a hang guard)."""
_INTERVAL = 0.01

Check = Callable[[], object]
What = str | Callable[[], str]


def _message(what: What, timeout: float) -> str:
    return f"not reached within {timeout:g} s: {what if isinstance(what, str) else what()}"


def wait_until(
    check: Check, what: What, timeout: float = WAIT, *, interval: float = _INTERVAL
) -> None:
    """Until ``check()`` is true; AssertionError naming ``what`` (a text, or a function
    that describes what was seen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(_message(what, timeout))
        time.sleep(interval)


async def until(
    check: Callable[[], object | Awaitable[object]], what: What, timeout: float = WAIT
) -> None:
    """``wait_until`` on the running event loop: ``check`` may be a coroutine function,
    and the loop runs between looks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(_message(what, timeout))
        await asyncio.sleep(_INTERVAL)
