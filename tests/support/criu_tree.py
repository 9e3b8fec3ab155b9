"""A process tree restored the way ``criu restore --lazy-pages`` leaves it (run as a script).

Why a program of its own: the CRIU tests need real tasks, each with its own memory at
the dump's addresses and its own uffd, that then run and check every byte they read
against the dump. ``python criu_tree.py SPEC CONTROL_FD``: the started process is task
0; every task forks its pstree children first, then maps its VMAs at their addresses
(MAP_FIXED_NOREPLACE), copies in its non-lazy pages (as CRIU's restorer does), creates
a uffd with EVENT_FORK|REMAP|REMOVE|UNMAP, registers its VMAs (MISSING), sends the uffd
to the test on the shared control socket (SOCK_SEQPACKET, JSON + SCM_RIGHTS) and closes
its copy (with its pid in uffdd's namespace, ``real``: the tree may live in a pid
namespace of its own, where the root is 1). A zombie task exits at once (its parent
reaps it at the very end). Then, by its script: "wait" touches nothing; "ops" reads a
few pages, forks (the child checks all its memory), mremaps, madvise(DONTNEED)s and
munmaps untouched ranges, reports, then checks every page. Every process waits for the
test to close the control socket.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import socket
import struct
import sys
from typing import Any

from uffdd.kernel.uffd import Feature, RegisterMode, Uffd

PAGE = os.sysconf("SC_PAGE_SIZE")
PE_LAZY, PE_PRESENT = 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
EVENTS = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]  # fmt: skip
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def page_pattern(seed: int, address: int) -> bytes:
    """The dumped content of the page at image ``address`` of the task with ``seed``."""
    return struct.pack("<QQ", seed, address) * (PAGE // 16)


def real_pid() -> int:
    """This process's pid in /proc's pid namespace (uffdd's), whatever its own is."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return int(line.split()[1])
    raise OSError("no NSpid in /proc/self/status")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


class Memory:
    """What the task's memory must hold: live mappings (run -> image) and dropped pages."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.seed: int = task["seed"]
        self.data: set[int] = set()
        for vaddr, count, flags in task["entries"]:
            if flags & PE_PRESENT:
                self.data.update(range(vaddr, vaddr + count * PAGE, PAGE))
        self.pages: dict[int, int] = {}  # run address -> image address
        for start, end in task["vmas"]:
            self.pages.update((a, a) for a in range(start, end, PAGE))
        self.zeroed: set[int] = set()  # image addresses dropped by MADV_DONTNEED

    def expected(self, image: int) -> bytes:
        if image in self.zeroed or image not in self.data:
            return bytes(PAGE)
        return page_pattern(self.seed, image)

    def check(self, run: int) -> None:
        actual = ctypes.string_at(run, PAGE)
        expected = self.expected(self.pages[run])
        if actual != expected:
            raise AssertionError(
                f"pid {os.getpid()}: page at {run:#x} (image {self.pages[run]:#x}) holds "
                f"{actual[:16].hex()}..., expected {expected[:16].hex()}..."
            )

    def check_all(self, rng: random.Random) -> int:
        order = sorted(self.pages)
        rng.shuffle(order)
        for run in order:
            self.check(run)
        return len(order)


class Task:
    def __init__(self, spec: dict[str, Any], index: int, control: socket.socket) -> None:
        self.spec = spec
        self.task = spec["tasks"][index]
        self.index = index
        self.control = control
        self.children: list[int] = []

    def send(self, fds: list[int] | None = None, **message: Any) -> None:
        socket.send_fds(self.control, [json.dumps(message).encode()], fds or [])

    def run(self) -> None:
        for number, task in enumerate(self.spec["tasks"]):
            if task["parent"] == self.index:
                self.fork_task(number)
        if self.task.get("zombie"):
            os._exit(0)
        memory = Memory(self.task)
        self.restore(memory)
        script = self.task.get("script", "wait")
        try:
            if script == "ops":
                self.ops(memory)
            if script in ("ops", "check"):
                pages = memory.check_all(random.Random(self.task["seed"]))
                self.send(verified=self.index, pid=os.getpid(), ok=True, pages=pages)
        except Exception as exc:  # report, never die silently
            self.send(verified=self.index, pid=os.getpid(), ok=False, error=str(exc))
        self.wait_for_the_end()

    def fork_task(self, number: int) -> None:
        pid = os.fork()
        if pid == 0:
            self.children = []
            code = 0
            try:
                Task(self.spec, number, self.control).run()
            except BaseException:
                code = 1
            os._exit(code)
        self.children.append(pid)
        if self.spec["tasks"][number].get("zombie"):
            self.send(zombie=number, pid=pid)

    def restore(self, memory: Memory) -> None:
        """Map, copy non-lazy pages, create and register the uffd, hand it over."""
        for start, end in self.task["vmas"]:
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
            address = _libc.mmap(start, end - start, 3, flags, -1, 0)
            if address != start:
                raise OSError(f"mmap at {start:#x} gave {address}")
        for vaddr, count, flags in self.task["entries"]:
            if flags & PE_PRESENT and not flags & PE_LAZY:
                for page in range(vaddr, vaddr + count * PAGE, PAGE):
                    ctypes.memmove(page, memory.expected(page), PAGE)
        uffd = Uffd.create(nonblocking=True)
        uffd.api(EVENTS)
        for start, end in self.task["vmas"]:
            uffd.register(start, end - start, RegisterMode.MISSING)
        self.send([uffd.fd], ready=self.index, pid=os.getpid(), real=real_pid())
        uffd.close()

    def ops(self, memory: Memory) -> None:
        """Fork, mremap, madvise and munmap while pages are still missing."""
        for vaddr, _, flags in self.task["entries"]:
            if flags & PE_LAZY:
                memory.check(vaddr)
        ops = self.task["ops"]
        pid = os.fork()  # EVENT_FORK: returns once the daemon took the child's uffd
        if pid == 0:
            try:
                pages = memory.check_all(random.Random(pid))
                self.send(forked=self.index, pid=os.getpid(), ok=True, pages=pages)
            except Exception as exc:
                self.send(forked=self.index, pid=os.getpid(), ok=False, error=str(exc))
            self.children = []
            self.wait_for_the_end()
        self.children.append(pid)
        old, new, length = ops["remap"]
        flags = MREMAP_MAYMOVE | MREMAP_FIXED
        if _libc.mremap(old, length, length, flags, new) != new:
            raise OSError(ctypes.get_errno(), "mremap")
        for offset in range(0, length, PAGE):
            memory.pages[new + offset] = memory.pages.pop(old + offset)
        start, length = ops["remove"]
        _check(_libc.madvise(start, length, MADV_DONTNEED), "madvise")
        memory.zeroed.update(memory.pages[a] for a in range(start, start + length, PAGE))
        start, length = ops["unmap"]
        _check(_libc.munmap(start, length), "munmap")
        for address in range(start, start + length, PAGE):
            del memory.pages[address]
        self.send(ops_done=self.index, pid=os.getpid())

    def wait_for_the_end(self) -> None:
        """Block until the test closes the control socket; reap; leave."""
        while self.control.recv(16):
            pass
        for child in self.children:
            os.waitpid(child, 0)
        os._exit(0)


def main() -> None:
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    control = socket.socket(fileno=int(sys.argv[2]))
    Task(spec, 0, control).run()


if __name__ == "__main__":
    main()
