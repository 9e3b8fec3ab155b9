"""A submitted page fetch and the checks every chunk of it passes, whatever the lane.

Why apart from page_client.py: the gRPC lanes and the fast lane (fast_lane.py) carry
the same requests and must accept exactly the same chunks (request, address, length,
order, last flag, xxh3-64) and map the server's errors to the same exceptions; the
rules live here once, and each lane only moves bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import xxhash

from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import PageServerDataError, PageServerError, PageServerUnavailable
from uffdd.log import get_logger
from uffdd.wire.chunk_codec import WireChunk
from uffdd.wire.convert import error_for_status, status_code

_log = get_logger("uffdd.client.page_client")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Part of a request's range, in order. ``data`` is None when the range reads as
    zeros; otherwise a read-only view of exactly ``length`` verified bytes."""

    address: ImageAddr
    length: int
    data: memoryview | None


ChunkCallback = Callable[[Chunk], None]
DoneCallback = Callable[[PageServerError | None], None]


class Lane(Protocol):
    """What a request needs of the lane that carries it: one connection carrying
    requests of one priority (``page_client._GrpcLane``, a gRPC stream; ``FastLane``, a
    raw socket). The priority itself is the core's ``Priority``."""

    outstanding: dict[int, Request]
    """Requests sent to the server and not finished, by request id."""

    def finish(
        self,
        request: Request,
        error: PageServerError | None,
        *,
        notify: bool = True,
        tell_server: bool = False,
    ) -> None: ...

    def release(self, length: int) -> None: ...


class Request:
    """One submitted fetch. Callbacks run on the event loop, chunks in address order;
    ``on_done`` runs exactly once (None = complete) unless ``cancel()`` ran first or
    ``on_chunk`` raised (logged, and the request is cancelled)."""

    def __init__(
        self,
        lane: Lane,
        *,
        request_id: int,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        auto_release: bool = True,
    ) -> None:
        self.request_id = request_id
        self.image_id = image_id
        self.address = address
        self.length = length
        self.priority = priority
        self._lane = lane
        self._on_chunk = on_chunk
        self._on_done = on_done
        self._auto_release = auto_release  # credit returns once on_chunk returns
        self._next = int(address)
        self._charged = 0  # bulk window bytes held by this request
        self._timer: asyncio.TimerHandle | None = None
        self.done = False

    @property
    def lane(self) -> Lane:
        """The lane carrying this request (the fast lane or a gRPC lane)."""
        return self._lane

    @property
    def sent(self) -> bool:
        """Out to the server and not finished (False: still queued in the client, e.g.
        waiting for bulk window credit, or done)."""
        return self.request_id in self._lane.outstanding

    def cancel(self) -> None:
        """Stop the request: no further callbacks; the server is told to stop."""
        if not self.done:
            self._lane.finish(self, None, notify=False, tell_server=True)

    def settle(self, error: PageServerError | None, *, notify: bool) -> None:
        """The lane is done with this request: stop its timer, return the window credit
        it still holds unless it completed (its chunks returned that), and tell
        ``on_done`` (unless ``notify`` is False: cancelled, no more callbacks)."""
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
        if error is not None or not notify:
            self.release(self._charged)
        if notify:
            try:
                self._on_done(error)
            except Exception:
                _log.exception("on_done callback failed", request_id=self.request_id)

    def release(self, length: int) -> None:
        """Return ``length`` bytes of window credit (the consumer took a chunk)."""
        length = min(length, self._charged)
        if length:
            self._charged -= length
            self._lane.release(length)

    def expire(self, target: str) -> None:
        """The deadline passed (a timer callback)."""
        self._lane.finish(
            self,
            PageServerUnavailable(
                f"page server {target}: request for {self.image_id} "
                f"[{self.address:#x}, +{self.length:#x}) missed its deadline"
            ),
            tell_server=True,
        )

    def deliver(self, wire: WireChunk, target: str) -> None:
        """Check one chunk the server sent for this request and hand it on (or end the
        request with the server's error, or with PageServerDataError if it is wrong)."""
        if wire.error_code:
            self._lane.finish(
                self,
                error_for_status(
                    status_code(wire.error_code),
                    f"{self.image_id} [{self.address:#x}, +{self.length:#x}): {wire.error_message}",
                ),
            )
            return
        problem = self._problem(wire)
        if problem is not None:
            self._lane.finish(
                self,
                PageServerDataError(f"page server {target}, {self.image_id}: {problem}"),
                tell_server=True,
            )
            return
        self._next += wire.length
        chunk = Chunk(ImageAddr(wire.image_address), wire.length, None if wire.zero else wire.data)
        try:
            self._on_chunk(chunk)
        except Exception:
            # the consumer's bug must not take the lane (and every other request) down
            _log.exception("on_chunk callback failed", request_id=self.request_id)
            self._lane.finish(self, None, notify=False, tell_server=True)
            return
        if self._auto_release:
            self.release(wire.length)
        if wire.last:
            self._lane.finish(self, None)

    def _problem(self, wire: WireChunk) -> str | None:
        end = self.address + self.length
        if wire.image_address != self._next or wire.length <= 0:
            return f"chunk at {wire.image_address:#x}+{wire.length:#x}, expected {self._next:#x}"
        if self._next + wire.length > end:
            return f"chunk at {wire.image_address:#x}+{wire.length:#x} runs past {end:#x}"
        if wire.last != (self._next + wire.length == end):
            return "request ended early" if wire.last else "last chunk not marked last"
        if not wire.zero and xxhash.xxh3_64_intdigest(wire.data) != wire.checksum:
            return f"checksum mismatch in chunk at {wire.image_address:#x}"
        return None
