"""The demand thread's owner (``uffdd-demand``, ``csrc/demander.c``): remote processes'
faults read, fetched and installed in C.

Why a thread: with the background sweep running, a demand fault answered through the
daemon's Python loop waited for that loop twice, to be read and to be answered, while it
handled bulk chunks. The thread reads the uffds handed to it, fetches what the core's
plan gives each fault over its own blocking socket (the fast lane's urgent protocol),
checks each chunk's checksum and installs it; the uffds ready at once share one round
trip. It reports back what it installed and every message it did not answer, in order,
and stops reading a uffd at each layout event (fenced by the installer it is given)
until :meth:`Demander.resume`.

This owner takes fds, the core's ranges as tuples and an image id; the connection
(``client/demand_lane.py``) and what the reports mean to the core
(``daemon/routes.py``) are not its business. docs/architecture.md: the thread (section
4), its fence (5.3), the route (6.2 B).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from uffdd.core.policy import FaultPlan
from uffdd.core.wire import MSG_SIZE
from uffdd.native._ffi import ffi, lib
from uffdd.native.fast_serve import plan_struct, range_array
from uffdd.native.installer import Installer

MAX_PROCESSES = 4096
"""Processes one demand thread serves at most (more stay on the loop)."""

_TAKE = 64


@dataclass(frozen=True, slots=True)
class DemandReport:
    """What the demand thread did with one read of a process's uffd."""

    token: int
    read_at: float
    done_at: float
    """time.monotonic() of the read, and of the end of its fetches and installs."""
    faults: int
    """Faults answered (their window installed, or found present and woken)."""
    installs: tuple[tuple[int, int], ...]
    """(run-time address, length) ranges installed (and woken)."""
    messages: bytes
    """Raw uffd_msg records the thread did not answer, in order (``decode_messages``)."""
    layout: bool
    """``messages`` hold a layout event: the uffd is fenced and no longer read until
    :meth:`Demander.resume`."""
    drained: bool
    """The uffd was empty after this read."""
    read_error: int
    """errno of a failed read (or 0): the uffd is no longer read."""
    lane_error: int
    """errno that ended the thread's service (or 0): the connection's, or ENOMEM when
    it found no memory for a round (it then read nothing); it answers nothing any more."""


def _rows_array(rows: Iterable[tuple[int, int, int]]) -> tuple[Any, int]:
    """The core's fast ranges, (run, image, length), as C's range array."""
    return range_array((run, length, image) for run, image, length in rows)


def _zeros_array(zeros: Iterable[tuple[int, int]]) -> tuple[Any, int]:
    """The core's zero ranges, (run, length), as C's range array."""
    return range_array((run, length, 0) for run, length in zeros)


class Demander:
    """``uffdd-demand`` on the connected, blocking socket ``sock`` (the caller's: close it
    after :meth:`close`): reads the uffds handed to it and serves their faults as the
    core's ``plan`` says (``core.policy.plan_fault``); :meth:`take` the reports when
    :attr:`fd` is readable.
    Every uffd handed to it must be watched by ``installer``."""

    _handle: Any = None  # until started (a refused __init__ leaves nothing to stop)

    def __init__(
        self,
        sock: int,
        *,
        plan: FaultPlan,
        installer: Installer,
        max_processes: int = MAX_PROCESSES,
    ) -> None:
        handle = lib.uffdd_demander_new(sock, plan_struct(plan), max_processes, installer.handle)
        if handle == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"cannot start the demand thread: {os.strerror(err)}")
        self._handle = handle
        self._installer = installer  # the C thread uses it: it must outlive the thread
        self._out: Any = ffi.new("struct uffdd_demand_report[]", _TAKE)

    @property
    def fd(self) -> int:
        """The eventfd that is readable while reports wait."""
        return int(lib.uffdd_demander_efd(self._handle))

    def add(
        self,
        token: int,
        fd: int,
        image_id: str,
        rows: Iterable[tuple[int, int, int]],
        zeros: Iterable[tuple[int, int]],
    ) -> int:
        """Read and serve the (non-blocking, watched) uffd ``fd`` from now on, with the
        core's fast ranges ``rows`` (run, image, length) and zero ranges ``zeros`` (run,
        length); returns its slot. OSError when there is no room."""
        ranges, count = _rows_array(rows)
        zero_ranges, zero_count = _zeros_array(zeros)
        name = image_id.encode()
        slot = int(
            lib.uffdd_demander_add(
                self._handle, fd, token, name, len(name), ranges, count, zero_ranges, zero_count
            )
        )
        if slot < 0:
            raise OSError(-slot, os.strerror(-slot))
        return slot

    def resume(
        self, slot: int, rows: Iterable[tuple[int, int, int]], zeros: Iterable[tuple[int, int]]
    ) -> None:
        """The core has handled the slot's layout event: read it again, with the fast
        and zero ranges as they are now."""
        ranges, count = _rows_array(rows)
        zero_ranges, zero_count = _zeros_array(zeros)
        rc = int(
            lib.uffdd_demander_resume(self._handle, slot, ranges, count, zero_ranges, zero_count)
        )
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def mark_reads(self, marks: Any, count: int, slots: Any, slot_size: int) -> None:
        """Journal each read of a uffd (``keeper/journal.py``): its mark in ``marks``
        (``count`` bytes, one per fd number), its messages in ``slots`` (``slot_size``
        bytes per fd number). The memory must outlive the thread (the caller's)."""
        lib.uffdd_demander_marks(self._handle, marks, count, slots, slot_size)

    def remove(self, slot: int) -> None:
        """Stop serving the slot's uffd; the thread no longer touches it afterwards."""
        lib.uffdd_demander_remove(self._handle, slot)

    def take(self) -> list[DemandReport]:
        reports: list[DemandReport] = []
        while count := int(lib.uffdd_demander_take(self._handle, self._out, _TAKE)):
            for index in range(count):
                reports.append(_report(self._out[index]))
            if count < _TAKE:
                break
        return reports

    def close(self) -> None:
        """Stop the thread (a fetch in progress ends: the socket is shut down); reports
        not taken are dropped. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.uffdd_demander_free(handle)


def _report(raw: Any) -> DemandReport:
    """A report as Python values; frees its C buffers."""
    try:
        done = raw.installs
        installs = tuple((int(done[i].run), int(done[i].len)) for i in range(raw.ninstalls))
        messages = bytes(ffi.buffer(raw.msgs, raw.nmsgs * MSG_SIZE)) if raw.nmsgs else b""
    finally:
        lib.uffdd_free(raw.installs)
        lib.uffdd_free(raw.msgs)
    flags = int(raw.flags)
    return DemandReport(
        token=int(raw.token),
        read_at=float(raw.read_at),
        done_at=float(raw.done_at),
        faults=int(raw.nfaults),
        installs=installs,
        messages=messages,
        layout=bool(flags & lib.UFFDD_DR_LAYOUT),
        drained=bool(flags & lib.UFFDD_DR_DRAINED),
        read_error=int(raw.err) if flags & lib.UFFDD_DR_ERROR else 0,
        lane_error=int(raw.err) if flags & lib.UFFDD_DR_LANE else 0,
    )
