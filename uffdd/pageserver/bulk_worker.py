"""The page server's bulk worker: a second process, at a lower CPU priority, that
answers the fast lane's bulk connections.

Why: during a sweep the page server's one event loop spends nearly all of its time
writing bulk chunks, and on a small machine the CPUs are shared with the daemons and
the processes they restore; an urgent request then waits for that loop and for a CPU.
With bulk served by a second process at a lower priority, urgent answers under a
saturating bulk transfer came several times sooner, and bulk throughput no lower
(bench/results/). So the main process keeps gRPC and the urgent fast-lane connections,
and hands a fast-lane connection whose first frame is a bulk fetch over, socket and all
(SCM_RIGHTS, with the bytes already read), to this worker. The worker answers it with
the same connection code (``fast_lane.Connection``) from its own catalog of the same
images, on its own loop; the kernel's scheduler then favours urgent work by itself.

Not used with TLS (an SSL session cannot move to another process) or with
``--bulk-rate-limit`` (one token bucket must see all bulk output): those connections
stay in the main process, as they do whenever the worker is not ready or has died.
docs/architecture.md has the page server's threads and processes (section 4) and where
each connection goes (section 6.4).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from uffdd.config import DEFAULT_BULK_NICE
from uffdd.kernel.fdpass import close_fds, fds_in
from uffdd.kernel.sched import default_slice
from uffdd.log import LEVELS, configure_logging, get_logger
from uffdd.pageserver.catalog import ImageCatalog
from uffdd.pageserver.fast_lane import Connection, FastLaneServer
from uffdd.pageserver.service import PageService

MAX_INITIAL_BYTES = 64 * 1024
"""A connection whose first read held more than this stays in the main process (one
control message carries the bytes already read; a bulk connection's first read is a
few request frames)."""
READY = b"ready"
START_TIMEOUT = 10.0
STOP = b"stop:"  # then the grace in seconds, as text

_log = get_logger("uffdd.pageserver.bulk_worker")


class BulkWorker:
    """The main process's side: starts the worker, hands connections to it, stops it."""

    def __init__(
        self,
        images: Path,
        *,
        chunk_size: int,
        bulk_chunk_size: int,
        max_request_length: int,
        nice: int = DEFAULT_BULK_NICE,
    ) -> None:
        self._command = [
            sys.executable, "-m", "uffdd.pageserver.bulk_worker",
            "--images", str(images),
            "--chunk-size", str(chunk_size),
            "--bulk-chunk-size", str(bulk_chunk_size),
            "--max-request-length", str(max_request_length),
            "--nice", str(nice),
            "--log-level", _effective_level(),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.handed_over = 0
        """Connections given to the worker so far."""
        self._control: socket.socket | None = None
        self._ready = False
        self._started: asyncio.Future[None] | None = None

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the worker and wait until it serves (connections made before would
        stay in the main process for good). A worker that does not come up is logged
        and left out: the main process serves bulk itself."""
        self._started = asyncio.get_running_loop().create_future()
        try:
            self._spawn()
            await asyncio.wait_for(asyncio.shield(self._started), timeout)
        except (OSError, TimeoutError) as exc:
            _log.warning(
                "bulk worker did not start; bulk stays in the main process", error=str(exc)
            )
            await self.stop(0)

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [*self._command, "--control-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_control)

    def _on_control(self) -> None:
        """The worker said it is ready, or went away."""
        assert self._control is not None
        try:
            message = self._control.recv(64)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if message == READY:
            self._ready = True
            if self._started is not None and not self._started.done():
                self._started.set_result(None)
            _log.info("bulk worker ready", pid=self.process.pid if self.process else None)
        elif not message:
            self._gone("the bulk worker exited")

    def _gone(self, reason: str | None) -> None:
        """The worker takes no more connections (``reason`` None: we stop it)."""
        if self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        if self._ready and reason is not None:
            _log.warning("bulk connections stay in the main process", reason=reason)
        self._ready = False
        if self._started is not None and not self._started.done():
            self._started.set_exception(OSError(reason or "stopped before it was ready"))

    def take(self, fd: int, initial: bytes) -> bool:
        """Give the connection ``fd`` (and the bytes read from it so far) to the
        worker; False if it cannot take it now (the caller keeps serving it)."""
        if not self._ready or self._control is None or len(initial) > MAX_INITIAL_BYTES:
            return False
        try:
            self._control.sendmsg(
                [initial], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )
        except BlockingIOError:
            return False  # the worker is behind: this one stays here
        except OSError as exc:
            self._gone(f"handing a connection over failed: {exc}")
            return False
        self.handed_over += 1
        return True

    async def stop(self, grace: float | None) -> None:
        """Ask the worker to finish (``grace`` seconds for what it is sending), then
        make sure it is gone."""
        process = self.process
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.send(STOP + str(grace or 0).encode())
        self._gone(None)
        if process is None or process.poll() is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, process.wait), (grace or 0) + 5)
        except TimeoutError:
            process.kill()
            await loop.run_in_executor(None, process.wait)


def _effective_level() -> str:
    name = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return name if name in LEVELS else "warning"


# -- the worker process ------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(False)
    catalog = ImageCatalog(args.images, max_request_length=args.max_request_length)
    service = PageService(catalog, chunk_size=args.chunk_size, bulk_chunk_size=args.bulk_chunk_size)
    lane = FastLaneServer(service, None)
    stopping = asyncio.Event()
    grace = [args.grace]
    adopting: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)

    def receive() -> None:
        try:
            initial, ancillary, _, _ = control.recvmsg(
                MAX_INITIAL_BYTES, socket.CMSG_SPACE(array.array("i").itemsize)
            )
        except BlockingIOError:
            return
        except OSError:
            initial, ancillary = b"", []
        fds = fds_in(ancillary)
        if not fds and initial.startswith(STOP):
            with contextlib.suppress(ValueError):
                grace[0] = float(initial.removeprefix(STOP))
            stopping.set()
            return
        if not initial and not fds:
            stopping.set()  # the main process is gone
            return
        if len(fds) != 1:
            close_fds(fds)
            return
        task = loop.create_task(adopt(socket.socket(fileno=fds[0]), initial))
        adopting.add(task)
        task.add_done_callback(adopting.discard)

    async def adopt(connection: socket.socket, initial: bytes) -> None:
        try:
            await loop.connect_accepted_socket(
                lambda: Connection(lane, initial=initial), connection
            )
        except OSError as exc:
            _log.warning("bulk worker could not take a connection", error=str(exc))
            connection.close()

    loop.add_reader(control.fileno(), receive)
    control.send(READY)
    _log.debug("bulk worker serving", pid=os.getpid())
    await stopping.wait()
    loop.remove_reader(control.fileno())
    control.close()
    await lane.stop(grace[0])
    catalog.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="uffdd page server's bulk worker (internal)")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--chunk-size", type=int, required=True)
    parser.add_argument("--bulk-chunk-size", type=int, required=True)
    parser.add_argument("--max-request-length", type=int, required=True)
    parser.add_argument("--nice", type=int, default=DEFAULT_BULK_NICE)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--log-level", choices=LEVELS, default="warning")
    args = parser.parse_args(argv)
    configure_logging(json=True, level=args.log_level)
    if args.nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + args.nice)
    default_slice()  # bulk work: not the short slice a parent may have passed on
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
