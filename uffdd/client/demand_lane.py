"""The demand lane: a remote process's page faults read, fetched and installed in C.

Why: with the background sweep running, a demand fault served through the daemon's
Python loop waited for that loop twice, to be read and to be answered, while it
handled bulk chunks. The benchmark's remote scenario (bench/README.md, session 7)
measured, against the same ``uffdd page-server``: fault p50 1.1 ms through the loop,
0.17 ms for a C handler that reads the uffd itself, fetches the fault-around window on
a blocking socket of its own and installs it. A first version fetched on the loop,
right after its read: the no-sweep fault fell from 594 to ~460 us, but every round
trip blocked the loop, and reading 2 GiB in random order fell from 0.44 to 0.17 GiB/s.

So the C handler is a thread of the daemon, ``uffdd-demand`` (``uffdd_demander_*`` in
native/build.py, which says how it stays safe against layout events): once a
remote process's page client has its demand lane connected, the executor hands the
process's uffd over (:class:`DemandThread`), and the thread reports back what it
installed (the core's ``FastServed``) and every message it did not answer, in order.
The uffds ready at once share one round trip. Measured with the sweep running: fault
p50 1.18-1.23 ms -> 0.23-0.27 ms, p99 7.1-7.4 -> 3.0-3.4 ms; the price is paid by a
process that reads everything, whose faults now come as fast as C answers them and
take CPU from the sweep on a small machine (2 GiB in random order: 0.45-0.50 ->
0.27-0.37 GiB/s). The engine knob ``demand_lane=off`` is the other side of that trade.

The connection is the fast lane's urgent protocol on a socket of its own (plain TCP or
Unix; never TLS: C does not speak it), with send and receive timeouts so a page server
that stops answering holds the thread ``TIMEOUT`` at most; then the lane is broken,
every process goes back to the loop, and the page client opens a new lane later
(``PageClient.demand_lane``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uffdd.client import bulk_receiver
from uffdd.client.fast_lane import CONNECT_TIMEOUT, RETRY_SECONDS
from uffdd.core.wire import MSG_SIZE
from uffdd.kernel.uffd import range_array
from uffdd.log import get_logger
from uffdd.native._ffi import ffi, lib
from uffdd.native.checksum import XXH3_64BITS

if TYPE_CHECKING:
    from uffdd.client.fast_lane import FastLane

TIMEOUT = 0.5
"""Seconds one send or receive may block the demand thread before the lane is broken."""
MAX_PROCESSES = 4096
"""Processes one demand thread serves at most (more stay on the loop)."""

_TAKE = 64
_log = get_logger("uffdd.client.demand_lane")


class DemandLane:
    """One blocking connection to a page server's fast lane, for a demand thread."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = sock
        sock.setblocking(True)
        timeout = struct.pack("ll", int(TIMEOUT), int(TIMEOUT % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        self._taken = False

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def local_address(self) -> object:
        """This end's socket address (what the page server sees as the peer)."""
        return None if self._sock is None else self._sock.getsockname()

    def take(self) -> int:
        """The socket's fd, for a demand thread: from now on :meth:`close` only shuts
        the connection down (the thread may be in a call on the fd), and the thread's
        :meth:`release` closes it once the thread has stopped."""
        assert self._sock is not None, "a closed demand lane"
        self._taken = True
        return self._sock.fileno()

    def close(self) -> None:
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if not self._taken:
            self.release()

    def release(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


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
    :meth:`DemandThread.resume`."""
    drained: bool
    """The uffd was empty after this read."""
    read_error: int
    """errno of a failed read (or 0): the uffd is no longer read."""
    lane_error: int
    """errno that broke the connection (or 0): the thread answers nothing any more."""
    fence_failed: bool
    """A layout event could not be fenced (too many at once): the process is unsafe."""


def _rows_array(rows: Iterable[tuple[int, int, int]]) -> tuple[Any, int]:
    """The core's fast ranges, (run, image, length), as C's range array."""
    return range_array((run, length, image) for run, image, length in rows)


def _zeros_array(zeros: Iterable[tuple[int, int]]) -> tuple[Any, int]:
    """The core's zero ranges, (run, length), as C's range array."""
    return range_array((run, length, 0) for run, length in zeros)


class DemandThread:
    """``uffdd-demand``: reads the uffds handed to it and serves their faults over
    ``lane``; :meth:`take` the reports when :attr:`fd` is readable."""

    def __init__(self, lane: DemandLane, around: int, installer: Any) -> None:
        self.lane = lane
        handle = lib.uffdd_demander_new(
            lane.take(), XXH3_64BITS, around, MAX_PROCESSES, installer or ffi.NULL
        )
        if handle == ffi.NULL:
            err = ffi.errno
            lane.release()
            raise OSError(err, f"cannot start the demand thread: {os.strerror(err)}")
        self._handle: Any = handle
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
        """Read and serve the (non-blocking) uffd ``fd`` from now on, with the core's
        fast ranges ``rows`` and zero ranges ``zeros``; returns its slot. OSError when
        there is no room."""
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
        """Stop the thread (a fetch in progress ends: the socket is shut down) and
        close the lane; reports not taken are dropped."""
        if self._handle is not None:
            lib.uffdd_demander_free(self._handle)
            self._handle = None
        self.lane.release()


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
        fence_failed=bool(flags & lib.UFFDD_DR_FENCE),
    )


class DemandConnector:
    """A page client's demand lane: opened to the address its urgent fast lane
    connected to, once it has, and opened again (``RETRY_SECONDS`` after the last
    attempt) when it fails."""

    def __init__(self, urgent: FastLane) -> None:
        self._urgent = urgent
        self._lane: DemandLane | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0

    def lane(self) -> DemandLane | None:
        """The connected lane, else None (and a connection started when due)."""
        if self._lane is not None and not self._lane.closed:
            return self._lane
        address = self._urgent.address
        if address is None or self._task is not None:
            return None
        loop = asyncio.get_running_loop()
        if loop.time() >= self._retry_at:
            self._retry_at = loop.time() + RETRY_SECONDS
            self._task = loop.create_task(self._connect(address), name="uffdd-demand-connect")
        return None

    async def _connect(self, address: str) -> None:
        try:
            # asyncio.timeout, not wait_for (fastlane_client says why)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                sock = await bulk_receiver.connect(address, asyncio.get_running_loop())
            self._lane = DemandLane(sock, address)
            _log.info("demand lane connected", address=address, local=str(self._lane.local_address))
        except (OSError, TimeoutError) as exc:
            _log.warning("demand lane connect failed", address=address, error=str(exc))
        finally:
            self._task = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lane is not None:
            self._lane.close()
