"""The Firecracker socket and the stream IO on its connections.

Why apart from the listener: binding (stale-socket handling, mode) and receiving
(recvmsg with room for fds, timeouts, a last look at unread bytes at shutdown) are
plain socket work; the listener keeps only the protocol's decisions.
"""

from __future__ import annotations

import array
import asyncio
import socket
import time
from pathlib import Path

from uffdd.kernel.fdpass import fds_in, wait_readable
from uffdd.kernel.unix_listener import bind_listener, unlink_if_ours
from uffdd.log import get_logger

_log = get_logger("uffdd.firecracker")

_INT = array.array("i").itemsize
_MAX_FDS = 8
_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * _INT)
_RECV_BYTES = 64 * 1024


class FirecrackerSocket:
    """The listening SOCK_STREAM socket (bound here, unlinked on close)."""

    def __init__(self, sock: socket.socket, path: Path, inode: int) -> None:
        self.sock = sock
        self.path = path
        self._inode = inode

    @classmethod
    def bind(cls, path: Path, *, mode: int = 0o600, backlog: int = 64) -> FirecrackerSocket:
        """Bind and listen at ``path``; a stale socket file is replaced, anything else
        (a live listener, a regular file) is a ConfigError."""
        path = Path(path)
        sock, inode, _ = bind_listener(path, socket.SOCK_STREAM, mode=mode, backlog=backlog)
        return cls(sock, path, inode)

    def close(self) -> None:
        self.sock.close()
        unlink_if_ours(self.path, self._inode)


async def recv(conn: socket.socket, fds: list[int], timeout: float | None) -> bytes | None:
    """One recvmsg (its fds go to ``fds``): the data, b"" at EOF, None on timeout.

    (On a stream socket an fd always travels with at least one byte of data.)"""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            data, ancillary, flags, _ = conn.recvmsg(
                _RECV_BYTES, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionResetError:
            return b""
        else:
            fds.extend(fds_in(ancillary))
            if flags & socket.MSG_CTRUNC:
                _log.warning("a Firecracker peer sent more fds than fit; the kernel dropped some")
            return data
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        try:
            await asyncio.wait_for(wait_readable(conn.fileno()), remaining)
        except TimeoutError:
            return None


def drain_now(conn: socket.socket, fds: list[int]) -> bytes:
    """Whatever the peer sent and we have not read yet, without waiting (fds to ``fds``)."""
    received = b""
    while True:
        try:
            data, ancillary, _, _ = conn.recvmsg(
                _RECV_BYTES, _ANCILLARY, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except OSError:
            return received
        fds.extend(fds_in(ancillary))
        if not data:
            return received
        received += data
