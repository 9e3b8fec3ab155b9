"""Receiving file descriptors over Unix sockets, for every handover dialect.

Why one module: the native handover, CRIU's lazy-pages protocol and Firecracker's
backend all receive a userfaultfd as SCM_RIGHTS on a non-blocking socket, and all must
read every fd that arrives (even ones they did not ask for) so that none leaks, and
close them again on any error.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket

_INT = array.array("i").itemsize


def fds_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd carried in ``recvmsg``'s ancillary data (whole ints only)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _INT
            fds.extend(array.array("i", payload[:whole]))
    return fds


def close_fds(fds: list[int]) -> None:
    """Close and forget every fd in ``fds`` (one already closed is no error)."""
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


async def wait_readable(fileno: int) -> None:
    """Until ``fileno`` is readable (on the running loop)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fileno, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fileno)
