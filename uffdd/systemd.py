"""systemd integration without libsystemd: readiness, watchdog, socket activation, fd store.

Why our own: the protocols are a datagram to ``$NOTIFY_SOCKET`` and three environment
variables, far smaller than a dependency. Everything here is a no-op outside systemd, so
the daemon runs the same from a terminal, a test or a unit file.

- ``notify("READY=1")`` etc.: sd_notify(3). Abstract sockets start with ``@``.
- ``listen_fds()``: sd_listen_fds(3): fds from 3 on, only if ``$LISTEN_PID`` is us;
  names from ``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the .socket unit, or the
  ``FDNAME=`` an fd was stored under). ``by_name()`` groups them.
- ``fd_store(name, fds)`` / ``fd_store_remove(name)``: sd_pid_notify_with_fds(3) with
  ``FDSTORE=1`` / ``FDSTOREREMOVE=1``: systemd keeps the fds (the unit needs
  ``FileDescriptorStoreMax=``) across the service's death and restart and passes them
  back through ``listen_fds()`` after the socket-activation fds. What systemd 252 does
  with them (tests/systemd/ shows each under a real one): it keeps one copy of an open
  file however often it is stored (under the first name; two pidfds of one process are
  two files and both are kept); it drops a stored fd that polls POLLHUP/POLLERR (a
  pidfd once its process is reaped, a userfaultfd before UFFDIO_API); it passes them
  back in no promised order, even under one name (tell them apart by name, or by what
  each fd is); past ``FileDescriptorStoreMax=`` it closes the rest and only logs it;
  and it empties the store when the unit is stopped rather than restarted.
- ``watchdog_interval()``: half of ``$WATCHDOG_USEC`` (the keep-alive period systemd
  recommends), or None.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3
FDNAME_MAX = 255
"""systemd's limit on an FDNAME= (and a FileDescriptorName=)."""


def notify(*assignments: str, fds: Sequence[int] = ()) -> bool:
    """Send ``KEY=VALUE`` lines to systemd, with ``fds`` attached as SCM_RIGHTS; False
    when not running under a notify unit. The kernel's errors (a full queue, a gone
    systemd) raise OSError: a caller that stores fds must know they were not stored."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([message], rights, 0, address)
    return True


def under_systemd() -> bool:
    """Whether a notify socket was given (a Type=notify unit: the fd store may exist)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def ready(status: str = "") -> bool:
    """Tell systemd the service is ready (Type=notify), with an optional status line."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    """Tell systemd a graceful stop has begun."""
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    """Update the one-line status `systemctl status` shows."""
    return notify(f"STATUS={text}")


def watchdog_ping() -> bool:
    """Keep the watchdog (WatchdogSec=) from restarting us."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half the timeout), or None when not enabled."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ListenFd:
    """A socket systemd passed us, with its FileDescriptorName (or "unknown")."""

    fd: int
    name: str


def valid_fdname(name: str) -> bool:
    """Whether systemd accepts ``name`` as an FDNAME: 1..255 printable ASCII characters,
    no ``:`` (it separates names in ``$LISTEN_FDNAMES``)."""
    return 0 < len(name) <= FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


def _checked(name: str) -> str:
    if not valid_fdname(name):
        raise ValueError(f"not a valid FDNAME (1..{FDNAME_MAX} printable, no ':'): {name!r}")
    return name


def fd_store(name: str, fds: Sequence[int]) -> bool:
    """Hand ``fds`` to systemd's fd store under ``name``; False outside systemd. systemd
    keeps its own copies: the caller still owns (and may close) its ``fds``."""
    if not fds:
        raise ValueError("fd_store needs at least one fd")
    return notify("FDSTORE=1", f"FDNAME={_checked(name)}", fds=fds)


def fd_store_remove(name: str) -> bool:
    """Drop every fd stored under ``name``; False outside systemd."""
    return notify("FDSTOREREMOVE=1", f"FDNAME={_checked(name)}")


def listen_fds(*, unset_environment: bool = True) -> list[ListenFd]:
    """The fds systemd passed at start, each marked close-on-exec; [] when none:
    socket-activation fds first, then those of the fd store. Take them once (the
    environment is unset) and share the list: each side picks its fds by name."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    try:
        total = int(count)
    except ValueError:
        return []
    labels = names.split(":") if names else []
    passed = []
    for index in range(total):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        passed.append(ListenFd(fd, labels[index] if index < len(labels) else "unknown"))
    return passed


def by_name(passed: Iterable[ListenFd], prefix: str = "") -> dict[str, list[int]]:
    """The passed fds whose name starts with ``prefix``, grouped by name, each group in
    the order systemd passed them (not the order they were stored in)."""
    grouped: dict[str, list[int]] = {}
    for each in passed:
        if each.name.startswith(prefix):
            grouped.setdefault(each.name, []).append(each.fd)
    return grouped
