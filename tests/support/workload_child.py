"""The scripted workload: a real process whose memory a test serves through userfaultfd.

Why a separate process, driven by commands: a thread of the test process that faults
on registered memory while holding the GIL would deadlock the Python handler, and a
restored process is another process anyway. This script is that process. It reads one
JSON command per SOCK_SEQPACKET message, performs it on its own memory (mmap, touch,
fork, mremap, madvise, munmap, exit...) and answers with one JSON message, passing fds
(a uffd, a memfd, the socket of a forked child) with SCM_RIGHTS. Commands that fault
block until the test resolves the fault, which is the point. Run by
``support.workload.Workload.start``; stdlib and ``uffdd`` only.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import socket
import sys
from typing import Any

from uffdd.kernel.uffd import Feature, RegisterMode, Uffd

PAGE = os.sysconf("SC_PAGE_SIZE")
MAP_HUGETLB = 0x40000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MAX_MESSAGE = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
for _name in ("munmap", "madvise", "mprotect"):
    getattr(_libc, _name).restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _check_ptr(result: int | None, what: str) -> int:
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _check_int(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class Child:
    """The command interpreter of one workload process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.uffd: Uffd | None = None
        self.children: list[int] = []

    def serve(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            command: dict[str, Any] = json.loads(data)
            op = command.pop("op")
            fds: list[int] = []
            try:
                result = getattr(self, f"op_{op}")(fds, **command)
                reply: dict[str, Any] = {"ok": True, "result": result}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            socket.send_fds(self.sock, [json.dumps(reply).encode()], fds)
            for fd in fds:
                os.close(fd)
            self.reap()
        self.shutdown()

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.remove(pid)

    def shutdown(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()

    # -- commands: each returns a JSON-able result and may append fds to send ----------

    def op_ping(self, fds: list[int]) -> int:
        return os.getpid()

    def op_uffd(
        self, fds: list[int], *, features: int = 0, keep: bool = False, nonblocking: bool = True
    ) -> int:
        """Create a uffd, negotiate ``features``, send it; keep a copy only if asked."""
        uffd = Uffd.create(nonblocking=nonblocking)
        info = uffd.api(Feature(features))
        fds.append(os.dup(uffd.fd))
        if keep:
            self.uffd = uffd
        else:
            uffd.close()
        return int(info.features)

    def op_close_uffd(self, fds: list[int]) -> None:
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None

    def op_mmap(
        self,
        fds: list[int],
        *,
        length: int,
        kind: str = "anon",
        fill: str | None = None,
        prot: str = "rw",
        share_fd: bool = False,
    ) -> int:
        """Map ``length`` bytes; ``fill`` (base64) is written first (page cache for memfd)."""
        data = base64.b64decode(fill) if fill is not None else None
        protection = {"rw": 3, "r": 1, "none": 0}[prot]
        if kind == "memfd":
            memfd = os.memfd_create("uffdd-workload", os.MFD_CLOEXEC)
            try:
                os.ftruncate(memfd, length)
                if data is not None:
                    os.pwrite(memfd, data, 0)
                addr = _check_ptr(_libc.mmap(None, length, protection, 0x01, memfd, 0), "mmap")
                if share_fd:
                    fds.append(os.dup(memfd))
            finally:
                os.close(memfd)
            return addr
        flags = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
        if kind == "hugetlb":
            flags |= MAP_HUGETLB
        elif kind != "anon":
            raise ValueError(f"unknown kind {kind}")
        addr = _check_ptr(_libc.mmap(None, length, protection, flags, -1, 0), "mmap")
        if data is not None:
            ctypes.memmove(addr, data, len(data))
        return addr

    def op_register(self, fds: list[int], *, addr: int, length: int, mode: int) -> int:
        if self.uffd is None:
            raise RuntimeError("no uffd kept")
        return int(self.uffd.register(addr, length, RegisterMode(mode)))

    def op_move(
        self, fds: list[int], *, dst: int, src: int, length: int, allow_src_holes: bool = False
    ) -> list[Any]:
        """UFFDIO_MOVE issued by this process on itself, with the uffd it kept."""
        if self.uffd is None:
            raise RuntimeError("no uffd kept")
        result = self.uffd.move(dst, src, length, allow_src_holes=allow_src_holes)
        return [result.outcome.name, result.done]

    def op_read(self, fds: list[int], *, addr: int, length: int) -> str:
        return base64.b64encode(ctypes.string_at(addr, length)).decode()

    def op_write(self, fds: list[int], *, addr: int, data: str) -> None:
        raw = base64.b64decode(data)
        if not raw:
            return
        # The first byte on its own, first: a fault then reports ``addr`` exactly.
        # memmove's store order depends on the CPU (on this AMD EPYC a 5-byte move
        # stored bytes 1-4 first, and EXACT_ADDRESS reported addr + 1).
        ctypes.c_ubyte.from_address(addr).value = raw[0]
        ctypes.memmove(addr + 1, raw[1:], len(raw) - 1)

    def op_mremap(
        self, fds: list[int], *, addr: int, length: int, new_length: int, to: int | None = None
    ) -> int:
        flags = MREMAP_MAYMOVE | (MREMAP_FIXED if to is not None else 0)
        return _check_ptr(_libc.mremap(addr, length, new_length, flags, to), "mremap")

    def op_madvise(self, fds: list[int], *, addr: int, length: int, advice: int) -> None:
        _check_int(_libc.madvise(addr, length, advice), "madvise")

    def op_munmap(self, fds: list[int], *, addr: int, length: int) -> None:
        _check_int(_libc.munmap(addr, length), "munmap")

    def op_fork(self, fds: list[int]) -> int:
        """Fork; the new process serves commands on a fresh socket sent with the reply."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                self.sock.close()
                self.children = []
                Child(theirs).serve()
            except BaseException:
                code = 1
            os._exit(code)
        theirs.close()
        self.children.append(pid)
        fds.append(ours.detach())
        return pid

    def op_exit(self, fds: list[int], *, code: int = 0) -> None:
        self.shutdown()
        os._exit(code)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    Child(sock).serve()


if __name__ == "__main__":
    main()
