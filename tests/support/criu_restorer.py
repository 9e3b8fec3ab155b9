"""A test stand-in for ``criu restore --lazy-pages``, written from the protocol facts.

Why: the CRIU dialect must be driven exactly as CRIU drives it. :class:`Tree` starts a
real process tree (``criu_tree.py``) whose tasks map their memory at the dump's
addresses and hand their uffds to the test; :func:`write_dump` writes that tree's dump
(pstree, mm, pagemap, pages) with the real pids, from the same known pattern the tasks
check against; :class:`Restorer` speaks the lazy-pages protocol to ``uffdd lazy-pages``
(pid, then uffd with a 1-byte payload; a zombie as a negated pid; the RSTF marker), and
offers the malformed variants. In CRIU each task sends its own pid and uffd, so uffdd
sees the task as the sender (SCM_CREDENTIALS); the stand-in sends on each task's behalf
with the task's credentials (root may name any process as the sender). Everything is
reaped and closed at the end.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from support.criu_tree import PAGE, page_pattern
from uffdd.demo.services import stop, uffdd_command, wait_for_path
from uffdd.image.criu.images import (
    PE_LAZY,
    PE_PRESENT,
    PagemapEntry,
    PagemapStyle,
    Task,
    Vma,
    write_inventory,
    write_mm,
    write_pagemap,
    write_pstree,
)

TREE_SCRIPT = Path(__file__).with_name("criu_tree.py")
TIMEOUT = 60.0
"""Seconds to wait for anything: a guard against hangs, never a measurement."""
RSTF = 0x52535446
BASE = 0x3F0000000000
"""Where the test tasks' memory lives (far from anything a Python process maps)."""
MIB = 1 << 20


def task_spec(
    index: int, parent: int | None, *, script: str = "wait", zombie: bool = False
) -> dict[str, Any]:
    """One task: two VMAs (1 MiB and 512 KiB) with lazy, non-lazy, absent and remapped
    parts; ``script`` "ops" adds a fork, an mremap, a DONTNEED and an munmap."""
    base = BASE + index * 64 * MIB
    vma1, vma2 = (base, base + MIB), (base + 4 * MIB, base + 4 * MIB + MIB // 2)
    entries = [
        (vma1[0], 64, PE_LAZY | PE_PRESENT),  # lazy
        (vma1[0] + 64 * PAGE, 16, PE_PRESENT),  # non-lazy: copied in by the restorer
        # [vma1 + 80 pages, +16 pages): absent, reads zeros
        (vma1[0] + 96 * PAGE, 160, PE_LAZY | PE_PRESENT),
        (vma2[0], 100, PE_LAZY | PE_PRESENT),
        (vma2[0] + 110 * PAGE, 18, PE_LAZY | PE_PRESENT),
    ]
    spec: dict[str, Any] = {
        "parent": parent,
        "seed": 1000 + index,
        "vmas": [list(vma1), list(vma2)],
        "entries": [list(e) for e in entries],
        "script": script,
        "zombie": zombie,
    }
    if script == "ops":
        spec["ops"] = {
            "remap": [vma1[0] + 200 * PAGE, base + 16 * MIB, 32 * PAGE],
            "remove": [vma1[0] + 120 * PAGE, 16 * PAGE],
            "unmap": [vma2[0] + 20 * PAGE, 8 * PAGE],
        }
    return spec


def tree_spec(script: str = "ops") -> list[dict[str, Any]]:
    """pstree order: root, a child (with a grandchild), a zombie child, a second child."""
    return [
        task_spec(0, None, script=script),
        task_spec(1, 0, script=script),
        task_spec(2, 1, script="check" if script == "ops" else script),
        task_spec(3, 0, zombie=True),
        task_spec(4, 0, script="check" if script == "ops" else script),
    ]


@dataclass
class Tree:
    """The started tree: its tasks' pids and uffds (ours until handed on) and reports."""

    specs: list[dict[str, Any]]
    proc: subprocess.Popen[bytes]
    control: socket.socket
    pids: dict[int, int] = field(default_factory=dict)
    """Task index -> pid in the tree's own pid namespace (the pstree pid)."""
    real_pids: dict[int, int] = field(default_factory=dict)
    """Task index -> pid in /proc's (uffdd's) pid namespace (zombies: none)."""
    uffds: dict[int, int] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(
        cls, specs: list[dict[str, Any]], spec_file: Path, prefix: tuple[str, ...] = ()
    ) -> Tree:
        """``prefix``: a command to start the tree under (``unshare --pid --fork``)."""
        spec_file.write_text(json.dumps({"tasks": specs}))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [*prefix, sys.executable, str(TREE_SCRIPT), str(spec_file), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        tree = cls(specs, proc, ours)
        try:
            while len(tree.pids) < len(specs):
                tree.receive()
        except BaseException:
            tree.close()
            raise
        return tree

    def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if not select.select([self.control], [], [], timeout)[0]:
            raise TimeoutError(f"the tree said nothing for {timeout} s")
        data, fds, _, _ = socket.recv_fds(self.control, 65536, 4)
        if not data:
            raise EOFError("the tree hung up")
        message: dict[str, Any] = json.loads(data)
        if "ready" in message:
            self.pids[message["ready"]] = message["pid"]
            self.real_pids[message["ready"]] = message["real"]
            (self.uffds[message["ready"]],) = fds
        elif "zombie" in message:
            self.pids[message["zombie"]] = message["pid"]
        else:
            self.reports.append(message)
        return message

    def wait_reports(self, key: str, count: int) -> list[dict[str, Any]]:
        while sum(key in r for r in self.reports) < count:
            self.receive()
        return [r for r in self.reports if key in r]

    def close_uffds(self) -> None:
        for fd in self.uffds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.uffds.clear()

    def close(self) -> int:
        """Let every task go (close the control socket), reap the root; its status."""
        self.close_uffds()
        self.control.close()
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(TIMEOUT)

    def kill(self) -> None:
        """SIGKILL every task (children first; the root reaps nothing then)."""
        for pid in reversed(self.real_pids.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()

    def __enter__(self) -> Tree:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.close()


def write_dump(images: Path, tree: Tree, style: PagemapStyle = "4.x") -> None:
    """The tree's CRIU dump: what each task's memory held, with the real pids."""
    images.mkdir(parents=True, exist_ok=True)
    write_inventory(images)
    tasks = []
    for index, spec in enumerate(tree.specs):
        parent = spec["parent"]
        ppid = 0 if parent is None else tree.pids[parent]
        tasks.append(Task(tree.pids[index], ppid, tree.pids[0], tree.pids[0]))
    write_pstree(images, tasks)
    for index, spec in enumerate(tree.specs):
        pid = tree.pids[index]
        if spec["zombie"]:
            continue
        write_mm(images, pid, [Vma(start, end) for start, end in spec["vmas"]])
        entries = [PagemapEntry(v, n, f) for v, n, f in spec["entries"]]
        write_pagemap(images, pid, index + 1, entries, style=style)
        with open(images / f"pages-{index + 1}.img", "wb") as pages:
            for entry in entries:
                for page in range(entry.vaddr, entry.end(PAGE), PAGE):
                    pages.write(page_pattern(spec["seed"], page))


@contextlib.contextmanager
def page_server(images: Path, base: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``uffdd page-server --images IMAGES`` on a Unix socket; yields its target and
    its process (stopped at the end unless it has been already)."""
    target = f"unix:{base / 'pages.sock'}"
    ready, log = base / "ready.json", base / "page-server.log"
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            uffdd_command("page-server", "--images", str(images), "--listen", target,
                          "--ready-file", str(ready)),
            stderr=stderr,
        )  # fmt: skip
    try:
        wait_for_path(ready, "page server", server, log, TIMEOUT)
        yield target, server
    finally:
        stop(server, TIMEOUT)


def lazy_pages_command(images: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uffdd", "lazy-pages",
            "-D", str(images), "-W", str(work), "--log-format", "json", "-v", *extra]  # fmt: skip


@dataclass
class LazyPages:
    """A running ``uffdd lazy-pages`` (stderr to a log file)."""

    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, images: Path, work: Path, *extra: str, prefix: tuple[str, ...] = ()
    ) -> LazyPages:
        """``prefix``: a command to start it under (``unshare --pid --fork``)."""
        log = work / "lazy-pages.log"
        work.mkdir(parents=True, exist_ok=True)
        command = [*prefix, *lazy_pages_command(images, work, *extra)]
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(command, stderr=stderr)
        return cls(proc, log)

    def connect(self, work: Path) -> socket.socket:
        path = work / "lazy-pages.socket"
        deadline = time.monotonic() + TIMEOUT
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uffdd lazy-pages never listened: {self.text()}") from None
                time.sleep(0.05)

    def wait(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            raise

    def events(self) -> list[dict[str, Any]]:
        lines = self.text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]

    def wait_for_event(self, event: str, count: int = 1) -> None:
        """Until the log holds ``count`` ``event`` lines (a hang guard, not a timer)."""
        deadline = time.monotonic() + TIMEOUT
        while sum(e.get("event") == event for e in self.events()) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {count} {event!r} events: {self.text()}")
            time.sleep(0.02)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


class Restorer:
    """The lazy-pages protocol as criu restore speaks it (and ways to break it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send_pid(self, pid: int, sender: int | None = None) -> None:
        """``sender``: the credentials' pid (None: this process's own)."""
        self.send(struct.pack("=i", pid), sender)

    def send_task(self, pid: int, uffd: int, sender: int | None) -> None:
        """Task ``pid``'s pid and uffd, as sent by process ``sender`` (the task itself
        in CRIU; None: this process, which is not the task)."""
        self.send_pid(pid, sender)
        self.send(b"\0", sender, [uffd])

    def send_zombie(self, pid: int) -> None:
        self.send_pid(-pid)

    def send(self, data: bytes, sender: int | None, fds: list[int] | None = None) -> None:
        ancillary: list[tuple[int, int, bytes]] = []
        if fds:
            ancillary.append(
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
            )
        if sender is not None:
            creds = struct.pack("3i", sender, os.getuid(), os.getgid())
            ancillary.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds))
        assert self.sock.sendmsg([data], ancillary) == len(data)

    def finish(self) -> None:
        self.sock.sendall(struct.pack("=I", RSTF))
        self.sock.close()

    def hand_over(self, tree: Tree) -> None:
        """Every task in pstree order, then close our copies of the uffds."""
        for index, spec in enumerate(tree.specs):
            if spec["zombie"]:
                self.send_zombie(tree.pids[index])
            else:
                self.send_task(tree.pids[index], tree.uffds[index], tree.real_pids[index])
        tree.close_uffds()
