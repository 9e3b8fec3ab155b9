"""The demand lane: a remote process's page faults fetched and installed in C.

Why: with the background sweep running, a demand fault served through the daemon's
Python loop waited for that loop, busy with bulk chunks and their bookkeeping. The
benchmark's remote scenario (bench/README.md, session 7) measured, against the same
``uffdd page-server``: fault p50 1.8 ms through the loop, 0.16 ms for a C handler that
fetches the fault-around window on a blocking socket of its own and installs it. This
is that C handler inside the daemon: right after the loop reads a batch of faults (and
no layout event), ``uffdd_demand_fetch`` (kernel/_ffi_build.py) sends one urgent
fast-lane request per window, receives the answers, checks each chunk's xxh3 and
installs it with a waking ``UFFDIO_COPY``, with the GIL released. The core hears what
was installed as it does from the local fast path (``FastServed``), and every fault C
did not answer reaches the core as if C had never seen it.

The connection is the fast lane's urgent protocol on a socket of its own (plain TCP or
Unix; never TLS: C does not speak it), with send and receive timeouts so a page server
that stops answering costs the loop ``TIMEOUT`` at most; any error closes the lane and
the page client opens a new one later (``PageClient.demand_lane``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uffdd.kernel._uffd_ffi import ffi, lib
from uffdd.kernel.uffd import range_array
from uffdd.log import get_logger
from uffdd.remote import fastlane_thread
from uffdd.remote.fastlane_client import CONNECT_TIMEOUT, RETRY_SECONDS
from uffdd.sources import offered

if TYPE_CHECKING:
    from uffdd.remote.fastlane_client import FastLane

DEMAND_MAX: int = lib.UFFDD_DEMAND_MAX
"""Faults one fetch takes at most (one read's worth)."""
TIMEOUT = 0.5
"""Seconds one send or receive may block the loop before the lane is given up."""

_DONE_CAP = 4 * lib.UFFDD_DEMAND_MAX  # a window's chunks may need several copies each
_REQUEST_IDS = 1 << 62  # wraps long before the u64 field does

_log = get_logger("uffdd.remote.demand_lane")


def _xxh3_function() -> Any:
    """XXH3_64bits from the xxhash package's own extension: the checksum the page
    server computes (``image.format.checksum``), callable from C without the GIL."""
    spec = importlib.util.find_spec("xxhash._xxhash")
    origin = spec.origin if spec is not None else None
    assert origin is not None, "the xxhash package has no extension"
    library = ctypes.CDLL(origin)
    address = ctypes.cast(library.XXH3_64bits, ctypes.c_void_p).value
    assert address is not None
    return ffi.cast("uffdd_hash_fn", address)


_XXH3 = _xxh3_function()


class DemandTable:
    """Where C may fetch a process's faults: (run-time address, length, image address)
    rows, page-aligned and not overlapping: the core's ``fast_ranges``."""

    __slots__ = ("_count", "_ranges")

    def __init__(self, rows: Iterable[tuple[int, int, int]]) -> None:
        self._ranges, self._count = range_array(rows)

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True, slots=True)
class DemandResult:
    """What one :meth:`DemandLane.fetch` did."""

    installs: tuple[tuple[int, int], ...]
    """(run-time address, length) ranges installed (and woken)."""
    served: tuple[bool, ...]
    """Per fault asked about: answered here (its window is in)."""
    refused: int
    """Windows the page server refused or sent with a wrong checksum (their faults
    are not served; the core asks again and decides)."""
    error: int
    """0, or the errno that ended the lane (it is closed then)."""


class DemandLane:
    """One blocking connection to a page server's fast lane, used from the loop."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = sock
        sock.setblocking(True)
        timeout = struct.pack("ll", int(TIMEOUT), int(TIMEOUT % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        self._next_id = 1
        self._buffer: Any = ffi.new("char[]", 1)
        self._served: Any = ffi.new("uint8_t[]", lib.UFFDD_DEMAND_MAX)
        self._done: Any = ffi.new("struct uffdd_fast_done[]", _DONE_CAP)
        self._out: Any = ffi.new("struct uffdd_demand_out *")

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def local_address(self) -> object:
        """This end's socket address (what the page server sees as the peer)."""
        return None if self._sock is None else self._sock.getsockname()

    def fetch(
        self, fd: int, image_id: str, table: DemandTable, around: int, faults: Sequence[int]
    ) -> DemandResult:
        """Fetch and install the fault-around window of each fault address in
        ``faults`` (at most ``UFFDD_DEMAND_MAX``) that lies in ``table``, on ``fd``."""
        assert self._sock is not None, "fetch on a closed demand lane"
        if len(ffi.buffer(self._buffer)) < around:
            self._buffer = ffi.new("char[]", around)
        name = image_id.encode()
        first = self._next_id
        rc = lib.uffdd_demand_fetch(
            fd, self._sock.fileno(), name, len(name), table._ranges, table._count, around,
            ffi.new("uint64_t[]", list(faults)), len(faults), self._served, first, _XXH3,
            self._buffer, around, self._done, _DONE_CAP, self._out,
        )  # fmt: skip
        if rc < 0:
            raise ValueError(f"demand fetch refused its arguments (errno {-rc})")
        self._next_id = first + rc if first + rc < _REQUEST_IDS else 1
        out, done = self._out, self._done
        result = DemandResult(
            installs=tuple((int(done[i].run), int(done[i].len)) for i in range(out.ndone)),
            served=tuple(bool(self._served[i]) for i in range(len(faults))),
            refused=int(out.nrefused),
            error=int(out.error),
        )
        if result.error:
            _log.warning(
                "demand lane failed; faults take the page client's lanes",
                address=self.address,
                error=str(OSError(result.error, "")).strip(": "),
            )
            self.close()
        return result

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


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
                sock = await fastlane_thread.connect(address, asyncio.get_running_loop())
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


def demand_lane_of(source: object) -> DemandLane | None:
    """The connected demand lane behind ``source`` (a page client, through wrappers),
    or None: the source is local, has none, or is still connecting it."""
    lane = offered(source, "demand_lane")
    return lane if isinstance(lane, DemandLane) else None
