"""The page server's fast lane: urgent fetches over a raw TCP or Unix socket.

Why: a demand fault waits for one urgent round trip, and through grpc.aio that round
trip costs several times what the socket does (HTTP/2 framing, the C-core's threads
handing over to the event loop, a Python object per message). The fast lane answers the
same requests with the same checks (ImageCatalog.resolve) and the same chunks
(chunking.RangeCursor), written from the image's mmap with fixed binary headers
(fastlane_wire), on the page server's own event loop. gRPC stays the API; this is an
optional shortcut a client finds through ListImages.

Per connection, requests are answered in order. Memory is bounded: a frame's image id
is at most 1 KiB, at most MAX_QUEUED requests are parsed ahead, and nothing more is
read while the transport's write buffer is above its high-water mark. A malformed
frame closes that connection only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from pathlib import Path

import xxhash

from uffdd.errors import ConfigError
from uffdd.log import get_logger
from uffdd.remote import fastlane_wire as wire
from uffdd.remote.catalog import RequestError
from uffdd.remote.chunking import RangeCursor, log_refusal
from uffdd.remote.fastlane_wire import tcp_host, unix_path
from uffdd.remote.service import PageService

MAX_QUEUED = 1024  # requests parsed ahead of the one being answered, per connection
# A data chunk up to this size goes out in one write with its header: one segment, one
# wake-up of the client, for the cost of copying a few pages. Larger chunks are
# written from the mmap as they are (header and data in two writes, no copy).
COALESCE_BYTES = 64 * 1024

_log = get_logger("uffdd.remote.fastlane")


class _Job:
    """A checked request being answered."""

    __slots__ = ("cursor", "request_id")

    def __init__(self, request_id: int, cursor: RangeCursor) -> None:
        self.request_id = request_id
        self.cursor = cursor


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them in order, bounded."""

    def __init__(self, lane: FastLaneServer) -> None:
        self._lane = lane
        self._service = lane.service
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._queue: collections.deque[_Job | bytes] = collections.deque()
        self._paused = False  # the transport's write buffer is above high water
        self._reading = True
        self._draining = False  # shutting down: answer what is queued, read nothing new
        self._closing = False
        self._peer = ""

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._lane.stopping:
            # accepted just before the listener closed: nobody will shut it later
            self._closing = True
            transport.abort()
            return
        self._peer = str(transport.get_extra_info("peername") or "unix")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        high = 2 * self._service.chunk_size
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self._lane.connections.add(self)
        _log.debug("fast lane connection", peer=self._peer)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._draining:
            return
        self._buffer += data
        self._run()

    def eof_received(self) -> bool | None:
        if self._buffer:
            self._garbage("truncated frame")
        return None  # close the transport once the answers are written

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lane.connections.discard(self)
        self._drop_queue()
        self._buffer.clear()
        _log.debug("fast lane connection closed", peer=self._peer, error=str(exc or ""))

    def pause_writing(self) -> None:
        self._paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._run()

    # -- requests ----------------------------------------------------------------------

    def _run(self) -> None:
        """Parse what was received and answer until done or the transport is full."""
        while not self._closing:
            if not self._draining:
                self._parse()
            if not self._queue or self._paused:
                break
            self._pump()
        self._update_reading()

    def _update_reading(self) -> None:
        if self._transport is None or self._closing:
            return
        want = not (self._paused or self._draining) and len(self._queue) < MAX_QUEUED
        if want != self._reading:
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _parse(self) -> None:
        buffer = self._buffer
        position = 0
        while len(self._queue) < MAX_QUEUED and len(buffer) - position >= wire.REQUEST.size:
            magic, request_id, address, length, id_length = wire.REQUEST.unpack_from(
                buffer, position
            )
            if magic != wire.MAGIC:
                self._garbage(f"bad magic {bytes(magic)!r}")
                return
            if id_length > wire.MAX_IMAGE_ID_BYTES:
                self._garbage(f"image id of {id_length} bytes")
                return
            start = position + wire.REQUEST.size
            if len(buffer) < start + id_length:
                break  # the rest of this frame has not arrived yet
            try:
                image_id = buffer[start : start + id_length].decode("utf-8")
            except UnicodeDecodeError:
                self._garbage("image id is not UTF-8")
                return
            position = start + id_length
            self._queue.append(self._accept(request_id, image_id, address, length))
        del buffer[:position]

    def _accept(self, request_id: int, image_id: str, address: int, length: int) -> _Job | bytes:
        try:
            resolved = self._service.catalog.resolve(image_id, address, length)
        except RequestError as exc:
            log_refusal("FastLane", request_id, image_id, address, length, exc)
            return wire.encode_error(request_id, address, exc.code.value[0], exc.message)
        self._service.urgent_started()
        return _Job(request_id, RangeCursor(resolved))

    def _pump(self) -> None:
        transport = self._transport
        assert transport is not None
        chunk_size = self._service.chunk_size
        while self._queue and not self._paused and not self._closing:
            job = self._queue[0]
            if isinstance(job, bytes):
                self._queue.popleft()
                transport.write(job)
                continue
            try:
                piece = job.cursor.next_piece(chunk_size)
            except RequestError as exc:
                self._finish(job)
                transport.write(
                    wire.encode_error(
                        job.request_id, job.cursor.position(), exc.code.value[0], exc.message
                    )
                )
                continue
            if piece.last:
                self._finish(job)
            if piece.data is None:
                transport.write(
                    wire.encode_zero(job.request_id, piece.address, piece.length, piece.last)
                )
                continue
            header = wire.encode_data_header(
                job.request_id,
                piece.address,
                piece.length,
                xxhash.xxh3_64_intdigest(piece.data),
                piece.last,
            )
            if piece.length <= COALESCE_BYTES:
                transport.write(header + piece.data)
            else:
                transport.write(header)
                transport.write(piece.data)

    def _finish(self, job: _Job) -> None:
        self._queue.popleft()
        job.cursor.drop()
        self._service.urgent_finished()

    def _drop_queue(self) -> None:
        while self._queue:
            job = self._queue[0]
            if isinstance(job, bytes):
                self._queue.popleft()
            else:
                self._finish(job)

    def _garbage(self, reason: str) -> None:
        """A frame that cannot be parsed: answer what came before it, then hang up."""
        _log.warning(
            "fast lane: malformed frame, closing the connection", peer=self._peer, reason=reason
        )
        self._buffer.clear()
        if self._queue and not self._paused:
            self._pump()
        self._close(abort=False)

    def _close(self, *, abort: bool) -> None:
        self._closing = True
        self._drop_queue()
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    @property
    def idle(self) -> bool:
        return not self._queue

    def stop_reading(self) -> None:
        """Shutdown: answer what is queued, take nothing new."""
        self._draining = True
        self._buffer.clear()
        self._run()

    def shut(self) -> None:
        self._close(abort=bool(self._queue))


class FastLaneServer:
    """Fast-lane listeners of one page server, all on the running event loop."""

    def __init__(self, service: PageService, ssl_context: ssl.SSLContext | None) -> None:
        self.service = service
        self.ssl_context = ssl_context
        self.connections: set[_Connection] = set()
        self.addresses: list[str] = []
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []

    async def listen(self, grpc_listen: str) -> list[str]:
        """Open the fast lane that goes with the gRPC listener ``grpc_listen``; returns
        the addresses to advertise (none for a listener kind it cannot serve)."""
        loop = asyncio.get_running_loop()
        path = unix_path(grpc_listen)
        try:
            if path is not None:
                lane_path = Path(path + wire.UNIX_SUFFIX)
                server = await loop.create_unix_server(
                    lambda: _Connection(self), str(lane_path), ssl=self.ssl_context
                )
                self._unix_paths.append(lane_path)
                found = [f"unix:{lane_path}"]
            elif grpc_listen.startswith(("unix-abstract:", "vsock:")):
                _log.info("no fast lane for this kind of listener", listen=grpc_listen)
                return []
            else:
                host = tcp_host(grpc_listen)
                server = await loop.create_server(
                    lambda: _Connection(self), host or None, 0, ssl=self.ssl_context
                )
                found = _tcp_addresses(host, server)
        except OSError as exc:
            raise ConfigError(f"cannot open the fast lane for {grpc_listen}: {exc}") from exc
        self._servers.append(server)
        self.addresses += found
        return found

    async def _stop_accepting(self) -> None:
        """Take no new connections, and let those already accepted attach first.

        Python 3.11's Server.close() while an accepted connection is still being set up
        (its task not run yet) fails that set-up and leaves the socket open and
        unanswered until garbage collection: the client would wait for its deadline.
        """
        loop = asyncio.get_running_loop()
        for server in self._servers:
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
        for _ in range(3):  # the set-up tasks of connections accepted just before
            await asyncio.sleep(0)

    async def stop(self, grace: float | None) -> None:
        """Stop listening, answer what is queued for up to ``grace`` seconds, close."""
        self.stopping = True
        await self._stop_accepting()
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.stop_reading()
        deadline = asyncio.get_running_loop().time() + (grace or 0)
        while any(not c.idle for c in self.connections):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.shut()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._unix_paths.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost


def _tcp_addresses(host: str, server: asyncio.Server) -> list[str]:
    """What to advertise: the listen host as given (so a client matches it against the
    host it dialled), with each port the kernel chose."""
    found: list[str] = []
    for sock in server.sockets:
        bound_host, port = sock.getsockname()[:2]
        shown = host or bound_host
        address = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
        if address not in found:
            found.append(address)
    return found
