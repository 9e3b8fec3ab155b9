"""The installer thread's owner: bulk UFFDIO_COPY on a pthread of its own, fenced against
every read of each uffd.

Why: a large copy holds the thread that issues it for as long as the kernel takes to
fill the pages (milliseconds per MiB), and every demand fault read meanwhile waits
behind it. The installer (``uffdd-install``, ``csrc/installer.c``) runs queued copies in
pieces, without the GIL, while the loop reads faults and sockets. This owner takes fds,
addresses and buffers; it knows nothing of processes or images.

What the readers of a uffd owe (the executor; a demand thread reads and fences in C,
the executor does the rest): :meth:`Installer.watch` it before its first read (the one
step that can fail) and :meth:`unwatch` it at release; read it only inside
:meth:`Installer.reading`; on a layout event, fence it before leaving the block, then
:meth:`quiesce` it and take the completions before the core sees the event, and
:meth:`unfence`. The protocol, and why it keeps every byte the thread installs ahead of
the event: docs/architecture.md, section 5.3.

Completions are collected by :meth:`take` when :attr:`fd` (an eventfd) is readable.
A job cut short by a fence ends like a copy the kernel interrupted: EAGAIN with the
bytes done.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from uffdd.core.errors import UffdOpError
from uffdd.core.outcomes import OpResult, op_result
from uffdd.native._ffi import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

_TAKE_BATCH = 256


class Uffd(Protocol):
    """What the installer needs of a userfaultfd (``kernel.uffd.Uffd`` is one): its fd."""

    @property
    def fd(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Completed:
    """One finished job: its result, or the error no handler expects."""

    job: int
    result: OpResult | None
    error: UffdOpError | None = None


@dataclass(frozen=True, slots=True)
class InstallerStats:
    """What the installer thread is doing, read under its lock."""

    pieces: int
    """UFFDIO_COPY calls made so far."""
    queued: int
    """Jobs waiting for the thread."""
    untaken: int
    """Completions waiting for :meth:`Installer.take`."""
    watched: int
    """Uffds with a row in the fence table."""
    busy: bool
    """A job is in progress."""
    waiting_for_reader: bool
    """The thread is taking the uffd lock for its next piece: while a reader holds the
    lock, that piece waits (no piece runs during a read)."""


class Installer:
    """A started installer thread; stop it with :meth:`close`.

    ``capacity``: jobs queued, running, or finished and not taken (beyond it
    :meth:`submit` refuses, and the caller installs on its own thread). ``piece``: bytes per
    ioctl, the longest a read of a uffd waits for the thread. ``nice``: the thread's
    nice value (Linux schedules threads on their own), so bulk yields the CPU.
    """

    _handle: Any = None  # until started (a refused __init__ leaves nothing to stop)

    def __init__(self, *, capacity: int = 1024, piece: int = 64 * 1024, nice: int = 0) -> None:
        if piece <= 0 or piece % 4096:
            raise ValueError(f"piece {piece} is not a positive multiple of 4096")
        handle = lib.uffdd_installer_new(capacity, piece, nice)
        if handle == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"cannot start the installer thread: {os.strerror(err)}")
        self._handle = handle
        self._jobs: dict[int, tuple[Any, int, int]] = {}
        """Job id -> (the buffer export the thread reads, destination, length)."""
        self._next = 0
        self._out: Any = ffi.new("struct uffdd_install_done[]", _TAKE_BATCH)
        self._watched: set[int] = set()

    @property
    def handle(self) -> Any:
        """The C installer, for C threads that read uffds too (the demand thread)."""
        return self._handle

    @property
    def fd(self) -> int:
        """An eventfd, readable while completions wait for :meth:`take`."""
        return lib.uffdd_installer_efd(self._handle)

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet taken."""
        return len(self._jobs)

    def watch(self, uffd: Uffd) -> None:
        """``uffd`` will be read: give it its row in the fence table, before its first
        read. OSError (ENOMEM) when there is no room, with nothing read yet."""
        err = lib.uffdd_installer_watch(self._handle, uffd.fd)
        if err:
            raise OSError(err, f"cannot watch uffd {uffd.fd}: {os.strerror(err)}")
        self._watched.add(uffd.fd)

    def unwatch(self, uffd: Uffd) -> None:
        """``uffd`` is released and no job of it is left (:meth:`quiesce`): its row goes."""
        lib.uffdd_installer_unwatch(self._handle, uffd.fd)
        self._watched.discard(uffd.fd)

    def submit(self, uffd: Uffd, dst: int, data: Buffer, *, dontwake: bool) -> int | None:
        """Queue UFFDIO_COPY of ``data`` to ``dst``; the job id, or None when full.

        ``data`` is read in place until the job is taken: keep it unchanged.
        """
        keep = ffi.from_buffer(data)
        job = self._next = self._next + 1
        mode = lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0
        src = int(ffi.cast("uintptr_t", keep))
        if lib.uffdd_installer_submit(self._handle, uffd.fd, dst, src, len(keep), mode, job):
            return None
        self._jobs[job] = (keep, dst, len(keep))
        return job

    def take(self) -> list[Completed]:
        """Every completion so far, in the order the jobs ended."""
        taken: list[Completed] = []
        while count := lib.uffdd_installer_take(self._handle, self._out, _TAKE_BATCH):
            for index in range(count):
                done = self._out[index]
                job = int(done.id)
                _, dst, length = self._jobs.pop(job)
                try:
                    result = op_result("copy", int(done.err), int(done.copied), dst, length)
                except UffdOpError as exc:
                    taken.append(Completed(job, None, exc))
                else:
                    taken.append(Completed(job, result))
            if count < _TAKE_BATCH:
                break
        return taken

    @contextlib.contextmanager
    def reading(self) -> Iterator[Callable[[Uffd], None]]:
        """Hold off every piece while the block reads uffds; it gets ``fence(uffd)``.

        Do nothing in the block but read (and fence): :meth:`quiesce`, :meth:`fence`,
        :meth:`watch` or :meth:`unwatch` inside it would wait for itself.
        """
        lib.uffdd_installer_hold(self._handle)
        try:
            yield self._fence_held
        finally:
            lib.uffdd_installer_unhold(self._handle)

    def _fence_held(self, uffd: Uffd) -> None:
        assert uffd.fd in self._watched, f"uffd {uffd.fd} is read without being watched"
        lib.uffdd_installer_fence_held(self._handle, uffd.fd)

    def fence(self, uffd: Uffd) -> None:
        """No piece for the watched ``uffd`` starts from now until :meth:`unfence`."""
        with self.reading() as fence:
            fence(uffd)

    def unfence(self, uffd: Uffd) -> None:
        lib.uffdd_installer_unfence(self._handle, uffd.fd)

    def quiesce(self, uffd: Uffd) -> None:
        """For a fenced ``uffd``: end its queued jobs and wait for the one running.

        Afterwards the thread holds no job of ``uffd`` (their completions wait for
        :meth:`take`), so the fd may be closed.
        """
        lib.uffdd_installer_quiesce(self._handle, uffd.fd)

    def expedite(self, uffd: Uffd, address: int) -> bool:
        """A thread faulted at ``address``: the job that installs it goes first and
        wakes as it goes (the one running wakes from its next piece). False when no
        job of ``uffd`` covers it (any more)."""
        return lib.uffdd_installer_expedite(self._handle, uffd.fd, address) != 0

    def stats(self) -> InstallerStats:
        """The thread's counters and state now."""
        out: Any = ffi.new("struct uffdd_installer_stats *")
        lib.uffdd_installer_stats(self._handle, out)
        return InstallerStats(
            pieces=int(out.pieces),
            queued=int(out.queued),
            untaken=int(out.untaken),
            watched=int(out.watched),
            busy=bool(out.busy),
            waiting_for_reader=bool(out.waiting_for_reader),
        )

    def close(self) -> None:
        """Stop the thread (after the piece in progress) and drop unfinished jobs."""
        if self._handle is None:
            return
        lib.uffdd_installer_free(self._handle)  # joins the thread: no piece runs after
        self._handle = None
        self._jobs.clear()
        self._watched.clear()

    def __del__(self) -> None:
        # The thread reads the jobs' buffers: it must stop before they can be freed.
        self.close()
