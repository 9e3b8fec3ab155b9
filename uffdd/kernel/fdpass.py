"""Receiving file descriptors (and who sent them) over Unix sockets, for every dialect.

Why one module: the native handover, CRIU's lazy-pages protocol and Firecracker's
backend all receive a userfaultfd as SCM_RIGHTS on a non-blocking socket, and all must
read every fd that arrives (even ones they did not ask for) so that none leaks, and
close them again on any error. Who sent a message (SCM_CREDENTIALS) is the one thing a
dialect whose peer speaks for others (CRIU's restorer) can prove a pid with.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
from dataclasses import dataclass

_INT = array.array("i").itemsize
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
CREDENTIALS_SPACE = socket.CMSG_SPACE(_UCRED.size)
"""recvmsg ancillary room for one SCM_CREDENTIALS (add it to the room for fds)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """SCM_CREDENTIALS of one message: its sender as the kernel saw it at send().

    ``pid`` is translated into the receiver's pid namespace: 0 when the sender has no
    pid there (it lives in a namespace the receiver cannot see)."""

    pid: int
    uid: int
    gid: int


def pass_credentials(sock: socket.socket) -> None:
    """SO_PASSCRED: every message received on ``sock`` carries its sender's credentials.

    Set it on a listening socket before anyone connects: accepted sockets inherit it,
    and a message sent before accept() carries credentials only if it was set then."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def credentials_in(ancillary: list[tuple[int, int, bytes]]) -> Credentials | None:
    """The SCM_CREDENTIALS carried in ``recvmsg``'s ancillary data, if any."""
    for level, kind, payload in ancillary:
        is_credentials = level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        if is_credentials and len(payload) >= _UCRED.size:
            return Credentials(*_UCRED.unpack_from(payload))
    return None


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
