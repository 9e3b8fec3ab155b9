"""The PageService handlers: unary look-ups and the two-lane page stream.

Why this shape: a demand fault must never wait behind a bulk transfer. Each Stream
keeps its pending requests in two queues and produces one bounded chunk at a time,
always from the urgent queue first, so an urgent request waits behind at most one bulk
chunk. A chunk is produced only after the previous one was accepted by the transport
(the async generator is resumed by gRPC after each send), which bounds the server's
memory per stream to one chunk plus the queued request descriptors. While urgent
requests are queued on any stream, bulk chunks on all streams wait (bounded), so with
the client's separate urgent lane the demand fault also gets the event loop and the
CPUs. Errors are per request and in-band; nothing a client sends can end the stream or
the server.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import xxhash
from grpc import aio

from uffdd.config import DEFAULT_BULK_CHUNK_SIZE, DEFAULT_CHUNK_SIZE
from uffdd.image.format import ExtentKind
from uffdd.log import get_logger
from uffdd.pageserver.catalog import ImageCatalog, RequestError
from uffdd.pageserver.chunking import RangeCursor, extent_data, log_refusal
from uffdd.pageserver.ratelimit import TokenBucket
from uffdd.v1 import pages_pb2
from uffdd.wire import chunk_codec
from uffdd.wire.convert import image_info_to_proto

SERVICE_NAME = pages_pb2.DESCRIPTOR.services_by_name["PageService"].full_name
DEFAULT_MAX_QUEUED_REQUESTS = 4096
MAX_READ_LENGTH = 1024 * 1024
BULK_YIELD_SECONDS = 0.005

_log = get_logger("uffdd.pageserver.service")


@dataclass(eq=False, slots=True)
class _Pending:
    """A queued Fetch: where the next chunk starts."""

    request_id: int
    cursor: RangeCursor
    urgent: bool = False
    cancelled: bool = False


@dataclass(slots=True)
class _StreamState:
    errors: collections.deque[bytes] = field(default_factory=collections.deque)
    urgent: collections.deque[_Pending] = field(default_factory=collections.deque)
    bulk: collections.deque[_Pending] = field(default_factory=collections.deque)
    by_id: dict[int, _Pending] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    requests_done: bool = False
    bulk_pass: bool = False  # one bulk chunk may go although urgent work is pending
    last_was_bulk: bool = False  # the message just produced came from the bulk lane


class PageService:
    """Serves the images of one ImageCatalog; see pages.proto for the protocol."""

    def __init__(
        self,
        catalog: ImageCatalog,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        bulk_chunk_size: int = DEFAULT_BULK_CHUNK_SIZE,
        max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
        bulk_rate: int | None = None,
    ) -> None:
        self.catalog = catalog
        self.chunk_size = chunk_size
        self.bulk_chunk_size = max(bulk_chunk_size, chunk_size)
        self.max_queued_requests = max_queued_requests
        # Shared by every stream and fast lane: the cap is on the server's bulk output
        # as a whole.
        self.bulk_limit = (
            None if bulk_rate is None else TokenBucket(bulk_rate, self.bulk_chunk_size)
        )
        # Urgent requests queued on any stream of this server. While there are some,
        # bulk chunks wait (at most BULK_YIELD_SECONDS at a time): with urgent and bulk
        # on separate streams (the client's two lanes), this is what keeps the one
        # event loop and the CPUs free for the demand fault.
        self._urgent_pending = 0
        self._bulk_waiters: set[asyncio.Event] = set()
        # advertised in ListImages; set by the PageServer once its fast lane listens
        self.fast_lane_addresses: list[str] = []

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The method table, with PageChunk serialized by chunk_codec (pre-encoded)."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "ListImages": grpc.unary_unary_rpc_method_handler(
                    self.list_images,
                    request_deserializer=pages_pb2.ListImagesRequest.FromString,
                    response_serializer=pages_pb2.ListImagesResponse.SerializeToString,
                ),
                "GetImageInfo": grpc.unary_unary_rpc_method_handler(
                    self.get_image_info,
                    request_deserializer=pages_pb2.GetImageInfoRequest.FromString,
                    response_serializer=pages_pb2.ImageInfo.SerializeToString,
                ),
                "Read": grpc.unary_unary_rpc_method_handler(
                    self.read,
                    request_deserializer=pages_pb2.ReadRequest.FromString,
                    response_serializer=pages_pb2.ReadResponse.SerializeToString,
                ),
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.stream,
                    request_deserializer=pages_pb2.PageRequest.FromString,
                    response_serializer=_pre_encoded,
                ),
            },
        )

    # -- unary -----------------------------------------------------------------------

    async def list_images(
        self, request: pages_pb2.ListImagesRequest, context: aio.ServicerContext[object, object]
    ) -> pages_pb2.ListImagesResponse:
        return pages_pb2.ListImagesResponse(
            image_ids=self.catalog.list(), fast_lane_addresses=self.fast_lane_addresses
        )

    async def get_image_info(
        self, request: pages_pb2.GetImageInfoRequest, context: aio.ServicerContext[object, object]
    ) -> pages_pb2.ImageInfo:
        try:
            return image_info_to_proto(self.catalog.image(request.image_id))
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
            raise  # abort raises; this line only satisfies the type checker

    async def read(
        self, request: pages_pb2.ReadRequest, context: aio.ServicerContext[object, object]
    ) -> pages_pb2.ReadResponse:
        try:
            if request.length > MAX_READ_LENGTH:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Read is limited to {MAX_READ_LENGTH} bytes; use Stream",
                )
            resolved = self.catalog.resolve(request.image_id, request.image_address, request.length)
            data = bytearray(request.length)
            position = 0
            for extent in resolved.extents:
                if extent.kind == ExtentKind.DATA:
                    data[position : position + extent.length] = extent_data(resolved.image, extent)
                position += extent.length
        except RequestError as exc:
            _log.info("request refused", rpc="Read", code=exc.code.name, reason=exc.message)
            await context.abort(exc.code, exc.message)
            raise
        payload = bytes(data)
        return pages_pb2.ReadResponse(
            image_address=request.image_address,
            data=payload,
            checksum=xxhash.xxh3_64_intdigest(payload),
        )

    # -- the page stream ---------------------------------------------------------------

    async def stream(
        self,
        requests: AsyncIterable[pages_pb2.PageRequest],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[bytes]:
        state = _StreamState()
        reader = asyncio.create_task(self._read_requests(requests, state))
        peer = context.peer()
        _log.debug("stream opened", peer=peer)
        try:
            while True:
                message = self._next_message(state)
                if message is not None:
                    if state.last_was_bulk and self.bulk_limit is not None:
                        await self.bulk_limit.consume(len(message))
                    yield message
                    continue
                if state.requests_done and not state.by_id:
                    break
                state.wakeup.clear()
                if state.bulk and self._urgent_pending:
                    await self._yield_to_urgent(state)
                else:
                    await state.wakeup.wait()
        except asyncio.CancelledError:
            # the server is stopping (grace over) or the client went away: the call is
            # already over, ending quietly spares the log a traceback per stream
            _log.debug("stream cancelled", peer=peer, abandoned=len(state.by_id))
            return
        finally:
            reader.cancel()
            for pending in list(state.by_id.values()):
                self._forget(state, pending)
            _log.debug("stream closed", peer=peer, abandoned=len(state.by_id))

    async def _read_requests(
        self, requests: AsyncIterable[pages_pb2.PageRequest], state: _StreamState
    ) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "fetch":
                    self._accept(request.fetch, state)
                elif kind == "cancel":
                    self._cancel(request.cancel.request_id, state)
                state.wakeup.set()
        finally:
            state.requests_done = True
            state.wakeup.set()

    async def _yield_to_urgent(self, state: _StreamState) -> None:
        """Hold this stream's bulk data while urgent requests are pending elsewhere."""
        self._bulk_waiters.add(state.wakeup)
        try:
            await asyncio.wait_for(state.wakeup.wait(), BULK_YIELD_SECONDS)
        except TimeoutError:
            # never starve bulk entirely (e.g. an urgent reader that stopped reading)
            state.bulk_pass = True
        finally:
            self._bulk_waiters.discard(state.wakeup)

    def urgent_started(self) -> None:
        """An urgent request is queued (on a stream or on the fast lane): bulk waits."""
        self._urgent_pending += 1

    def urgent_finished(self) -> None:
        self._urgent_pending -= 1
        if not self._urgent_pending:
            for wakeup in self._bulk_waiters:
                wakeup.set()

    def _forget(self, state: _StreamState, pending: _Pending) -> None:
        """``pending`` is complete, failed or cancelled: it holds nothing any more."""
        del state.by_id[pending.request_id]
        pending.cursor.drop()
        if pending.urgent:
            self.urgent_finished()

    def _accept(self, fetch: pages_pb2.Fetch, state: _StreamState) -> None:
        try:
            if fetch.request_id == 0 or fetch.request_id in state.by_id:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request id {fetch.request_id} is zero or already outstanding",
                )
            if fetch.priority not in (pages_pb2.PRIORITY_URGENT, pages_pb2.PRIORITY_BULK):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown priority {fetch.priority}"
                )
            if len(state.by_id) >= self.max_queued_requests:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {self.max_queued_requests} requests queued on this stream",
                )
            resolved = self.catalog.resolve(fetch.image_id, fetch.image_address, fetch.length)
        except RequestError as exc:
            log_refusal(
                "Stream", fetch.request_id, fetch.image_id, fetch.image_address, fetch.length, exc
            )
            state.errors.append(
                chunk_codec.encode_error_chunk(
                    fetch.request_id, fetch.image_address, exc.code.value[0], exc.message
                )
            )
            return
        urgent = fetch.priority == pages_pb2.PRIORITY_URGENT
        pending = _Pending(fetch.request_id, RangeCursor(resolved), urgent=urgent)
        state.by_id[fetch.request_id] = pending
        if urgent:
            self.urgent_started()
            state.urgent.append(pending)
        else:
            state.bulk.append(pending)

    def _cancel(self, request_id: int, state: _StreamState) -> None:
        pending = state.by_id.get(request_id)
        if pending is None:
            return  # already complete: nothing to say
        pending.cancelled = True  # dropped from its queue when it reaches the head
        address = pending.cursor.position()
        self._forget(state, pending)
        state.errors.append(
            chunk_codec.encode_error_chunk(
                request_id, address, grpc.StatusCode.CANCELLED.value[0], "cancelled by client"
            )
        )

    def _next_message(self, state: _StreamState) -> bytes | None:
        if state.errors:
            return state.errors.popleft()
        for lane in (state.urgent, state.bulk):
            while lane and lane[0].cancelled:
                lane.popleft()
            if lane and lane is state.bulk and self._urgent_pending and not state.bulk_pass:
                return None
            if lane:
                state.bulk_pass = False
                state.last_was_bulk = lane is state.bulk
                return self._next_chunk(lane, state)
        return None

    def _next_chunk(self, lane: collections.deque[_Pending], state: _StreamState) -> bytes:
        pending = lane[0]
        try:
            piece = pending.cursor.next_piece(self.chunk_size)
        except RequestError as exc:
            lane.popleft()
            address = pending.cursor.position()
            self._forget(state, pending)
            return chunk_codec.encode_error_chunk(
                pending.request_id, address, exc.code.value[0], exc.message
            )
        if piece.last:
            lane.popleft()
            self._forget(state, pending)
        if piece.data is None:
            return chunk_codec.encode_zero_chunk(
                pending.request_id, piece.address, piece.length, piece.last
            )
        return chunk_codec.encode_data_chunk(
            pending.request_id,
            piece.address,
            piece.data,
            xxhash.xxh3_64_intdigest(piece.data),
            piece.last,
        )


def _pre_encoded(message: bytes) -> bytes:
    return message
