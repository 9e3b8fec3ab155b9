"""The client's fast lanes: page requests over the page server's raw socket.

Why: a demand fault waits for one urgent round trip, and a raw socket round trip is
several times cheaper than a grpc.aio one (see pageserver/fast_lane.py); bulk data through
the raw socket costs the daemon's one event loop a fraction of what grpc.aio's receive
path does, and that loop also answers every fault. A PageClient keeps two fast lanes,
urgent and bulk, each its own connection, so urgent bytes never queue behind bulk
bytes in a socket buffer. A lane is an optimisation, never a dependency: it is found
through ListImages, and until it is connected, when the server has none, or after it
broke, requests take the gRPC lanes. When it breaks, the requests outstanding on it
fail with PageServerUnavailable (as on a broken gRPC stream); it is tried again after
RETRY_SECONDS. The bulk lane sends a request only while the bytes outstanding fit its
window, as the gRPC bulk lane does.

Frames are read with ``asyncio.BufferedProtocol``: headers and small chunks into a
reused scratch buffer (small chunks copied out of it), and a larger chunk's body
straight from the socket into a buffer of its exact size, which is then handed on as
it is. Every chunk goes through the same checks as on the gRPC lanes
(Request.deliver).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Awaitable, Callable

from uffdd.client import bulk_receiver
from uffdd.client.bulk_receiver import ThreadedConnection
from uffdd.client.request import Request
from uffdd.core.errors import (
    ConfigError,
    PageServerDataError,
    PageServerError,
    PageServerUnavailable,
)
from uffdd.kernel.memory import uninitialized_buffer
from uffdd.log import get_logger
from uffdd.wire import fast_lane as wire
from uffdd.wire.chunk_codec import WireChunk
from uffdd.wire.tls import ClientTls

CONNECT_TIMEOUT = 5.0
RETRY_SECONDS = 30.0
MAX_CHUNK_BYTES = 128 * 1024 * 1024  # as the gRPC lanes' largest message
# Headers and small chunks are read into a scratch buffer; larger bodies get their own.
# The urgent lane's holds a whole answer to a fault (a 64 KiB window, up to 256 KiB, and
# its header) so it takes one read, one loop turn, not two behind the bulk lane's.
SCRATCH_BYTES = 64 * 1024
URGENT_SCRATCH_BYTES = 256 * 1024 + 4096
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

_log = get_logger("uffdd.client.fast_lane")
_EMPTY = memoryview(b"")

Discover = Callable[[], Awaitable[list[str]]]


class FastLane:
    """One fast lane of a PageClient: at most one connection, made on demand.

    ``window`` None: the urgent lane (every request is sent at once); otherwise the
    bulk lane, which sends a request only while the bytes outstanding fit the window
    (a lone request larger than the window still goes).
    """

    def __init__(
        self, target: str, tls: ClientTls | None, discover: Discover, window: int | None = None
    ) -> None:
        self.target = target
        self.tls = tls
        self.window = window
        self.address: str | None = None  # the connected fast lane
        self.outstanding: dict[int, Request] = {}  # sent, not finished
        self._queue: collections.deque[Request] = collections.deque()  # bulk, not sent
        self._in_window = 0
        self._discover = discover
        self._protocol: _Protocol | ThreadedConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry_at: float | None = 0.0  # None: the server has no fast lane
        self._warned = False

    @property
    def name(self) -> str:
        return "urgent" if self.window is None else "bulk"

    # -- routing ---------------------------------------------------------------------

    def usable(self) -> bool:
        """Connected now; if not, start connecting (in the background) when due."""
        if self._protocol is not None:
            return True
        if self._task is None and self._retry_at is not None:
            loop = asyncio.get_running_loop()
            if loop.time() >= self._retry_at:
                self._task = loop.create_task(
                    self._connect(), name=f"uffdd-fast-lane-{self.name}-connect"
                )
        return False

    async def connect(self) -> str | None:
        """Connect now, when due, and wait until the attempt has ended; returns the
        address connected, or None: this lane's requests take gRPC (the server has no
        fast lane, none is reachable, or the lane waits ``RETRY_SECONDS`` after a
        failure). For callers that want the lane before their first request (a warm-up,
        a benchmark, a test) instead of finding it on the way."""
        self.usable()
        task = self._task
        if task is not None:
            await asyncio.wait([task])
        return self.address

    @staticmethod
    def carries(image_id: str, length: int) -> bool:
        """Whether the request fits the fast lane's frame (else it takes gRPC)."""
        return 0 < length <= wire.MAX_REQUEST_LENGTH and (
            len(image_id.encode("utf-8", "replace")) <= wire.MAX_IMAGE_ID_BYTES
        )

    def submit(self, request: Request) -> None:
        assert self._protocol is not None
        if self.window is None:
            self._send(request)
        else:
            self._queue.append(request)
            self._send_queued()

    def _send(self, request: Request) -> None:
        assert self._protocol is not None
        if self.window is not None:
            request._charged = request.length
            self._in_window += request.length
        self.outstanding[request.request_id] = request
        self._protocol.send(
            wire.encode_request(
                request.request_id,
                request.image_id.encode(),
                request.address,
                request.length,
                bulk=self.window is not None,
            )
        )

    def _send_queued(self) -> None:
        queue = self._queue
        while queue and self._protocol is not None:
            head = queue[0]
            if head.done:
                queue.popleft()  # cancelled or timed out before it was sent
                continue
            if self._in_window and self._in_window + head.length > (self.window or 0):
                return  # wait for credit
            self._send(queue.popleft())

    # -- the Lane protocol (request.py) -------------------------------------------------

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
        sent = self.outstanding.pop(request.request_id, None) is not None
        if sent and tell_server and self._protocol is not None:
            self._protocol.send(wire.encode_cancel(request.request_id))
        request.settle(error, notify=notify)

    def release(self, length: int) -> None:
        """Window credit comes back (only bulk requests hold any)."""
        self._in_window -= length
        if self._queue:
            self._send_queued()

    # -- chunks ------------------------------------------------------------------------

    def chunk(self, header: wire.ResponseHeader, body: memoryview) -> None:
        request_id, address, length, flags, code, _, checksum = header
        request = self.outstanding.get(request_id)
        if request is None:
            return  # cancelled or timed out: late chunks are expected
        if flags & wire.FLAG_ERROR:
            message = bytes(body).decode("utf-8", "replace")
            # an error must never read as OK, even if a peer sends code 0 (2 = UNKNOWN)
            chunk = WireChunk(request_id, address, 0, _EMPTY, 0, False, True, code or 2, message)
        else:
            zero = bool(flags & wire.FLAG_ZERO)
            last = bool(flags & wire.FLAG_LAST)
            chunk = WireChunk(request_id, address, length, body, checksum, zero, last, 0, "")
        request.deliver(chunk, self.target)

    # -- the connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        try:
            advertised = await self._discover()
            if not advertised:
                _log.info("page server has no fast lane", target=self.target)
                self._retry_at = None
                return
            for address in candidates(self.target, advertised):
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can lose a
                    # connection made just as it is cancelled (an unclosed socket)
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        protocol = await self._open(address)
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    _log.debug("fast lane connect failed", address=address, error=str(exc))
                    continue
                if protocol.closed:
                    # lost while being set up (a server that was stopping)
                    _log.debug("fast lane closed at once", address=address)
                    continue
                self._protocol = protocol
                self.address = address
                self._warned = False
                _log.info(
                    "fast lane connected", lane=self.name, target=self.target, address=address
                )
                return
            self._fall_back(f"no reachable fast lane among {advertised}")
        except (PageServerError, ConfigError) as exc:
            self._fall_back(f"fast lane discovery failed: {exc}")
        finally:
            self._task = None

    async def _open(self, address: str) -> _Protocol | ThreadedConnection:
        loop = asyncio.get_running_loop()
        context = None if self.tls is None else self.tls.ssl_context()
        if context is None and self.window is not None:
            # plain bulk lane: read by a thread of its own (bulk_receiver.py explains)
            sock = await bulk_receiver.connect(address, loop)
            return ThreadedConnection(
                sock,
                loop,
                target=self.target,
                on_chunk=self.chunk,
                on_lost=self._threaded_lost,
                max_chunk_bytes=MAX_CHUNK_BYTES,
            )
        server_name = None
        if context is not None:
            server_name = self.tls.server_name if self.tls else None
            server_name = server_name or tcp_or_localhost(self.target)
        path = wire.unix_path(address)
        if path is not None:
            _, protocol = await loop.create_unix_connection(
                lambda: _Protocol(self), path, ssl=context, server_hostname=server_name
            )
        else:
            host, port = wire.tcp_host_port(address)
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self), host, port, ssl=context, server_hostname=server_name
            )
        return protocol

    def _fall_back(self, reason: str) -> None:
        self._retry_at = asyncio.get_running_loop().time() + RETRY_SECONDS
        if not self._warned:
            self._warned = True
            _log.warning(
                "fast lane unavailable; its requests use gRPC",
                lane=self.name,
                target=self.target,
                reason=reason,
            )

    def broken(self, error: PageServerError) -> None:
        """The connection ended or sent garbage: fail what it carried, fall back."""
        self._fail_all(error)
        self._fall_back(str(error))

    def _threaded_lost(self, connection: ThreadedConnection, error: PageServerError) -> None:
        if self._protocol is connection:
            self.broken(error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._retry_at = None  # closed for good
        self._fail_all(PageServerUnavailable(f"page client for {self.target} closed"))

    def _fail_all(self, error: PageServerError) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None
        self.address = None
        waiting = [*self.outstanding.values(), *self._queue]
        self.outstanding.clear()
        self._queue.clear()
        for request in waiting:
            self.finish(request, error)
        self._in_window = 0


class _Protocol(asyncio.BufferedProtocol):
    """The socket: frames out, chunks in (see pages.proto, "Fast lane")."""

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane
        self._transport: asyncio.Transport | None = None
        self._scratch = bytearray(URGENT_SCRATCH_BYTES if lane.window is None else SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = 0  # the scratch's first byte not parsed yet
        self._end = 0  # the scratch's first byte not received yet
        self._header: wire.ResponseHeader | None = None
        self._body: memoryview | None = None  # a body being received in place
        self._filled = 0
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, frame: bytes) -> None:
        assert self._transport is not None
        self._transport.write(frame)

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return  # the lane closed it
        self._closed = True
        if self._lane._protocol is not self:
            return  # lost while connecting: _connect sees it closed
        reason = f": {exc}" if exc else ""
        self._lane.broken(
            PageServerUnavailable(
                f"page server {self._lane.target}: {self._lane.name} fast lane lost{reason}"
            )
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return self._body[self._filled :]
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is None:
            self._end += nbytes
            self._parse()
            return
        self._filled += nbytes
        if self._filled == len(self._body):
            body, header = self._body, self._header
            assert header is not None
            self._body = self._header = None
            self._lane.chunk(header, body.toreadonly())

    def _parse(self) -> None:
        """Hand on every whole frame in the scratch; start receiving a body in place
        when one does not fit; keep a partial header for the next read."""
        view = self._view
        size = wire.RESPONSE.size
        while not self._closed and self._end - self._start >= size:
            header = wire.RESPONSE.unpack_from(view, self._start)
            need = self._body_length(header)
            if need < 0:
                return
            begin = self._start + size
            have = self._end - begin
            if have < need:
                # not zeroed first: the socket fills every byte before it is handed on
                body = uninitialized_buffer(need)
                body[:have] = view[begin : self._end]
                self._header, self._body, self._filled = header, body, have
                self._start = self._end = 0
                return
            self._start = begin + need
            # a copy: the scratch is reused by the next read
            self._lane.chunk(
                header, memoryview(bytes(view[begin : self._start])) if need else _EMPTY
            )
        rest = self._end - self._start
        if rest and self._start:
            self._scratch[:rest] = self._scratch[self._start : self._end]
        self._start, self._end = 0, rest

    def _body_length(self, header: wire.ResponseHeader) -> int:
        """The body's size, or -1 (and the lane is failed) if the header is garbage."""
        _, _, length, flags, _, message_length, _ = header
        need = wire.body_length(length, flags, message_length)
        if flags & ~wire.KNOWN_FLAGS or need > MAX_CHUNK_BYTES:
            self._closed = True
            if self._transport is not None:
                self._transport.abort()
            self._lane.broken(
                PageServerDataError(
                    f"page server {self._lane.target} sent garbage on the fast lane "
                    f"(flags {flags:#x}, {need} bytes)"
                )
            )
            return -1
        return need


def candidates(target: str, advertised: list[str]) -> list[str]:
    """The advertised fast lanes this client may use, best first.

    Only the same kind as the gRPC target, and for TCP only the host that was dialled
    (a wildcard stands for it): a fast lane is the same server's only if it is reached
    the way the server itself was.
    """
    path = wire.unix_path(target)
    if path is not None:
        unix = [a for a in advertised if wire.unix_path(a) is not None]
        own = f"unix:{path}{wire.UNIX_SUFFIX}"
        return sorted(unix, key=lambda a: a != own)
    host = wire.tcp_host(target)
    found = []
    for address in advertised:
        if wire.unix_path(address) is not None:
            continue
        lane_host, port = wire.tcp_host(address), address.rpartition(":")[2]
        if lane_host in WILDCARD_HOSTS:
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        elif lane_host == host:
            found.append(address)
    return found


def tcp_or_localhost(target: str) -> str:
    """The name a TLS certificate is checked against, as gRPC checks it."""
    return "localhost" if wire.unix_path(target) is not None else wire.tcp_host(target)
