"""The client's fast lane: urgent requests over the page server's raw socket.

Why: a demand fault waits for one urgent round trip, and a raw socket round trip is
several times cheaper than a grpc.aio one (see fastlane_server.py). The lane is an
optimisation, never a dependency: it is found through ListImages, and until it is
connected, when the server has none, or after it broke, urgent requests take the gRPC
urgent lane. When it breaks, the requests outstanding on it fail with
PageServerUnavailable (as on a broken gRPC stream); it is tried again after
RETRY_SECONDS.

Frames are parsed in ``data_received`` with one ``struct`` call per chunk; a chunk that
arrived in one piece is handed on as a view into the received bytes (no copy); only a
chunk split across reads is assembled in a buffer of its exact size. Every chunk goes
through the same checks as on the gRPC lanes (Request.deliver).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

from uffdd.errors import ConfigError, PageServerDataError, PageServerError, PageServerUnavailable
from uffdd.log import get_logger
from uffdd.remote import fastlane_wire as wire
from uffdd.remote.chunk_codec import WireChunk
from uffdd.remote.request import Request
from uffdd.remote.tls import ClientTls

CONNECT_TIMEOUT = 5.0
RETRY_SECONDS = 30.0
MAX_CHUNK_BYTES = 128 * 1024 * 1024  # as the gRPC lanes' largest message
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

_log = get_logger("uffdd.remote.fastlane")
_EMPTY = memoryview(b"")

Discover = Callable[[], Awaitable[list[str]]]


class FastLane:
    """The fast lane of one PageClient: at most one connection, made on demand."""

    def __init__(self, target: str, tls: ClientTls | None, discover: Discover) -> None:
        self.target = target
        self.tls = tls
        self.address: str | None = None  # the connected fast lane
        self.outstanding: dict[int, Request] = {}
        self._discover = discover
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry_at: float | None = 0.0  # None: the server has no fast lane
        self._warned = False

    # -- routing ---------------------------------------------------------------------

    def usable(self) -> bool:
        """Connected now; if not, start connecting (in the background) when due."""
        if self._protocol is not None:
            return True
        if self._task is None and self._retry_at is not None:
            loop = asyncio.get_running_loop()
            if loop.time() >= self._retry_at:
                self._task = loop.create_task(self._connect(), name="uffdd-fast-lane-connect")
        return False

    @staticmethod
    def carries(image_id: str, length: int) -> bool:
        """Whether the request fits the fast lane's frame (else it takes gRPC)."""
        return 0 < length <= wire.MAX_REQUEST_LENGTH and (
            len(image_id.encode("utf-8", "replace")) <= wire.MAX_IMAGE_ID_BYTES
        )

    def submit(self, request: Request) -> None:
        assert self._protocol is not None
        self.outstanding[request.request_id] = request
        self._protocol.send(
            wire.encode_request(
                request.request_id, request.image_id.encode(), request.address, request.length
            )
        )

    # -- the Lane protocol (request.py) -------------------------------------------------

    def finish(
        self,
        request: Request,
        error: PageServerError | None,
        *,
        notify: bool = True,
        tell_server: bool = False,  # the fast lane has no cancel: late chunks are dropped
    ) -> None:
        if request.done:
            return
        request.done = True
        if request._timer is not None:
            request._timer.cancel()
        self.outstanding.pop(request.request_id, None)
        if notify:
            try:
                request._on_done(error)
            except Exception:
                _log.exception("on_done callback failed", request_id=request.request_id)

    def release(self, length: int) -> None:
        """Urgent requests hold no window credit."""

    # -- chunks ------------------------------------------------------------------------

    def chunk(self, header: tuple[int, int, int, int, int, int, int], body: memoryview) -> None:
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
                _log.info("fast lane connected", target=self.target, address=address)
                return
            self._fall_back(f"no reachable fast lane among {advertised}")
        except (PageServerError, ConfigError) as exc:
            self._fall_back(f"fast lane discovery failed: {exc}")
        finally:
            self._task = None

    async def _open(self, address: str) -> _Protocol:
        loop = asyncio.get_running_loop()
        context = None if self.tls is None else self.tls.ssl_context()
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
            host, _, port = address.rpartition(":")
            host = host[1:-1] if host.startswith("[") else host
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self), host, int(port), ssl=context, server_hostname=server_name
            )
        return protocol

    def _fall_back(self, reason: str) -> None:
        self._retry_at = asyncio.get_running_loop().time() + RETRY_SECONDS
        if not self._warned:
            self._warned = True
            _log.warning(
                "fast lane unavailable; urgent requests use gRPC",
                target=self.target,
                reason=reason,
            )

    def broken(self, error: PageServerError) -> None:
        """The connection ended or sent garbage: fail what it carried, fall back."""
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None
        self.address = None
        waiting = list(self.outstanding.values())
        self.outstanding.clear()
        for request in waiting:
            self.finish(request, error)
        self._fall_back(str(error))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._retry_at = None  # closed for good
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None
        waiting = list(self.outstanding.values())
        self.outstanding.clear()
        error = PageServerUnavailable(f"page client for {self.target} closed")
        for request in waiting:
            self.finish(request, error)


class _Protocol(asyncio.Protocol):
    """The socket: frames out, chunks in (see pages.proto, "Fast lane")."""

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()  # a response header split across reads
        self._header: tuple[int, int, int, int, int, int, int] | None = None
        self._body: bytearray | None = None  # a body split across reads
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
            PageServerUnavailable(f"page server {self._lane.target}: fast lane lost{reason}")
        )

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        position = 0
        end = len(view)
        size = wire.RESPONSE.size
        while position < end and not self._closed:
            if self._body is not None:
                position = self._fill_body(view, position)
                continue
            if self._head or end - position < size:
                take = min(size - len(self._head), end - position)
                self._head += view[position : position + take]
                position += take
                if len(self._head) < size:
                    return
                header = wire.RESPONSE.unpack(self._head)
                self._head.clear()
            else:
                header = wire.RESPONSE.unpack_from(view, position)
                position += size
            need = self._body_length(header)
            if need < 0:
                return
            if end - position >= need:
                self._lane.chunk(header, view[position : position + need])
                position += need
            else:
                self._header = header
                self._body = bytearray(need)
                self._filled = 0

    def _fill_body(self, view: memoryview, position: int) -> int:
        assert self._body is not None
        assert self._header is not None
        take = min(len(self._body) - self._filled, len(view) - position)
        self._body[self._filled : self._filled + take] = view[position : position + take]
        self._filled += take
        if self._filled == len(self._body):
            body, header = self._body, self._header
            self._body = self._header = None
            self._lane.chunk(header, memoryview(body).toreadonly())
        return position + take

    def _body_length(self, header: tuple[int, int, int, int, int, int, int]) -> int:
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
