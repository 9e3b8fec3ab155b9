"""The local fast serve's owner: a table of local, verified data and one C call that
reads a uffd and answers the faults it covers.

Why: when a restore's image is on this host, most faults need no decision, only a
lookup and a UFFDIO_COPY; ``uffdd_fast_serve`` (``csrc/fast_serve.c``) does that with the
GIL released and hands every other message back raw, in order, for the core. This
module knows nothing of images: it takes the core's ranges, a buffer and the bytes
saying which checksum chunks are verified. ``kernel.uffd.Uffd.fast_serve`` is the call
the daemon makes. docs/architecture.md: when it runs (section 6), and why it answers no
fault of a read that holds a layout event (section 5.3).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uffdd.core.policy import FaultPlan
from uffdd.core.wire import MSG_SIZE
from uffdd.native._ffi import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

_PAGE = 4096
_DONE_CAP = 4 * lib.UFFDD_FAST_BATCH


class FastStatus(enum.Enum):
    """Why :func:`fast_serve` returned."""

    DRAINED = 0
    """The fd is empty; every message read was answered in C."""
    SLOW = 1
    """A message needs the slow path: it and the rest of its read (the whole read, when
    it holds a layout event) are in ``rest``; more may be queued (read them on the slow
    path too, in order)."""
    FULL = 2
    """No room for more installs: call again."""


@dataclass(frozen=True, slots=True)
class FastResult:
    """What one :func:`fast_serve` call did."""

    status: FastStatus
    installs: tuple[tuple[int, int], ...]
    """(run-time address, length) ranges filled with local data (and woken)."""
    faults: int
    """Faults answered in C (by an install or, for a page found present, a wake)."""
    rest: bytes
    """Raw uffd_msg records for the slow path (decode with ``wire.decode_messages``)."""
    error: int = 0
    """The errno of a failed read() (the installs before it still count)."""


class FastTable:
    """Where :func:`fast_serve` may answer faults with local data, in C's layout.

    ``ranges``: (run-time address, length, offset in ``data``), page-aligned, in any
    order but not overlapping. ``verified`` holds one byte per ``chunk_size`` chunk of
    ``data`` (non-zero: its checksum matched); C never installs from an unverified
    chunk, and reads the bytearray live, so chunks verified later are served at once.
    Holds exports of both buffers until :meth:`close`.
    """

    __slots__ = ("_count", "_data", "_done", "_out", "_plan", "_ranges", "_rest", "_shift",
                 "_verified", "_verified_len")  # fmt: skip

    def __init__(
        self,
        ranges: Iterable[tuple[int, int, int]],
        data: Buffer,
        verified: bytearray,
        chunk_size: int,
        plan: FaultPlan,
    ) -> None:
        for name, size in (("chunk_size", chunk_size), ("the plan's block", plan.block)):
            if size < _PAGE or size & (size - 1):
                raise ValueError(f"{name} {size} is not a power of two of at least a page")
        if plan.whole_block:
            raise ValueError("the fast serve answers from memory: a plan without whole blocks")
        self._data = ffi.from_buffer(data)
        self._ranges, self._count = range_array(ranges, offset_limit=len(self._data))
        self._verified: Any = ffi.from_buffer(verified) if verified else ffi.new("uint8_t[1]")
        self._verified_len = len(verified)
        self._shift = chunk_size.bit_length() - 1
        self._plan = plan_struct(plan)
        self._rest: Any = ffi.new("char[]", lib.UFFDD_FAST_BATCH * MSG_SIZE)
        self._done: Any = ffi.new("struct uffdd_fast_done[]", _DONE_CAP)
        self._out: Any = ffi.new("struct uffdd_fast_out *")

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Release the buffer exports (the image's mmap can then be closed)."""
        for export in (self._data, self._verified):
            with contextlib.suppress(TypeError, ValueError):
                ffi.release(export)


def fast_serve(fd: int, table: FastTable, journal: tuple[Any, Any] | None = None) -> FastResult:
    """Answer the faults queued on uffd ``fd`` that ``table`` covers, in C.

    Messages are taken in order. A read that holds a layout event comes back whole,
    its faults unanswered; otherwise the first message C cannot answer (a fault outside
    the table or on unverified data, an ioctl error other than EEXIST) ends the fast
    path for this call: it and every later message of its read come back raw in
    ``rest``, and more may be queued behind them. ``journal``: the (mark, slot) pointers
    each read is journaled in (``csrc/uffd.c:uffd_read_journaled``).
    """
    mark, slot = journal if journal is not None else (ffi.NULL, ffi.NULL)
    t = table
    rc = lib.uffdd_fast_serve(
        fd, t._ranges, t._count, t._data, t._verified, t._verified_len, t._shift, t._plan,
        t._rest, lib.UFFDD_FAST_BATCH, t._done, _DONE_CAP, t._out, mark, slot,
    )  # fmt: skip
    out = t._out
    done = t._done
    installs = tuple((int(done[i].run), int(done[i].len)) for i in range(out.ndone))
    rest = bytes(ffi.buffer(t._rest, out.nrest * MSG_SIZE)) if out.nrest else b""
    if rc < 0:
        return FastResult(FastStatus.DRAINED, installs, int(out.nfaults), rest, -rc)
    return FastResult(FastStatus(rc), installs, int(out.nfaults), rest)


def plan_struct(plan: FaultPlan) -> Any:
    """The core's fault plan as C's ``struct uffdd_plan``."""
    return ffi.new("struct uffdd_plan *", (plan.block, plan.whole_block))


def plan_fault(
    plan: FaultPlan, data: Iterable[tuple[int, int]], zeros: Iterable[tuple[int, int]], page: int
) -> list[tuple[int, int, bool, int]]:
    """C's answer to a fault on ``page`` (``csrc/plan.c``), as ``core.policy.plan_fault``
    states it: (start, end, zero, table row) spans. For tests holding the two together."""
    rows, count = range_array((start, end - start, 0) for start, end in data)
    zero_rows, zero_count = range_array((start, end - start, 0) for start, end in zeros)
    cap = plan.block // _PAGE + 1
    out: Any = ffi.new("struct uffdd_span[]", cap)
    n = lib.uffdd_plan_fault(plan_struct(plan), rows, count, zero_rows, zero_count, page, out, cap)
    return [(int(s.start), int(s.end), bool(s.zero), int(s.row)) for s in out[0:n]]


def range_array(
    ranges: Iterable[tuple[int, int, int]], *, offset_limit: int | None = None
) -> tuple[Any, int]:
    """(run-time address, length, offset) rows as C's sorted ``uffdd_fast_range``
    array, and its length; ValueError for a row that is not page-aligned, overlaps
    another, or (with ``offset_limit``) reaches past that many bytes of data."""
    rows = sorted(r for r in ranges if r[1] > 0)
    previous_end = 0
    for run, length, offset in rows:
        past = offset_limit is not None and offset + length > offset_limit
        if run % _PAGE or length % _PAGE or offset < 0 or past:
            raise ValueError(f"fast range {run:#x}+{length:#x}@{offset:#x} is not usable")
        if run < previous_end:
            raise ValueError(f"fast range {run:#x} overlaps the one before")
        previous_end = run + length
    array: Any = ffi.new("struct uffdd_fast_range[]", max(len(rows), 1))
    for index, (run, length, offset) in enumerate(rows):
        array[index] = (run, run + length, offset)
    return array, len(rows)
