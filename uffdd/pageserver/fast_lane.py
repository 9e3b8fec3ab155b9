"""The page server's fast lane: page fetches over a raw TCP or Unix socket.

Why: a demand fault waits for one urgent round trip, and through grpc.aio that round
trip costs several times what the socket does (HTTP/2 framing, the C-core's threads
handing over to the event loop, a Python object per message); and the background
transfer's cost per byte, on both ends, is what bounds residency on a small machine.
The fast lane answers the same requests with the same checks (ImageCatalog.resolve)
and the same chunks (chunking.RangeCursor), written from the image's mmap with fixed
binary headers (wire/fast_lane.py), on the page server's own event loop, urgent ahead of
bulk. gRPC stays the API; this is an optional shortcut a client finds through
ListImages. Where a connection goes is decided by its first frame: a bulk fetch to the
bulk worker process (bulk_worker.py), an urgent one to the C answerer thread
(urgent.py), each of which may give it back; TLS connections stay here
(docs/architecture.md, section 6.4).

Memory is bounded: a frame's image id is at most 1 KiB, at most MAX_QUEUED requests
are parsed ahead, and nothing more is read while the transport's write buffer is above
its high-water mark. Bulk data honours ``--bulk-rate-limit`` as on the gRPC stream. A
malformed frame closes that connection only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from pathlib import Path
from typing import Protocol

import grpc
import xxhash

from uffdd.core.errors import ConfigError
from uffdd.log import get_logger
from uffdd.pageserver.catalog import RequestError
from uffdd.pageserver.chunking import RangeCursor, log_refusal
from uffdd.pageserver.service import PageService
from uffdd.pageserver.urgent import UrgentAnswerer
from uffdd.wire import fast_lane as wire
from uffdd.wire.fast_lane import tcp_host, unix_path


class Taker(Protocol):
    """Who may take a connection off the loop: the bulk worker process
    (``bulk_worker.BulkWorker``) or the urgent answerer thread (``urgent.UrgentAnswerer``)."""

    def take(self, fd: int, initial: bytes) -> bool:
        """Serve the connection on ``fd`` (a copy: the caller closes its own), whose
        first bytes ``initial`` were read already; False: the caller keeps it."""
        ...


MAX_QUEUED = 1024  # requests parsed ahead of the one being answered, per connection
# A data chunk up to this size goes out in one write with its header: one segment, one
# wake-up of the client, for the cost of copying a few pages. Larger chunks are
# written from the mmap as they are (header and data in two writes, no copy).
COALESCE_BYTES = 64 * 1024
UNIX_SEND_BUFFER = 4 * 1024 * 1024

_log = get_logger("uffdd.pageserver.fast_lane")


class _Job:
    """A checked request being answered."""

    __slots__ = ("bulk", "cursor", "done", "request_id")

    def __init__(self, request_id: int, cursor: RangeCursor, *, bulk: bool) -> None:
        self.request_id = request_id
        self.cursor = cursor
        self.bulk = bulk
        self.done = False  # complete, failed or cancelled: holds nothing any more


class Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them, bounded.

    Refusals go out first, then urgent requests in order, then bulk requests in order,
    one bulk chunk per loop turn: an urgent request arriving on another connection is
    read before the next bulk chunk is written, and waits behind one chunk at most.
    """

    def __init__(
        self,
        lane: FastLaneServer,
        *,
        initial: bytes = b"",
        settled: bool = False,
        return_when_known: str | None = None,
    ) -> None:
        self._lane = lane
        self._service = lane.service
        self._initial = initial  # bytes read by the process that handed this over
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._errors: collections.deque[bytes] = collections.deque()
        self._urgent: collections.deque[_Job] = collections.deque()
        self._bulk: collections.deque[_Job] = collections.deque()
        self._jobs: dict[int, _Job] = {}  # by request id, until done
        self._bulk_turn: asyncio.Handle | None = None  # the next bulk chunk, scheduled
        self._paused = False  # the transport's write buffer is above high water
        self._reading = True
        self._draining = False  # shutting down: answer what is queued, read nothing new
        self._closing = False
        # No request frame seen yet: may go to the bulk worker or the urgent answerer
        # (not once one of them gave it back: settled).
        self._fresh = not settled
        # Given back by the urgent answerer for this image only: back to it once the
        # image is registered and nothing is queued or unsent here.
        self._return_when_known = return_when_known
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
        elif sock is not None and sock.family == socket.AF_UNIX:
            # A Unix socket's send buffer stays at net.core.wmem_default (a few
            # hundred KiB), where TCP autotunes to megabytes: a chunk would take several
            # writes and wake-ups. The kernel caps the request at net.core.wmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        high = 2 * self._service.bulk_chunk_size
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self._lane.connections.add(self)
        _log.debug("fast lane connection", peer=self._peer)
        if self._initial:
            # before the transport reads anything more, so the frames stay in order
            initial, self._initial = self._initial, b""
            self.data_received(initial)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._draining:
            return
        self._buffer += data
        if self._fresh:
            if len(self._buffer) < len(wire.BULK_MAGIC):
                return
            self._fresh = False
            if self._hand_over():
                return
        self._run()

    def _hand_over(self) -> bool:
        """Give this connection to the bulk worker (its first frame is a bulk fetch) or
        to the urgent answerer (an urgent one), if there is one to take it."""
        bulk = self._buffer.startswith(wire.BULK_MAGIC)
        taker = self._lane.bulk_worker if bulk else self._lane.urgent_answerer
        if not bulk and not self._buffer.startswith(wire.MAGIC):
            taker = None  # garbage, or a cancel first: the loop answers (or refuses) it
        return taker is not None and self._give_to(taker)

    def _give_to(self, taker: Taker) -> bool:
        transport = self._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None or not taker.take(sock.fileno(), bytes(self._buffer)):
            return False
        # The taker holds the socket now; closing our descriptor leaves it open.
        self._closing = True
        self._buffer.clear()
        self._lane.connections.discard(self)
        assert transport is not None
        transport.abort()
        return True

    def _return_if_known(self) -> None:
        image_id = self._return_when_known
        answerer = self._lane.urgent_answerer
        transport = self._transport
        if image_id is None or answerer is None or transport is None or self._closing:
            return
        if not answerer.knows(image_id) or not self.idle or self._buffer or self._bulk:
            return
        if transport.get_write_buffer_size():
            return  # the thread's frames must not overtake ours: at a later turn
        self._return_when_known = None
        self._give_to(answerer)

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

    @property
    def queued(self) -> int:
        """Requests parsed and not yet answered (refusals included): at most MAX_QUEUED."""
        return len(self._errors) + len(self._urgent) + len(self._bulk)

    @property
    def backpressure(self) -> str | None:
        """Why this connection reads no requests now, or None while it reads them:
        "client not reading" (its answers fill the socket and the write buffer),
        "queue full" (MAX_QUEUED requests wait to be answered), "draining" (the server
        is stopping), "closed". For status reports, and for tests that must know a
        connection is held back."""
        if self._closing:
            return "closed"
        if self._draining:
            return "draining"
        if self._paused:
            return "client not reading"
        if self.queued >= MAX_QUEUED:
            return "queue full"
        return None

    def _run(self) -> None:
        """Parse what was received, answer urgent work until done or the transport is
        full, and schedule the next bulk chunk."""
        while not self._closing:
            if not self._draining:
                self._parse()
            if self._paused or not (self._errors or self._urgent):
                break
            self._pump_urgent()
        if self._bulk and self._bulk_turn is None and not (self._paused or self._closing):
            self._bulk_turn = self._loop.call_soon(self._bulk_step)
        self._update_reading()
        self._return_if_known()

    def _update_reading(self) -> None:
        if self._transport is None or self._closing:
            return
        want = not (self._paused or self._draining) and self.queued < MAX_QUEUED
        if want != self._reading:
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _parse(self) -> None:
        buffer = self._buffer
        position = 0
        while self.queued < MAX_QUEUED and len(buffer) - position >= wire.REQUEST.size:
            magic, request_id, address, length, id_length = wire.REQUEST.unpack_from(
                buffer, position
            )
            if magic not in wire.KNOWN_MAGICS:
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
            if magic == wire.CANCEL_MAGIC:
                self._cancel(request_id)
            else:
                self._accept(request_id, image_id, address, length, bulk=magic == wire.BULK_MAGIC)
        del buffer[:position]

    def _accept(
        self, request_id: int, image_id: str, address: int, length: int, *, bulk: bool
    ) -> None:
        try:
            if request_id in self._jobs:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request id {request_id} is already outstanding",
                )
            resolved = self._service.catalog.resolve(image_id, address, length)
        except RequestError as exc:
            log_refusal("FastLane", request_id, image_id, address, length, exc)
            self._errors.append(
                wire.encode_error(request_id, address, exc.code.value[0], exc.message)
            )
            return
        job = _Job(request_id, RangeCursor(resolved), bulk=bulk)
        self._jobs[request_id] = job
        if bulk:
            self._bulk.append(job)
        else:
            self._service.urgent_started()
            self._urgent.append(job)

    def _cancel(self, request_id: int) -> None:
        """The client gave up on a request: send no more of it (and nothing back; the
        client already dropped it)."""
        job = self._jobs.get(request_id)
        if job is not None:
            self._end(job)  # left in its queue, skipped when it gets to the front

    def _pump_urgent(self) -> None:
        transport = self._transport
        assert transport is not None
        while not self._paused and not self._closing:
            if self._errors:
                transport.write(self._errors.popleft())
            elif self._urgent:
                self._send_chunk(self._urgent)
            else:
                return

    def _bulk_step(self) -> None:
        """Write one bulk chunk (once the rate limit has room for it), then let the
        loop run before the next."""
        self._bulk_turn = None
        if self._paused or self._closing:
            return  # resume_writing (or nothing, closing) runs the queue again
        limit = self._service.bulk_limit
        if limit is not None:
            delay = limit.delay(self._service.bulk_chunk_size)
            if delay:
                self._bulk_turn = self._loop.call_later(delay, self._bulk_step)
                return
            limit.take(self._send_chunk(self._bulk))
        else:
            self._send_chunk(self._bulk)
        self._run()

    def _send_chunk(self, queue: collections.deque[_Job]) -> int:
        """Write the next chunk of the first live job in ``queue``; returns the data
        bytes written (0 for a zero chunk, an error, or nothing left to send)."""
        while queue and queue[0].done:
            queue.popleft()  # cancelled
        if not queue:
            return 0
        job = queue[0]
        transport = self._transport
        assert transport is not None
        try:
            piece = job.cursor.next_piece(
                self._service.bulk_chunk_size if job.bulk else self._service.chunk_size
            )
        except RequestError as exc:
            address = job.cursor.position()
            self._end(job)
            queue.popleft()
            transport.write(
                wire.encode_error(job.request_id, address, exc.code.value[0], exc.message)
            )
            return 0
        if piece.last:
            self._end(job)
            queue.popleft()
        if piece.data is None:
            transport.write(
                wire.encode_zero(job.request_id, piece.address, piece.length, piece.last)
            )
            return 0
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
        return piece.length

    def _end(self, job: _Job) -> None:
        """``job`` is complete, failed or cancelled: it holds nothing any more."""
        if job.done:
            return
        job.done = True
        del self._jobs[job.request_id]
        job.cursor.drop()
        if not job.bulk:
            self._service.urgent_finished()

    def _drop_queue(self) -> None:
        if self._bulk_turn is not None:
            self._bulk_turn.cancel()
            self._bulk_turn = None
        for job in list(self._jobs.values()):
            self._end(job)
        self._errors.clear()
        self._urgent.clear()
        self._bulk.clear()

    def _garbage(self, reason: str) -> None:
        """A frame that cannot be parsed: answer the urgent requests before it, then
        hang up."""
        _log.warning(
            "fast lane: malformed frame, closing the connection", peer=self._peer, reason=reason
        )
        self._buffer.clear()
        if not self._paused:
            self._pump_urgent()
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
        return not self._jobs and not self._errors

    def stop_reading(self) -> None:
        """Shutdown: answer what is queued, take nothing new."""
        self._draining = True
        self._buffer.clear()
        self._run()

    def shut(self) -> None:
        self._close(abort=not self.idle)


class FastLaneServer:
    """Fast-lane listeners of one page server, all on the running event loop."""

    def __init__(
        self,
        service: PageService,
        ssl_context: ssl.SSLContext | None,
        bulk_worker: Taker | None = None,
        *,
        urgent_thread: bool = False,
    ) -> None:
        self.service = service
        self.ssl_context = ssl_context
        self.bulk_worker = bulk_worker
        """Where bulk connections go (None: they are served here)."""
        self._urgent_thread = urgent_thread and ssl_context is None
        self.urgent_answerer: UrgentAnswerer | None = None
        """Where urgent connections go once listening (None: they are served here)."""
        self.connections: set[Connection] = set()
        self.addresses: list[str] = []
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._adopting: set[asyncio.Task[None]] = set()

    async def listen(self, grpc_listen: str) -> list[str]:
        """Open the fast lane that goes with the gRPC listener ``grpc_listen``; returns
        the addresses to advertise (none for a listener kind it cannot serve)."""
        loop = asyncio.get_running_loop()
        if self._urgent_thread and self.urgent_answerer is None:
            self._start_answerer()
        path = unix_path(grpc_listen)
        try:
            if path is not None:
                lane_path = Path(path + wire.UNIX_SUFFIX)
                server = await loop.create_unix_server(
                    lambda: Connection(self), str(lane_path), ssl=self.ssl_context
                )
                self._unix_paths.append(lane_path)
                found = [f"unix:{lane_path}"]
            elif grpc_listen.startswith(("unix-abstract:", "vsock:")):
                _log.info("no fast lane for this kind of listener", listen=grpc_listen)
                return []
            else:
                host = tcp_host(grpc_listen)
                server = await loop.create_server(
                    lambda: Connection(self), host or None, 0, ssl=self.ssl_context
                )
                found = _tcp_addresses(host, server)
        except OSError as exc:
            raise ConfigError(f"cannot open the fast lane for {grpc_listen}: {exc}") from exc
        self._servers.append(server)
        self.addresses += found
        return found

    def _start_answerer(self) -> None:
        try:
            self.urgent_answerer = UrgentAnswerer(
                self.service.catalog, chunk_size=self.service.chunk_size, hand_back=self._adopt
            )
        except OSError as exc:  # then the loop answers urgent requests itself
            _log.warning("no urgent answerer thread", error=str(exc))

    def _adopt(self, sock: socket.socket, initial: bytes, unknown_image: str | None) -> None:
        """Serve on the loop a connection the urgent answerer gave back."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(sock, initial, unknown_image))
        self._adopting.add(task)

        def adopted(task: asyncio.Task[None]) -> None:
            self._adopting.discard(task)
            if task.cancelled():
                sock.close()  # the server stopped first (perhaps before the task ran)

        task.add_done_callback(adopted)

    async def _connect(
        self, sock: socket.socket, initial: bytes, unknown_image: str | None
    ) -> None:
        def connection() -> Connection:
            return Connection(self, initial=initial, settled=True, return_when_known=unknown_image)

        try:
            await asyncio.get_running_loop().connect_accepted_socket(connection, sock)
        except OSError as exc:
            _log.warning("fast lane: could not take a connection back", error=str(exc))
            sock.close()

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
        answerer = self.urgent_answerer
        deadline = asyncio.get_running_loop().time() + (grace or 0)
        while any(not c.idle for c in self.connections) or (answerer and answerer.drain()):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        if answerer is not None:
            answerer.close()
            self.urgent_answerer = None
        adopting = list(self._adopting)
        for task in adopting:
            task.cancel()
        if adopting:
            await asyncio.wait(adopting)  # each closes its socket
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
