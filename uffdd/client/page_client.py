"""The daemon's page-server client: pipelined, prioritised, verified, never hanging.

Why this shape (shared/DESIGN.md section 4): a demand fault costs one round trip, so
requests are pipelined on a long-lived Stream and never wait for each other; urgent
requests go on their own lane (a second stream on its own connection, so bulk bytes
already in HTTP/2 and TCP buffers cannot delay them); bulk requests are sent only while
the bytes outstanding fit in a window, which bounds memory whatever the consumer's
pace. Every chunk is checked (request id, address, length, xxh3-64) before it is handed
on, as a view into the received message (no copy). Every request ends: with data,
with a PageServerError from the server, at its deadline, or when the stream breaks
(PageServerUnavailable for everything outstanding; the next request reconnects).

When the server advertises a fast lane (a raw socket, see fast_lane.py), requests
take it instead of the gRPC lanes (urgent and bulk each on its own connection): same
requests, same checks (request.py), a fraction of the round trip and of the CPU per
byte. The gRPC lanes stay the fallback.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import TypeVar

import grpc
from grpc import aio

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import (
    PageServerDataError,
    PageServerError,
    PageServerUnavailable,
)

__all__ = [
    "Chunk",
    "ChunkCallback",
    "DoneCallback",
    "FetchStream",
    "PageClient",
    "Request",
]
from uffdd.client.demand_lane import DemandConnector, DemandLane
from uffdd.client.fast_lane import FastLane
from uffdd.client.request import Chunk, ChunkCallback, DoneCallback, Request
from uffdd.core.actions import Priority
from uffdd.log import get_logger
from uffdd.v1 import pages_pb2
from uffdd.wire import chunk_codec
from uffdd.wire.convert import (
    ImageInfo,
    error_for_status,
    image_info_from_proto,
    priority_to_proto,
)
from uffdd.wire.tls import ClientTls

DEFAULT_WINDOW_BYTES = 32 * 1024 * 1024
DEFAULT_DEADLINE = 30.0
MAX_MESSAGE = 128 * 1024 * 1024
FAST_LANE_DISCOVERY_TIMEOUT = 5.0
_STREAM_METHOD = "/uffdd.v1.PageService/Stream"

_log = get_logger("uffdd.client.page_client")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class FetchStream:
    """A request's chunks as an async iterator (``async for chunk in client.fetch(...)``).

    Window credit is returned as the consumer takes each chunk, so a slow consumer
    slows the bulk lane instead of filling memory. An error from the server (or the
    deadline) raises from the iteration; chunks not yet taken are dropped with it.
    """

    def __init__(self) -> None:
        self.request: Request | None = None
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._error: PageServerError | None = None
        self._finished = False
        self._wakeup = asyncio.Event()

    def _on_chunk(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._wakeup.set()

    def _on_done(self, error: PageServerError | None) -> None:
        self._finished = True
        if error is not None:
            self._error = error
            self._chunks.clear()
        self._wakeup.set()

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()
        if not self._finished:
            self._on_done(PageServerError("request cancelled"))

    def __aiter__(self) -> FetchStream:
        return self

    async def __anext__(self) -> Chunk:
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                chunk = self._chunks.popleft()
                if self.request is not None:
                    self.request.release(chunk.length)
                return chunk
            if self._finished:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def read_all(self) -> bytearray:
        """Collect the whole range (zeros included) into one buffer."""
        out = bytearray()
        async for chunk in self:
            if chunk.data is None:
                out += bytes(chunk.length)
            else:
                out += chunk.data
        return out


class _GrpcLane:
    """One stream (and its own channel) of a PageClient: the urgent or the bulk lane."""

    def __init__(self, client: PageClient, name: str, window: int | None) -> None:
        self.client = client
        self.name = name
        self.window = window  # None: no window (urgent lane)
        self.channel = client._new_channel()
        self._stream = self.channel.stream_stream(
            _STREAM_METHOD,
            request_serializer=pages_pb2.PageRequest.SerializeToString,
            response_deserializer=_raw,
        )
        self.call: aio.StreamStreamCall[pages_pb2.PageRequest, bytes] | None = None
        self.outstanding: dict[int, Request] = {}  # sent, not finished
        self.urgent_queue: collections.deque[Request] = collections.deque()
        self.bulk_queue: collections.deque[Request] = collections.deque()
        self.cancels: collections.deque[int] = collections.deque()
        self.in_window = 0
        # the bulk lane of two gives the loop a turn after each chunk (see _read)
        self.yields = False
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- called by the client and by requests -------------------------------------

    def submit(self, request: Request) -> None:
        if self.call is None:
            self._open()
        queue = self.urgent_queue if request.priority == Priority.URGENT else self.bulk_queue
        queue.append(request)
        self._wakeup.set()

    def release(self, length: int) -> None:
        self.in_window -= length
        if self.bulk_queue:
            self._wakeup.set()

    def finish(
        self,
        request: Request,
        error: PageServerError | None,
        *,
        notify: bool = True,
        tell_server: bool = False,
    ) -> None:
        if request.done:
            return
        if self.outstanding.pop(request.request_id, None) is not None and tell_server:
            self.cancels.append(request.request_id)
            self._wakeup.set()
        request.settle(error, notify=notify)

    # -- the stream -------------------------------------------------------------------

    def _open(self) -> None:
        call = self._stream(None, wait_for_ready=False)
        self.call = call
        self._tasks = [
            asyncio.create_task(self._write(call), name=f"uffdd-pages-{self.name}-write"),
            asyncio.create_task(self._read(call), name=f"uffdd-pages-{self.name}-read"),
        ]

    def _next_message(self) -> pages_pb2.PageRequest | None:
        if self.cancels:
            return pages_pb2.PageRequest(cancel=pages_pb2.Cancel(request_id=self.cancels.popleft()))
        while self.urgent_queue:
            request = self.urgent_queue.popleft()
            if not request.done:  # else cancelled or timed out before it was sent
                return self._send(request)
        while self.bulk_queue:
            head = self.bulk_queue[0]
            if head.done:
                self.bulk_queue.popleft()
                continue
            if self.in_window and self.in_window + head.length > (self.window or 0):
                return None  # wait for credit (a lone oversized request still goes)
            return self._send(self.bulk_queue.popleft())
        return None

    def _send(self, request: Request) -> pages_pb2.PageRequest:
        if request.priority == Priority.BULK and self.window is not None:
            request._charged = request.length
            self.in_window += request.length
        self.outstanding[request.request_id] = request
        return pages_pb2.PageRequest(
            fetch=pages_pb2.Fetch(
                request_id=request.request_id,
                image_id=request.image_id,
                image_address=request.address,
                length=request.length,
                priority=priority_to_proto(request.priority),
            )
        )

    async def _write(self, call: aio.StreamStreamCall[pages_pb2.PageRequest, bytes]) -> None:
        try:
            while True:
                message = self._next_message()
                if message is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await call.write(message)
        except (aio.AioRpcError, asyncio.InvalidStateError, grpc.RpcError) as exc:
            # the reader sees the call's status and fails the lane
            _log.debug("page stream write failed", lane=self.name, error=str(exc))

    async def _read(self, call: aio.StreamStreamCall[pages_pb2.PageRequest, bytes]) -> None:
        error: PageServerError
        try:
            async for message in call:
                self._deliver(chunk_codec.decode_chunk(message))
                if self.yields:
                    # One loop turn between bulk chunks: a fault read or an urgent
                    # chunk that became ready meanwhile runs before the next one.
                    # (Holding bulk back while urgent work is outstanding starved
                    # the sweep of a process that faults all the time.)
                    await asyncio.sleep(0)
            error = PageServerUnavailable(f"page server {self.client.target} ended the page stream")
        except aio.AioRpcError as exc:
            error = PageServerUnavailable(
                f"page server {self.client.target}: page stream failed: "
                f"{exc.code().name}: {exc.details()}"
            )
        except ValueError as exc:
            error = PageServerDataError(f"page server {self.client.target} sent garbage: {exc}")
            call.cancel()
        _log.warning(
            "page stream lost", lane=self.name, target=self.client.target, error=str(error)
        )
        self._fail_all(error)

    def _fail_all(self, error: PageServerError) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        waiting = [*self.outstanding.values(), *self.urgent_queue, *self.bulk_queue]
        self.urgent_queue.clear()
        self.bulk_queue.clear()
        self.cancels.clear()
        for request in waiting:
            self.finish(request, error)
        self.outstanding.clear()
        self.in_window = 0

    def _deliver(self, wire: chunk_codec.WireChunk) -> None:
        request = self.outstanding.get(wire.request_id)
        if request is not None:  # else cancelled or timed out: late chunks are expected
            request.deliver(wire, self.client.target)

    async def close(self) -> None:
        self._fail_all(PageServerUnavailable(f"page client for {self.client.target} closed"))
        await self.channel.close(None)


def _raw(message: bytes) -> bytes:
    return message


class PageClient:
    """A connection to one page server (``host:port`` or ``unix:/path``).

    ``lanes=2`` (default) gives urgent requests their own stream on their own
    connection; ``lanes=1`` shares one stream (the server still serves urgent first).
    ``fast_lane=True`` (default) sends requests over the server's fast lane once it is
    found and connected (gRPC meanwhile, and whenever it is unavailable);
    ``fast_bulk=False`` keeps bulk requests on gRPC even then. ``demand_lane=True``
    (default; plain connections only) offers the daemon a C demand lane to the same
    fast lane (``demand_lane.py``).
    ``window_bytes`` bounds bulk bytes requested but not yet consumed; ``deadline``
    (seconds) is the default time a request may take before it fails with
    PageServerUnavailable. Use as ``async with PageClient(...) as client:`` inside the
    event loop that will run it (grpc.aio objects belong to one loop).
    """

    def __init__(
        self,
        target: str,
        *,
        tls: ClientTls | None = None,
        lanes: int = 2,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        deadline: float | None = DEFAULT_DEADLINE,
        fast_lane: bool = True,
        fast_bulk: bool = True,
        demand_lane: bool = True,
    ) -> None:
        if lanes not in (1, 2):
            raise ValueError("lanes must be 1 or 2")
        self.target = target
        self.tls = tls
        self.deadline = deadline
        self._ids = itertools.count(1)
        self._bulk = _GrpcLane(self, "bulk", window_bytes)
        self._urgent = _GrpcLane(self, "urgent", None) if lanes == 2 else self._bulk
        if lanes == 2:
            self._bulk.yields = True
        self._unary = self._urgent.channel
        self._fast: FastLane | None = None
        self._fast_bulk: FastLane | None = None
        self._demand: DemandConnector | None = None
        if fast_lane:
            self._fast = FastLane(target, tls, self._fast_lane_addresses)
            if fast_bulk:
                self._fast_bulk = FastLane(
                    target, tls, self._fast_lane_addresses, window=window_bytes
                )
            if demand_lane and tls is None:
                self._demand = DemandConnector(self._fast)

    def demand_lane(self) -> DemandLane | None:
        """The C demand lane when it is connected (else None; it connects once the
        urgent fast lane has)."""
        return None if self._demand is None else self._demand.lane()

    @property
    def fast_lane_address(self) -> str | None:
        """The fast lane urgent requests take now (None: they take gRPC)."""
        return None if self._fast is None else self._fast.address

    @property
    def fast_bulk_lane_address(self) -> str | None:
        """The fast lane bulk requests take now (None: they take gRPC)."""
        return None if self._fast_bulk is None else self._fast_bulk.address

    async def connect_fast_lanes(self) -> tuple[str | None, str | None]:
        """Find and connect the fast lanes now rather than on the first requests, and
        wait until both attempts have ended. Returns the (urgent, bulk) addresses
        connected; None where that lane's requests take gRPC (disabled, none
        advertised, unreachable)."""
        for fast in (self._fast, self._fast_bulk):
            if fast is not None:
                fast.usable()  # both attempts run at once
        urgent = None if self._fast is None else await self._fast.connect()
        bulk = None if self._fast_bulk is None else await self._fast_bulk.connect()
        return urgent, bulk

    def _new_channel(self) -> aio.Channel:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            # separate lanes must not share one connection
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
            ("grpc.experimental.tcp_read_chunk_size", 1024 * 1024),
            ("grpc.experimental.tcp_min_read_chunk_size", 256 * 1024),
            ("grpc.experimental.tcp_max_read_chunk_size", 4 * 1024 * 1024),
        ]
        if self.tls is None:
            return aio.insecure_channel(self.target, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return aio.secure_channel(self.target, self.tls.credentials(), options=options)

    async def __aenter__(self) -> PageClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Fail everything outstanding (PageServerUnavailable) and close the channels."""
        if self._demand is not None:
            await self._demand.close()
        for fast in (self._fast, self._fast_bulk):
            if fast is not None:
                await fast.close()
        await self._urgent.close()
        if self._bulk is not self._urgent:
            await self._bulk.close()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the server answers (e.g. right after starting it)."""
        try:
            await self._unary.unary_unary(
                "/uffdd.v1.PageService/ListImages",
                request_serializer=pages_pb2.ListImagesRequest.SerializeToString,
                response_deserializer=pages_pb2.ListImagesResponse.FromString,
            )(pages_pb2.ListImagesRequest(), timeout=timeout, wait_for_ready=True)
        except aio.AioRpcError as exc:
            raise PageServerUnavailable(f"page server {self.target}: {exc.details()}") from exc

    async def list_images(self, *, timeout: float | None = None) -> list[str]:
        return list((await self._list_images(timeout)).image_ids)

    async def _list_images(self, timeout: float | None) -> pages_pb2.ListImagesResponse:
        call = self._unary.unary_unary(
            "/uffdd.v1.PageService/ListImages",
            request_serializer=pages_pb2.ListImagesRequest.SerializeToString,
            response_deserializer=pages_pb2.ListImagesResponse.FromString,
        )
        return await self._unary_call(call, pages_pb2.ListImagesRequest(), timeout)

    async def _fast_lane_addresses(self) -> list[str]:
        """Discovery for the fast lane (an old server's answer has none)."""
        timeout = min(self.deadline or FAST_LANE_DISCOVERY_TIMEOUT, FAST_LANE_DISCOVERY_TIMEOUT)
        return list((await self._list_images(timeout)).fast_lane_addresses)

    async def image_info(self, image_id: str, *, timeout: float | None = None) -> ImageInfo:
        """The image's regions and DATA/ZERO extents; PageServerNotFound if unknown."""
        for fast in (self._fast, self._fast_bulk):
            if fast is not None:
                fast.usable()  # find the fast lanes before the first fault
        call = self._unary.unary_unary(
            "/uffdd.v1.PageService/GetImageInfo",
            request_serializer=pages_pb2.GetImageInfoRequest.SerializeToString,
            response_deserializer=pages_pb2.ImageInfo.FromString,
        )
        response = await self._unary_call(
            call, pages_pb2.GetImageInfoRequest(image_id=image_id), timeout
        )
        return image_info_from_proto(response)

    async def _unary_call(
        self,
        call: aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
    ) -> _Resp:
        try:
            return await call(request, timeout=timeout or self.deadline)
        except aio.AioRpcError as exc:
            raise error_for_status(
                exc.code(), f"page server {self.target}: {exc.details()}"
            ) from exc

    def submit(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        *,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        deadline: float | None = None,
    ) -> Request:
        """Queue a fetch of [address, address + length) of ``image_id``; returns at once.

        ``on_chunk`` gets each verified chunk in address order (its view is valid as
        long as the caller keeps the Chunk); ``on_done`` gets None when all arrived or
        the PageServerError that ended the request (chunks delivered before it were
        verified and stay valid; the rest of the range never came). Must be called
        from the event loop's thread.
        """
        return self._submit(
            image_id=image_id,
            address=address,
            length=length,
            priority=priority,
            on_chunk=on_chunk,
            on_done=on_done,
            deadline=deadline,
            auto_release=True,
        )

    def _submit(
        self,
        *,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority,
        on_chunk: ChunkCallback,
        on_done: DoneCallback,
        deadline: float | None,
        auto_release: bool,
    ) -> Request:
        urgent = priority == Priority.URGENT
        lane: _GrpcLane | FastLane = self._urgent if urgent else self._bulk
        fast = self._fast if urgent else self._fast_bulk
        if fast is not None and fast.usable() and fast.carries(image_id, length):
            lane = fast
        request = Request(
            lane,
            request_id=next(self._ids),
            image_id=image_id,
            address=address,
            length=length,
            priority=priority,
            on_chunk=on_chunk,
            on_done=on_done,
            auto_release=auto_release,
        )
        seconds = self.deadline if deadline is None else deadline
        if seconds is not None:
            request._timer = asyncio.get_running_loop().call_later(
                seconds, request.expire, self.target
            )
        lane.submit(request)
        return request

    def fetch(
        self,
        image_id: str,
        address: ImageAddr,
        length: int,
        priority: Priority = Priority.URGENT,
        *,
        deadline: float | None = None,
    ) -> FetchStream:
        """Like ``submit``, delivering chunks through an async iterator."""
        stream = FetchStream()
        stream.request = self._submit(
            image_id=image_id,
            address=address,
            length=length,
            priority=priority,
            on_chunk=stream._on_chunk,
            on_done=stream._on_done,
            deadline=deadline,
            auto_release=False,
        )
        return stream
