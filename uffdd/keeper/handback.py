"""Descriptors going back from a keeper to a daemon that resumes (both ends).

Why a protocol of its own: the keeper holds the dead daemon's uffds, pidfds and
restorer connections under their old numbers; a new daemon receives them as new
numbers and must know which is which. On ``DIR/GEN/keeper.sock`` (SOCK_SEQPACKET, the
keeper's uid or root only) the keeper sends records ``{"fds": [old numbers]}`` each with
those descriptors as SCM_RIGHTS, then ``{"end": true}``; the daemon answers
``{"taken": true}`` once it journaled them in its own generation and holds them with its
own twin. Until then the keeper keeps everything: a daemon that dies while taking them
back costs nothing.
"""

from __future__ import annotations

import array
import json
import socket
from pathlib import Path

from uffdd.kernel.fdpass import close_fds, fds_in

BATCH = 200
"""Descriptors per message (the kernel's SCM_MAX_FD is 253)."""
_MAX_RECORD = 1 << 16


def send_all(conn: socket.socket, descriptors: list[int]) -> None:
    """The keeper's side: every descriptor, then the end marker (blocking)."""
    for start in range(0, len(descriptors), BATCH):
        batch = descriptors[start : start + BATCH]
        payload = json.dumps({"fds": batch}).encode()
        conn.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))])
    conn.sendall(json.dumps({"end": True}).encode())


def wait_taken(conn: socket.socket) -> bool:
    """The keeper's side: whether the daemon said it holds everything now."""
    try:
        data = conn.recv(_MAX_RECORD)
    except OSError:
        return False
    try:
        return bool(data) and json.loads(data).get("taken") is True
    except ValueError:
        return False


def take_back(path: Path, timeout: float = 5.0) -> tuple[socket.socket, dict[int, int]] | None:
    """The daemon's side: connect to the keeper at ``path`` and receive everything it
    holds, as {old number: new descriptor}. None when no keeper listens there. The
    socket stays open: :func:`release` it once the descriptors are held by this
    daemon's own twin and journaled."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    received: dict[int, int] = {}
    try:
        while True:
            data, ancillary, _, _ = sock.recvmsg(_MAX_RECORD, socket.CMSG_SPACE(BATCH * 4))
            fds = fds_in(ancillary)
            if not data:
                close_fds(fds)
                raise ConnectionError("the keeper hung up before the end")
            record = json.loads(data)
            if record.get("end") is True:
                close_fds(fds)
                return sock, received
            numbers = [int(n) for n in record["fds"]]
            if len(numbers) != len(fds):
                close_fds(fds)
                raise ConnectionError("the keeper sent a record that does not match its fds")
            received.update(zip(numbers, fds, strict=True))
    except (OSError, ValueError, KeyError, ConnectionError):
        close_fds(list(received.values()))
        sock.close()
        raise


def release(sock: socket.socket) -> None:
    """The daemon's side: tell the keeper it may let go, and hang up."""
    try:
        sock.sendall(json.dumps({"taken": True}).encode())
    finally:
        sock.close()
