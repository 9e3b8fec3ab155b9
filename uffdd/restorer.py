"""The restorer side of the native handover: a library the restored process calls on itself.

Why in-process: the memory being restored is the caller's own. The caller (a restored
workload, a VMM, a test's child process) maps the regions at their run-time addresses,
registers them with a userfaultfd it creates, and hands the uffd to the uffdd daemon;
from the ack on, every access to a missing page is served by the daemon. So::

    restore = Restorer("/run/uffdd/handover.sock").restore(
        "my-image", [RegionSpec(image_address=..., length=..., run_address=...)]
    )
    ...                                  # use the memory: faults are served
    summary = restore.wait_resident(timeout=60)   # optional: every page is in

Rules this follows (shared/PROTOCOLS.md):

- Regions are mapped with MAP_FIXED_NOREPLACE: never over an existing mapping (a taken
  range is a clear RestoreError). ``run_address=None`` lets the kernel choose.
- The uffd gets EVENT_FORK|EVENT_REMAP|EVENT_REMOVE|EVENT_UNMAP (required, so the daemon
  can follow forks, mremap, madvise and munmap) and THREAD_ID (wished), never
  UFFD_USER_MODE_ONLY (a read() into lazy memory would fail with EFAULT).
- Our copy of the uffd is kept until the daemon reports Resident or Failed, or the
  connection to it ends (:meth:`HandedOver.close`). The daemon proves the uffd is ours
  by finding this copy in our fd table (kcmp), and while we hold it a daemon that dies
  cannot release the uffd: our faults then wait (for a restarted daemon, or for the
  kill that ends a restore nobody resumes) instead of reading zeros. If the daemon
  refuses, closing it unregisters the ranges: nothing is lost. A child this process
  forks does not keep the copy (it is closed in the child right after ``os.fork``):
  the daemon serves the child through the uffd the fork gives it, and an inherited copy
  would keep the parent's ranges registered after the daemon let go of them.
- Nothing here touches the registered memory: before the ack no one would serve it.

Python's mmap module cannot map at a fixed address, hence ``uffdd.kernel.memory``.

``restore_and_check`` is ``uffdd restore``: scripts and end-to-end tests need a real
restored process that proves the whole path (handover, demand faults, background
transfer) byte for byte against a local image, without writing a workload.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import os
import select
import socket
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr
from uffdd.core.errors import PeerProtocolError, UffddError
from uffdd.core.handover import (
    DEFAULT_SOCKET_PATH,
    HUGE_1G,
    HUGE_2M,
    MAX_REPLY_BYTES,
    Ack,
    Error,
    ErrorCode,
    Failed,
    HandoverRegion,
    HandoverRequest,
    Progress,
    ResidentSummary,
)
from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.kernel import memory
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.wire.handover import decode_reply, encode_request

__all__ = [
    "DEFAULT_SOCKET",
    "REQUIRED_FEATURES",
    "HandedOver",
    "HandoverRefused",
    "RegionSpec",
    "RestoreError",
    "RestoreFailed",
    "Restorer",
    "map_anonymous",
    "restore_and_check",
    "unmap",
]

DEFAULT_SOCKET = Path(DEFAULT_SOCKET_PATH)
REQUIRED_FEATURES = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
)
WISHED_FEATURES = Feature.THREAD_ID


class RestoreError(UffddError):
    """The restore could not be set up here: a range is taken, a uffd cannot be made..."""


class HandoverRefused(UffddError):
    """The daemon refused the handover; ``code`` and ``reason`` are its answer."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"the daemon refused the handover ({code.name}): {reason}")
        self.code = code
        self.reason = reason


class RestoreFailed(UffddError):
    """After the ack, the daemon reported Failed, or hung up before Resident."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """A range to restore: its pages are ``[image_address, +length)`` of the image.

    ``run_address`` is where to map it in this process (None: wherever the kernel likes;
    with ``map_memory=False`` it must name memory the caller already mapped).
    """

    image_address: int
    length: int
    page_size: int = PAGE_SIZE
    run_address: int | None = None


@dataclass(frozen=True, slots=True)
class _Mapped:
    address: int
    length: int


class HandedOver:
    """A handed-over restore: the daemon serves the memory; this is the line back to it.

    It holds our copy of the uffd until the daemon reports Resident or Failed, or the
    connection ends (:meth:`close`).
    """

    def __init__(
        self,
        sock: socket.socket,
        handover_id: str,
        regions: tuple[HandoverRegion, ...],
        uffd: Uffd | None = None,
    ) -> None:
        self._sock: socket.socket | None = sock
        self._uffd = uffd
        if uffd is not None:
            _held.add(self)
        self.handover_id = handover_id
        self.regions = regions
        """The regions as handed over, with their run-time addresses."""
        self.last_progress: Progress | None = None

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.regions)

    def wait_resident(
        self,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> ResidentSummary:
        """Block until the daemon reports every page resident; return its summary.

        Raises RestoreFailed on Failed or a hang-up, TimeoutError after ``timeout``
        seconds (the restore stays usable: call again to keep waiting).
        """
        sock = self._sock
        if sock is None:
            raise RestoreFailed(f"handover {self.handover_id}: the connection is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            sock.settimeout(remaining)
            try:
                data = sock.recv(MAX_REPLY_BYTES)
            except TimeoutError:
                raise TimeoutError(
                    f"handover {self.handover_id}: not resident after {timeout:g} s"
                ) from None
            except OSError as exc:
                self.close()
                raise RestoreFailed(
                    f"handover {self.handover_id}: connection to the daemon lost: {exc}"
                ) from exc
            if not data:
                self.close()
                raise RestoreFailed(
                    f"handover {self.handover_id}: the daemon hung up before the memory was "
                    "resident (did it exit?)"
                )
            reply = decode_reply(data)
            if isinstance(reply, Progress):
                self.last_progress = reply
                if on_progress is not None:
                    on_progress(reply)
                continue
            if isinstance(reply, Ack) and reply.handover_id == self.handover_id:
                continue  # a daemon that resumed this restore confirms it once more
            self.close()
            if isinstance(reply, ResidentSummary):
                return reply
            if isinstance(reply, Failed):
                raise RestoreFailed(f"handover {self.handover_id}: {reply.reason}")
            raise PeerProtocolError(
                f"handover {self.handover_id}: unexpected {type(reply).__name__} reply"
            )

    @property
    def holds_uffd(self) -> bool:
        """Whether our copy of the uffd is still open."""
        return self._uffd is not None

    def close(self) -> None:
        """Close our copy of the uffd, then stop listening to the daemon (serving goes
        on; the memory stays)."""
        self._drop_uffd()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _drop_uffd(self) -> None:
        uffd, self._uffd = self._uffd, None
        if uffd is not None:
            _held.discard(self)
            uffd.close()

    def __enter__(self) -> HandedOver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class Restorer:
    """Hands this process's lazily restored memory to a uffdd daemon."""

    socket_path: Path = DEFAULT_SOCKET
    timeout: float = 30.0
    """Seconds for connecting and for the daemon's answer (ack or error)."""
    name: str = "uffdd.restorer"
    labels: Mapping[str, str] = field(default_factory=dict)

    def restore(
        self,
        image_id: str,
        regions: Sequence[RegionSpec],
        *,
        page_server: str = "",
        map_memory: bool = True,
        pid: int = 0,
    ) -> HandedOver:
        """Map (unless ``map_memory`` is False), register, hand over, wait for the ack.

        The returned restore keeps this process's copy of the uffd until the daemon
        reports Resident or Failed (:meth:`HandedOver.wait_resident`) or it is closed.
        ``pid`` names a descendant to hand over for; the daemon accepts it only if that
        process holds the uffd and the regions are registered in its own memory, so it
        suits a uffd the descendant made and passed here (this method registers the
        regions in *this* process).

        Raises RestoreError (local failure), HandoverRefused (the daemon's Error reply,
        e.g. an unknown image), OSError (no daemon at the socket) or TimeoutError. On
        any failure everything set up here is undone: mappings made here are unmapped,
        the uffd closed, the connection closed.
        """
        mapped: list[_Mapped] = []
        try:
            placed = self._place(regions, map_memory, mapped)
            request = HandoverRequest(
                image_id=image_id,
                regions=placed,
                pid=pid,
                page_server=page_server,
                restorer=self.name,
                labels=dict(self.labels),
            )
            uffd = _make_uffd(placed)
            try:
                for region in placed:
                    uffd.register(region.run_address, region.length, RegisterMode.MISSING)
                sock, handover_id = self._hand_over(encode_request(request), uffd)
            except BaseException:
                uffd.close()
                raise
        except BaseException:
            for m in mapped:
                with contextlib.suppress(OSError):
                    memory.munmap(m.address, m.length)
            raise
        # Our copy stays open with the restore: see the module docstring.
        return HandedOver(sock, handover_id, placed, uffd)

    def _place(
        self, regions: Sequence[RegionSpec], map_memory: bool, mapped: list[_Mapped]
    ) -> tuple[HandoverRegion, ...]:
        placed: list[HandoverRegion] = []
        for spec in regions:
            if map_memory:
                address = map_anonymous(spec.length, spec.page_size, spec.run_address)
                mapped.append(_Mapped(address, spec.length))
            elif spec.run_address is None:
                raise RestoreError("with map_memory=False every region needs a run_address")
            else:
                address = spec.run_address
            placed.append(
                HandoverRegion(
                    run_address=RunAddr(address),
                    image_address=ImageAddr(spec.image_address),
                    length=spec.length,
                    page_size=spec.page_size,
                )
            )
        return tuple(placed)

    def _hand_over(self, request: bytes, uffd: Uffd) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            rights = array.array("i", [uffd.fd]).tobytes()
            # A daemon that refuses may answer and hang up before our send: its reply,
            # read below, says why.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            try:
                data = sock.recv(MAX_REPLY_BYTES)
            except ConnectionResetError:
                data = b""
            if not data:
                raise RestoreFailed(
                    f"the daemon at {self.socket_path} hung up without answering the handover"
                )
            reply = decode_reply(data)
            if isinstance(reply, Error):
                raise HandoverRefused(reply.code, reply.message)
            if not isinstance(reply, Ack):
                raise PeerProtocolError(
                    f"expected an ack from the daemon, got {type(reply).__name__}"
                )
        except BaseException:
            sock.close()
            raise
        return sock, reply.handover_id


_held: weakref.WeakSet[HandedOver] = weakref.WeakSet()
"""Restores whose copy of the uffd is open, for the fork hook below."""


def _drop_copies_in_child() -> None:
    """In a child just forked: its parent's uffd copies are not its own to hold."""
    for restore in list(_held):
        restore._drop_uffd()


os.register_at_fork(after_in_child=_drop_copies_in_child)


def _make_uffd(regions: tuple[HandoverRegion, ...]) -> Uffd:
    huge = any(r.page_size != PAGE_SIZE for r in regions)
    required = REQUIRED_FEATURES | (Feature.MISSING_HUGETLBFS if huge else Feature(0))
    uffd = Uffd.create(nonblocking=True, user_mode_only=False)
    try:
        uffd.api(required | WISHED_FEATURES, required=required)
    except BaseException:
        uffd.close()
        raise
    return uffd


def map_anonymous(length: int, page_size: int = PAGE_SIZE, address: int | None = None) -> int:
    """Map private anonymous read-write memory; at exactly ``address`` if given.

    A fixed address never replaces an existing mapping (MAP_FIXED_NOREPLACE): a taken
    range raises RestoreError. Huge page sizes map hugetlbfs pages of that size (the
    pool must have them: vm.nr_hugepages).
    """
    flags = memory.MAP_PRIVATE | memory.MAP_ANONYMOUS | memory.MAP_NORESERVE
    if page_size != PAGE_SIZE:
        if page_size not in (HUGE_2M, HUGE_1G):
            raise RestoreError(f"page size {page_size} is not 4 KiB, 2 MiB or 1 GiB")
        flags |= memory.MAP_HUGETLB | ((page_size.bit_length() - 1) << memory.MAP_HUGE_SHIFT)
    if length <= 0 or length % page_size:
        raise RestoreError(f"length {length:#x} is not a positive multiple of {page_size}")
    if address is not None:
        if address % page_size:
            raise RestoreError(f"address {address:#x} is not aligned to {page_size}")
        flags |= memory.MAP_FIXED_NOREPLACE
    try:
        result = memory.mmap(address, length, memory.PROT_READ | memory.PROT_WRITE, flags)
    except OSError as exc:
        where = "" if address is None else f" at [{address:#x}, +{length:#x})"
        if exc.errno == errno.EEXIST:
            raise RestoreError(
                f"cannot map{where}: the range is already mapped in this process"
            ) from exc
        raise RestoreError(f"cannot map {length:#x} bytes{where}: {exc.strerror}") from exc
    if address is not None and result != address:  # a kernel without NOREPLACE: a hint
        memory.munmap(result, length)
        raise RestoreError(f"cannot map at {address:#x}: the kernel placed it at {result:#x}")
    return result


def unmap(address: int, length: int) -> None:
    """Unmap memory mapped by :func:`map_anonymous` (e.g. after a restore is over)."""
    try:
        memory.munmap(address, length)
    except OSError as exc:
        raise RestoreError(f"munmap [{address:#x}, +{length:#x}): {exc.strerror}") from exc


# -- uffdd restore: an image restored into this very process, every byte checked ---------

_STEP = 1 << 20
_ZEROS = bytes(_STEP)
_MAX_REPORTED = 16


def restore_and_check(
    reader: ImageReader,
    socket_path: Path = DEFAULT_SOCKET,
    *,
    image_id: str | None = None,
    page_server: str = "",
    at_image_addresses: bool = False,
    verify: bool = True,
    wait_resident: bool = True,
    timeout: float = 60.0,
    labels: Mapping[str, str] | None = None,
    on_handed_over: Callable[[HandedOver], None] | None = None,
) -> dict[str, Any]:
    """``uffdd restore``: map every region of ``reader``'s image into this process, hand
    them over to the daemon at ``socket_path``, then read every page (each read of a
    missing page is a fault the daemon serves) and compare it with the image
    (``verify``) or read one byte per page; optionally wait for the Resident report.

    Returns the report (plain data; ``mismatched_pages`` counts the pages that differ).
    Raises what :meth:`Restorer.restore` and :meth:`HandedOver.wait_resident` raise.
    """
    wanted = image_id or reader.image_id
    specs = [
        RegionSpec(
            image_address=r.start,
            length=r.length,
            page_size=r.page_size,
            run_address=r.start if at_image_addresses else None,
        )
        for r in reader.regions
    ]
    restorer = Restorer(socket_path, timeout=timeout, name="uffdd restore", labels=labels or {})
    started = time.monotonic()
    with restorer.restore(wanted, specs, page_server=page_server) as restore:
        handed_over = time.monotonic()
        if on_handed_over is not None:
            on_handed_over(restore)
        mismatches: list[int] = []
        for region in restore.regions:
            if verify:
                mismatches += _verify_region(reader, region)
            else:
                _touch_region(region)
        checked = time.monotonic()
        summary = restore.wait_resident(timeout) if wait_resident else None
    return {
        "handover_id": restore.handover_id,
        "image_id": wanted,
        "regions": [
            {"run_address": r.run_address, "image_address": r.image_address, "length": r.length}
            for r in restore.regions
        ],
        "bytes": restore.total_bytes,
        "checked": "verify" if verify else "touch",
        "mismatched_pages": len(mismatches),
        "first_mismatches": [hex(a) for a in mismatches[:_MAX_REPORTED]],
        "seconds_to_ack": round(handed_over - started, 6),
        "seconds_to_check": round(checked - handed_over, 6),
        "resident": None if summary is None else _summary_dict(summary),
    }


def watched(
    body: Callable[[Callable[[HandedOver], None]], dict[str, Any]], timeout: float
) -> dict[str, Any]:
    """Run ``body`` (a restore into this process's memory, such as
    :func:`restore_and_check` with ``wait_resident=False``) in a forked child, and keep the
    line back to the daemon here, in a process the daemon never kills.

    Why: a restored process the daemon cannot serve is killed; if it were the restorer
    too, the reason (``Failed``) would die with it. The child hands this process a copy of
    its connection (``on_handed_over``) and reads it no more; this process waits for
    ``Resident`` (added to the child's report as ``resident``) or ``Failed`` (raised as
    RestoreFailed with the daemon's reason, whether or not the child was killed), and only
    then lets the child end: its memory must live until the daemon lets go of it.
    """
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the restored process
        here.close()
        os._exit(_watched_child(body, there))
    there.close()
    try:
        return _watch(here, pid, timeout)
    finally:
        here.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _watched_child(
    body: Callable[[Callable[[HandedOver], None]], dict[str, Any]], line: socket.socket
) -> int:
    def hand_over(restore: HandedOver) -> None:
        sock = restore._sock
        assert sock is not None
        line.sendmsg(
            [b"conn"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))]
        )

    try:
        result: dict[str, Any] = {"report": body(hand_over)}
    except (UffddError, OSError) as exc:
        result = {"error": str(exc)}
    line.send(json.dumps(result).encode())
    line.recv(16)  # until the watcher says the daemon let go (or it went away)
    return 0 if "report" in result else 1


def _watch(line: socket.socket, child: int, timeout: float) -> dict[str, Any]:
    """The watcher's side of :func:`watched`."""
    conn: socket.socket | None = None
    outcome: dict[str, Any] | None = None
    summary: ResidentSummary | None = None
    deadline = time.monotonic() + timeout
    try:
        while outcome is None or (conn is not None and summary is None):
            waiting = [line] if outcome is None else []
            if conn is not None and summary is None:
                waiting.append(conn)
            left = deadline - time.monotonic()
            ready, _, _ = select.select(waiting, [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"the restore made no progress for {timeout:g} s")
            if line in ready:
                data, ancillary, _, _ = line.recvmsg(1 << 20, socket.CMSG_SPACE(4))
                fds = [fd for level, kind, raw in ancillary if kind == socket.SCM_RIGHTS
                       for fd in array.array("i", raw)]  # fmt: skip
                if fds:
                    conn = socket.socket(fileno=fds[0])
                elif data:
                    outcome = json.loads(data)
                else:  # the restored process died
                    reason = _failed_reason(conn) or "the restored process died"
                    raise RestoreFailed(reason)
            if conn is not None and conn in ready:
                data = conn.recv(MAX_REPLY_BYTES)
                reply = decode_reply(data) if data else None
                deadline = time.monotonic() + timeout  # the daemon is making progress
                if isinstance(reply, ResidentSummary):
                    summary = reply
                elif isinstance(reply, Failed):
                    raise RestoreFailed(reply.reason)
                elif reply is None:
                    raise RestoreFailed("the daemon hung up before the memory was resident")
        assert outcome is not None
        if "error" in outcome:
            raise RestoreFailed(str(outcome["error"]))
        report: dict[str, Any] = outcome["report"]
        if summary is not None:
            report["resident"] = _summary_dict(summary)
        return report
    finally:
        with contextlib.suppress(OSError):
            line.send(b"done")
        if conn is not None:
            conn.close()


def _failed_reason(conn: socket.socket | None) -> str | None:
    """The reason of a Failed already sent on ``conn`` (the restored process died)."""
    if conn is None:
        return None
    conn.setblocking(False)
    with contextlib.suppress(OSError):
        while data := conn.recv(MAX_REPLY_BYTES):
            reply = decode_reply(data)
            if isinstance(reply, Failed):
                return reply.reason
    return None


def _summary_dict(summary: ResidentSummary) -> dict[str, float]:
    return {
        "pages": summary.pages,
        "bytes": summary.bytes,
        "faults": summary.faults,
        "fault_p50_us": summary.fault_p50_us,
        "fault_p99_us": summary.fault_p99_us,
        "seconds_to_resident": summary.seconds_to_resident,
    }


def _verify_region(reader: ImageReader, region: HandoverRegion) -> list[int]:
    """Image addresses of the pages whose bytes differ from the image."""
    bad: list[int] = []
    shift = region.run_address - region.image_address
    for extent in reader.extents(ImageAddr(region.image_address), region.length):
        for offset in range(0, extent.length, _STEP):
            size = min(_STEP, extent.length - offset)
            image_address = extent.start + offset
            actual = ctypes.string_at(image_address + shift, size)
            if extent.kind is ExtentKind.DATA:
                expected: bytes | memoryview = reader.data(extent)[offset : offset + size]
            else:
                expected = _ZEROS[:size]
            if actual != expected:
                bad += _differing_pages(actual, expected, image_address, region.page_size)
    return bad


def _differing_pages(
    actual: bytes, expected: bytes | memoryview, image_address: int, page_size: int
) -> list[int]:
    return [
        image_address + at
        for at in range(0, len(actual), page_size)
        if actual[at : at + page_size] != expected[at : at + page_size]
    ]


def _touch_region(region: HandoverRegion) -> None:
    for address in range(region.run_address, region.run_end, region.page_size):
        ctypes.string_at(address, 1)
