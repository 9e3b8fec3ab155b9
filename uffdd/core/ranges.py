"""Interval sets and the run-time <-> image address map of one lazy process.

Why intervals: a restore may be many GiB, so per-page Python objects are out of the
question. Page states are kept as sorted lists of disjoint half-open intervals
(:class:`RangeSet`, bisect on two parallel lists) and the layout of a process as a short
sorted list of mapping pieces (:class:`RegionMap`), one per contiguous run that is
contiguous in both address spaces. mremap and munmap split and move pieces; the image
address of a page never changes, only the run-time address it is mapped at.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from uffdd.core.addresses import ImageAddr, RunAddr

A = TypeVar("A", bound=int)


class RangeSet(Generic[A]):
    """A set of addresses stored as sorted, disjoint, non-adjacent ``[start, end)`` spans.

    Parametrised by the address type (``RangeSet[ImageAddr]``) so the two address
    spaces stay apart in the type checker. Adjacent spans are merged on insertion.
    """

    __slots__ = ("_ends", "_starts", "_total")

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._total = 0
        for start, end in spans:
            self.add(start, end)

    # -- mutation --------------------------------------------------------------------

    def add(self, start: int, end: int) -> None:
        """Insert ``[start, end)``, merging with every overlapping or adjacent span."""
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        if not ends or start > ends[-1]:  # fast path: ascending construction appends
            starts.append(start)
            ends.append(end)
            self._total += end - start
            return
        i = bisect_left(ends, start)  # first span ending at or after start (adjacent too)
        j = bisect_right(starts, end)  # one past the last span starting at or before end
        if i < j:
            removed = sum(e - s for s, e in zip(starts[i:j], ends[i:j], strict=True))
            self._total -= removed
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]
        self._total += end - start

    def discard(self, start: int, end: int) -> int:
        """Remove ``[start, end)``; return how many addresses were actually removed."""
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, start)  # first span ending after start
        j = bisect_left(starts, end)  # one past the last span starting before end
        if i >= j:
            return 0
        before = sum(e - s for s, e in zip(starts[i:j], ends[i:j], strict=True))
        new_starts: list[int] = []
        new_ends: list[int] = []
        if starts[i] < start:
            new_starts.append(starts[i])
            new_ends.append(start)
        if ends[j - 1] > end:
            new_starts.append(end)
            new_ends.append(ends[j - 1])
        after = sum(e - s for s, e in zip(new_starts, new_ends, strict=True))
        starts[i:j] = new_starts
        ends[i:j] = new_ends
        self._total -= before - after
        return before - after

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._total = 0

    # -- queries ---------------------------------------------------------------------

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, int):
            return False
        i = bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._ends[i]

    def span_at(self, address: int) -> tuple[A, A] | None:
        """The span holding ``address``, or None."""
        i = bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._ends[i]:
            return cast(A, self._starts[i]), cast(A, self._ends[i])
        return None

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect_right(self._ends, start)
        return i < len(self._starts) and self._starts[i] < end and start < end

    def intersect(self, start: int, end: int) -> list[tuple[A, A]]:
        """The parts of the set inside ``[start, end)``, in ascending order."""
        if end <= start:
            return []
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, start)
        j = bisect_left(starts, end)
        return [(cast(A, max(starts[k], start)), cast(A, min(ends[k], end))) for k in range(i, j)]

    def first(self) -> tuple[A, A] | None:
        """The lowest span, or None when empty."""
        if not self._starts:
            return None
        return cast(A, self._starts[0]), cast(A, self._ends[0])

    def spans(self) -> Iterator[tuple[A, A]]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield cast(A, start), cast(A, end)

    @property
    def total(self) -> int:
        """How many addresses (bytes) the set holds."""
        return self._total

    def copy(self) -> RangeSet[A]:
        clone: RangeSet[A] = RangeSet()
        clone._starts = list(self._starts)
        clone._ends = list(self._ends)
        clone._total = self._total
        return clone

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        """The number of spans (not addresses: see :attr:`total`)."""
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"[{s:#x}, {e:#x})" for s, e in self.spans())
        return f"RangeSet({inner})"


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of pages contiguous in both address spaces, with one page size."""

    run: RunAddr
    image: ImageAddr
    length: int
    page_size: int

    @property
    def run_end(self) -> int:
        return self.run + self.length

    @property
    def image_end(self) -> int:
        return self.image + self.length

    def to_image(self, address: int) -> ImageAddr:
        return ImageAddr(self.image + (address - self.run))

    def to_run(self, address: int) -> RunAddr:
        return RunAddr(self.run + (address - self.image))

    def clip_run(self, start: int, end: int) -> Piece | None:
        """The part of this piece whose run-time addresses lie in ``[start, end)``."""
        lo, hi = max(start, self.run), min(end, self.run_end)
        if hi <= lo:
            return None
        return Piece(RunAddr(lo), self.to_image(lo), hi - lo, self.page_size)

    def clip_image(self, start: int, end: int) -> Piece | None:
        """The part of this piece whose image addresses lie in ``[start, end)``."""
        lo, hi = max(start, self.image), min(end, self.image_end)
        if hi <= lo:
            return None
        return Piece(self.to_run(lo), ImageAddr(lo), hi - lo, self.page_size)


class RegionMap:
    """Which run-time ranges of a process are lazy, and the image address of each.

    Within one process the map is injective (a page of the image is mapped at most once:
    mremap moves, it does not copy), so the core keeps page states by image address and
    translates through this map; that makes remap a pure map operation.
    """

    __slots__ = ("_by_image", "_pieces", "_runs")

    def __init__(self, pieces: Iterable[Piece] = ()) -> None:
        self._pieces: list[Piece] = []
        self._runs: list[int] = []
        self._by_image: list[Piece] | None = None
        for piece in pieces:
            self.insert(piece)

    def insert(self, piece: Piece) -> None:
        if piece.length <= 0:
            return
        if self.pieces_in_run(piece.run, piece.run_end):
            raise ValueError(f"run-time range {piece.run:#x}+{piece.length:#x} already mapped")
        i = bisect_left(self._runs, piece.run)
        self._pieces.insert(i, piece)
        self._runs.insert(i, piece.run)
        self._by_image = None

    def lookup(self, address: int) -> Piece | None:
        """The piece mapping run-time ``address``, or None."""
        i = bisect_right(self._runs, address) - 1
        if i >= 0 and address < self._pieces[i].run_end:
            return self._pieces[i]
        return None

    def lookup_image(self, address: int) -> Piece | None:
        """The piece holding image ``address``, or None."""
        by_image = self._image_index()
        i = bisect_right(by_image, address, key=lambda p: p.image) - 1
        if i >= 0 and address < by_image[i].image_end:
            return by_image[i]
        return None

    def pieces_in_run(self, start: int, end: int) -> list[Piece]:
        """The pieces (clipped) whose run-time addresses meet ``[start, end)``."""
        i = max(bisect_right(self._runs, start) - 1, 0)
        out: list[Piece] = []
        for piece in self._pieces[i:]:
            if piece.run >= end:
                break
            clipped = piece.clip_run(start, end)
            if clipped is not None:
                out.append(clipped)
        return out

    def pieces_in_image(self, start: int, end: int) -> list[Piece]:
        """The pieces (clipped) whose image addresses meet ``[start, end)``, image order."""
        out: list[Piece] = []
        for piece in self._image_index():
            if piece.image >= end:
                break
            clipped = piece.clip_image(start, end)
            if clipped is not None:
                out.append(clipped)
        return out

    def drop(self, start: int, end: int) -> list[Piece]:
        """Unmap run-time ``[start, end)``: split pieces at the edges, return what went."""
        removed: list[Piece] = []
        kept: list[Piece] = []
        for piece in self._pieces:
            if piece.run_end <= start or piece.run >= end:
                kept.append(piece)
                continue
            inside = piece.clip_run(start, end)
            assert inside is not None
            removed.append(inside)
            left = piece.clip_run(piece.run, start)
            right = piece.clip_run(end, piece.run_end)
            kept.extend(p for p in (left, right) if p is not None)
        if removed:
            self._pieces = kept
            self._runs = [p.run for p in kept]
            self._by_image = None
        return removed

    def move(self, old: int, new: int, length: int) -> tuple[list[Piece], list[Piece]]:
        """mremap: move ``[old, old+length)`` to ``new``; image addresses stay.

        Whatever was mapped at the destination is replaced (MREMAP_FIXED unmaps it
        first). Returns (pieces that moved, at their new place; pieces displaced from
        the destination).
        """
        moving = self.drop(old, old + length)
        displaced = self.drop(new, new + length)
        moved = [Piece(RunAddr(p.run - old + new), p.image, p.length, p.page_size) for p in moving]
        for piece in moved:
            self.insert(piece)
        return moved, displaced

    def copy(self) -> RegionMap:
        return RegionMap(self._pieces)

    def __iter__(self) -> Iterator[Piece]:
        return iter(list(self._pieces))

    def __bool__(self) -> bool:
        return bool(self._pieces)

    @property
    def total(self) -> int:
        return sum(p.length for p in self._pieces)

    def _image_index(self) -> list[Piece]:
        if self._by_image is None:
            self._by_image = sorted(self._pieces, key=lambda p: p.image)
        return self._by_image
