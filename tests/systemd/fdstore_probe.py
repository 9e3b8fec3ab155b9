"""A service that uses systemd's fd store through uffdd.systemd, run by a real systemd.

Why a program of its own: the fd store round trip needs a process that systemd started
(its $NOTIFY_SOCKET, its FileDescriptorStoreMax=), that dies by SIGKILL and is started
again by Restart=on-failure; the test only watches from outside.

``fdstore_probe.py DIR``: DIR is shared with the test and holds ``fifo`` (a named pipe
whose read end the test holds) and ``report.jsonl``, where each start appends one line.

- First start (nothing passed): stores, by name, the FIFO's write end (``fifo``), a
  memfd holding a random token (``memfd``), two memfds under one name (``pair``), the
  ``memfd`` once more under another name (``again``), a memfd it then removes again
  (``dropme``), two initialized userfaultfds (``uffd``, ``uffd-other``), two pidfds of
  the container's PID 1 (``pidfd-init``, ``pidfd-init-again``: two open files of one
  process) and the pidfd of a child that then exits and is reaped (``pidfd-gone``).
- Later starts: report every name passed back, what each fd is and holds, and write a
  line through the FIFO's write end.

Each start reports the socket-activation fds it was passed too (by name), then tells
systemd READY=1 and waits to be killed (sending WATCHDOG=1 if the unit asks for it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from uffdd import systemd
from uffdd.kernel.uffd import Feature, Uffd

SOCKET_NAMES = ("handover",)
"""FileDescriptorName= of uffdd.socket, passed when the probe runs as uffdd.service."""
FEATURES = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.THREAD_ID


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("probe")
    os.write(fd, content)
    return fd


def _must_store(name: str, fds: list[int]) -> None:
    if not systemd.fd_store(name, fds):
        raise SystemExit("no $NOTIFY_SOCKET: not started by systemd")


def first_start(directory: Path) -> dict[str, object]:
    token = os.urandom(16).hex()
    memfd = _memfd(token.encode())
    fifo = os.open(directory / "fifo", os.O_WRONLY | os.O_NONBLOCK)
    uffd = Uffd.create()
    uffd.api(FEATURES)
    other_uffd = Uffd.create()
    other_uffd.api(Feature.EVENT_UNMAP)
    child = os.fork()
    if child == 0:
        os._exit(0)
    pidfd = os.pidfd_open(child)
    _must_store("fifo", [fifo])
    _must_store("memfd", [memfd])
    _must_store("pair", [_memfd(b"first"), _memfd(b"second")])
    _must_store("again", [memfd])
    _must_store("dropme", [_memfd(b"dropped")])
    _must_store("uffd", [uffd.fd])
    _must_store("uffd-other", [other_uffd.fd])
    _must_store("pidfd-init", [os.pidfd_open(1)])
    _must_store("pidfd-init-again", [os.pidfd_open(1)])
    _must_store("pidfd-gone", [pidfd])
    systemd.fd_store_remove("dropme")
    os.waitpid(child, 0)
    return {
        "token": token,
        "memfd_inode": os.fstat(memfd).st_ino,
        "uffd_features": int(uffd.info().features),
        "other_features": int(other_uffd.info().features),
    }


def _pidfd_pid(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise ValueError(f"fd {fd} is not a pidfd")


def later_start(passed: list[systemd.ListenFd]) -> dict[str, object]:
    fds: dict[str, list[dict[str, object]]] = {}
    for each in passed:
        target = os.readlink(f"/proc/self/fd/{each.fd}")
        entry: dict[str, object] = {"target": target}
        if target.startswith("/memfd:"):
            entry["content"] = os.pread(each.fd, 64, 0).decode()
            entry["inode"] = os.fstat(each.fd).st_ino
        elif target == "anon_inode:[userfaultfd]":
            entry["features"] = int(Uffd.adopt(each.fd).info().features)
        elif target == "anon_inode:[pidfd]":
            entry["pid"] = _pidfd_pid(each.fd)
        elif each.name == "fifo":
            os.write(each.fd, f"written by {os.getpid()} through the stored fd\n".encode())
        fds.setdefault(each.name, []).append(entry)
    return {"fds": fds}


def main() -> None:
    directory = Path(sys.argv[1])
    passed = systemd.listen_fds()
    # A socket unit's fds come first, with the fd store's: told apart by name.
    sockets = [each.name for each in passed if each.name in SOCKET_NAMES]
    stored = [each for each in passed if each.name not in SOCKET_NAMES]
    report = later_start(stored) if stored else first_start(directory)
    line = json.dumps({"pid": os.getpid(), "sockets": sockets, **report}) + "\n"
    with (directory / "report.jsonl").open("a") as out:
        out.write(line)
    systemd.ready()
    interval = systemd.watchdog_interval()
    while True:
        if interval is None:
            signal.pause()
        else:
            time.sleep(interval)  # the keep-alive period systemd asks for
            systemd.watchdog_ping()


if __name__ == "__main__":
    main()
