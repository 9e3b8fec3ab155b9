"""The demand lane: a remote process's page faults read, fetched and installed in C.

Why: with the background sweep running, a demand fault served through the daemon's
Python loop waited for that loop twice, to be read and to be answered, while it handled
bulk chunks; fetching on the loop right after its read made every round trip block the
loop and slowed the sweep. So once a remote process's page client has its demand lane
connected, the daemon's routes (``daemon/routes.py``) hand the process's uffd to a
demand thread (``native/demander.py``, C in ``csrc/demander.c``), and the thread reports
back what it installed (the core's ``FastServed``) and every message it did not answer,
in order. The price is paid by a process that reads everything: its faults come as fast
as C answers them and take CPU from the sweep on a small machine; the engine knob
``demand_lane=off`` is the other side of that trade.

This module is the network's side: the connection is the fast lane's urgent protocol on
a socket of its own (plain TCP or Unix; never TLS: C does not speak it), with send and
receive timeouts so a page server that stops answering holds the thread ``TIMEOUT`` at
most; then the lane is broken, every process goes back to the loop, and the page client
opens a new lane later (``PageClient.demand_lane``). docs/architecture.md has the routes
a fault can take (section 6) and the fence that keeps the thread safe against layout
events (section 5.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import TYPE_CHECKING

from uffdd.client import bulk_receiver
from uffdd.client.fast_lane import CONNECT_TIMEOUT, RETRY_SECONDS
from uffdd.core.policy import FaultPlan
from uffdd.log import get_logger
from uffdd.native.demander import Demander, DemandReport
from uffdd.native.installer import Installer

if TYPE_CHECKING:
    from uffdd.client.fast_lane import FastLane

__all__ = ["DemandConnector", "DemandLane", "DemandReport", "DemandThread"]

TIMEOUT = 0.5
"""Seconds one send or receive may block the demand thread before the lane is broken."""

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


class DemandThread(Demander):
    """A demand thread on ``lane``'s socket; closing it closes the lane too."""

    def __init__(self, lane: DemandLane, plan: FaultPlan, installer: Installer) -> None:
        self.lane = lane
        try:
            super().__init__(lane.take(), plan=plan, installer=installer)
        except OSError:
            lane.release()
            raise

    def close(self) -> None:
        """Stop the thread (a fetch in progress ends: the socket is shut down) and
        close the lane; reports not taken are dropped."""
        super().close()
        self.lane.release()


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
            # asyncio.timeout, not wait_for (client/fast_lane.py says why)
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
