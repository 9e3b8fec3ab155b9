"""systemd integration without libsystemd: readiness, watchdog, socket activation.

Why our own: the protocols are a datagram to ``$NOTIFY_SOCKET`` and three environment
variables, far smaller than a dependency. Everything here is a no-op outside systemd, so
the daemon runs the same from a terminal, a test or a unit file.

- ``notify("READY=1")`` etc.: sd_notify(3). Abstract sockets start with ``@``.
- ``listen_fds()``: sd_listen_fds(3): fds from 3 on, only if ``$LISTEN_PID`` is us;
  names from ``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the .socket unit).
- ``watchdog_interval()``: half of ``$WATCHDOG_USEC`` (the keep-alive period systemd
  recommends), or None.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; False when not running under a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto("\n".join(assignments).encode(), address)
    return True


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


def listen_fds(*, unset_environment: bool = True) -> list[ListenFd]:
    """The sockets passed by socket activation, marked close-on-exec; [] when none."""
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
