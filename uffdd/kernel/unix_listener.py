"""A listening Unix socket at a path: bound safely, a stale file replaced, unlinked when ours.

Why one home: the native handover socket and Firecracker's socket are both files a
restarted daemon must take back from a dead one, never from a live one, and never
more open than asked. So: a socket file nobody accepts on is removed (anything else at
the path is refused), the file is born with its mode (umask around bind, no window
where it is wider), and on close it is unlinked only if it is still the one bound here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from uffdd.core.errors import ConfigError

PROBE_TIMEOUT = 2.0
"""Seconds a connect to an existing socket file may take before it counts as in use."""


def bind_listener(
    path: Path, kind: int, *, mode: int = 0o600, gid: int | None = None, backlog: int = 64
) -> tuple[socket.socket, int, bool]:
    """A non-blocking ``kind`` (SOCK_STREAM, SOCK_SEQPACKET) socket listening at ``path``
    with file mode ``mode`` (and group ``gid``): the socket, the file's inode (for
    :func:`unlink_if_ours`), and whether a stale file was removed first. ConfigError
    when something else is at ``path`` or it cannot be bound."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    removed = remove_stale(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(backlog)
        sock.setblocking(False)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock, inode, removed


def remove_stale(path: Path, kind: int) -> bool:
    """Remove a socket file at ``path`` that nobody accepts on (a dead daemon's): True
    when one was removed. ConfigError for a non-socket file, a live listener, or a
    socket something else uses; nothing at ``path`` is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left behind by a dead daemon
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(
            f"{path} is a socket in use by something else ({exc.strerror or exc}); not removing it"
        ) from exc
    finally:
        probe.close()
    raise ConfigError(f"another process is listening on {path} (is a uffdd daemon running?)")


def unlink_if_ours(path: Path, inode: int) -> None:
    """Unlink ``path`` if it is still the file bound with ``inode`` (a newer daemon may
    have replaced it meanwhile)."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
