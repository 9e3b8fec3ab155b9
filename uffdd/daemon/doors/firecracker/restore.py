"""One handed-over Firecracker uffd: served by the daemon, then let go safely.

Why more than ``Daemon.start``: Firecracker keeps its own copy of the uffd, and its
balloon can drop guest pages at any time in the VM's life, long after every page was
installed. With the uffd still registered, each such ``madvise`` blocks until someone
reads its REMOVE event, and the next touch of a dropped page blocks until someone
answers the fault. So at full residency this restore does not just close its fd: it
**unregisters every region** (the kernel then handles those pages as ordinary
anonymous or hugetlbfs memory: a dropped page reads zeros, for 4 KiB and 2 MiB pages
alike, and no more events are raised) and keeps reading the uffd until the VMM exits,
for events that were raised just before the unregister. If the unregister fails the
VMM is killed: nobody would answer its faults.

While the daemon serves, REMOVE events go to the core (later faults there get zero
pages; on hugetlbfs, which has no ZEROPAGE, the executor copies a zeroed huge page),
and the executor holds a duplicate of the uffd that it closes when it lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable

from uffdd.core.errors import UffdOpError
from uffdd.core.process import LazyRegion
from uffdd.daemon.doors.native.listener import drain_events, let_go
from uffdd.daemon.executor import TreeOutcome
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger

_log = get_logger("uffdd.firecracker")


class VmRestore:
    """Owns the received uffd and a pidfd of the VMM for as long as either is needed."""

    def __init__(
        self,
        name: str,
        pid: int,
        pidfd: int,
        uffd: Uffd,
        regions: list[LazyRegion],
        on_end: Callable[[VmRestore], None],
    ) -> None:
        self.name = name
        self.pid = pid
        self.pidfd = pidfd
        self.uffd = uffd
        self.regions = regions
        self.executor_uffd = Uffd(os.dup(uffd.fd))
        """The daemon's copy (closed by the executor when it lets go)."""
        self.resident = False
        self._watching = False
        self._closed = False
        self._on_end = on_end

    # -- the daemon's callbacks (Restore.on_done, Restore.close) ---------------------------

    def done(self, outcome: TreeOutcome) -> None:
        """The daemon let go: fully resident -> unregister and watch; else nothing."""
        if outcome.failure is not None or outcome.exited or self._closed:
            return
        self.resident = True
        try:
            for region in self.regions:
                self.uffd.unregister(region.run, region.length)
        except UffdOpError as exc:
            _log.error(
                "cannot unregister a resident VM's memory: killing it", vm=self.name, error=str(exc)
            )
            self.kill()
            self.resident = False
            return
        # Every other range this uffd registers too (guest memory outside the image): with
        # nothing registered left, no event of the VMM can ever wait for a reader, not
        # even once this daemon is gone (the VM is no longer journaled).
        let_go(self.uffd, self.pid, self.pidfd, self.name)
        _log.info("resident VM memory unregistered; watching until the VMM exits", vm=self.name)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.uffd.fd, self._drain)
        loop.add_reader(self.pidfd, self.close_now)
        self._watching = True
        self._drain()

    def close(self) -> None:
        """Restore.close: release everything unless the resident watch took over."""
        self.executor_uffd.close()
        if not self.resident:
            self.close_now()

    # -- the resident watch ------------------------------------------------------------

    def _drain(self) -> None:
        """Read (and so complete) events raised before the unregister took effect."""
        drain_events(self.uffd)

    def close_now(self) -> None:
        """The VMM exited, or uffdd stops: close the uffd and the pidfd (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._watching:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.uffd.fd)
            loop.remove_reader(self.pidfd)
            self._watching = False
            with contextlib.suppress(UffdOpError):
                self._drain()
        self.executor_uffd.close()
        self.uffd.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self._on_end(self)

    def kill(self) -> None:
        """SIGKILL the VMM: it must not run on with memory nobody serves."""
        if self._closed:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
