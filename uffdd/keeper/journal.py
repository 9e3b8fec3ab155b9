"""The state directory: what a restarted daemon must know about every process it served.

Why written down before it matters: when the daemon dies, its uffds live on (the keeper
holds them), but what it knew dies with it. A daemon that resumes must know, for every
process, which image and page source it uses, where each lazy page is now (the map the
REMAP, REMOVE and UNMAP events changed) and which pages read zeros for good; and it must
know when it cannot know: a read of a uffd in progress, or a layout event read but not
yet written down, makes that process's tree unprovable, and it is killed, never served
from a guess.

Layout of ``DIR`` (one generation per daemon instance, so a resuming daemon never
overwrites what the keeper of the dead one reads):

- ``GEN/procs/<proc>.json``: one :class:`Record` per process (written whole, renamed);
- ``GEN/marks``: one byte per descriptor number of the daemon's table: 1 while that uffd
  is being read, or while a layout event read from it is not journaled yet;
- ``GEN/keeper.sock``: a keeper waiting for a daemon to take the descriptors back.

Records name descriptors by their number in the daemon's table, which is the keeper's
table too (keeper/twin.py): no descriptor is ever sent anywhere to be journaled.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.errors import ConfigError
from uffdd.core.process import Checkpoint, LazyRegion

RECORD_VERSION = 1
MARKS_MAX = 1 << 20
"""Descriptor numbers at or above this are never marked (the daemon refuses them)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One process the daemon serves, as a resuming daemon needs it."""

    proc: str
    root: str
    parent: str | None
    dialect: str
    """``native``, ``criu`` or ``firecracker``: who handed it over."""
    image_id: str
    checkpoint: Checkpoint
    uffd: int
    """Descriptor numbers in the daemon's (and the keeper's) table; -1: none."""
    pidfd: int = -1
    conn: int = -1
    """The restorer's connection (native handovers): Failed or Resident goes there."""
    pid: int = 0
    source: dict[str, str] = field(default_factory=dict)
    """``{"page_server": target}`` or ``{"images": root}`` (roots only)."""
    data: tuple[tuple[int, int], ...] = ()
    """The image's stored (address, length) extents (roots only)."""
    handover_id: str = ""

    def descriptors(self) -> list[int]:
        return [fd for fd in (self.uffd, self.pidfd, self.conn) if fd >= 0]

    def with_descriptors(self, mapping: dict[int, int]) -> Record:
        """The same record with its descriptor numbers translated (a resuming daemon)."""
        return replace(
            self,
            uffd=mapping.get(self.uffd, -1),
            pidfd=mapping.get(self.pidfd, -1),
            conn=mapping.get(self.conn, -1),
        )


def _encode(record: Record) -> str:
    raw = asdict(record)
    checkpoint = record.checkpoint
    raw["checkpoint"] = {
        "pieces": [[p.run, p.image, p.length, p.page_size] for p in checkpoint.pieces],
        "zero": [list(span) for span in checkpoint.zero],
        "handed_over": checkpoint.handed_over,
        "forks": checkpoint.forks,
    }
    raw["data"] = [list(span) for span in record.data]
    raw["version"] = RECORD_VERSION
    return json.dumps(raw, separators=(",", ":"))


def _decode(text: str) -> Record:
    raw = json.loads(text)
    if raw.pop("version", None) != RECORD_VERSION:
        raise ValueError("a record of another version")
    cp = raw.pop("checkpoint")
    checkpoint = Checkpoint(
        pieces=tuple(
            LazyRegion(RunAddr(run), ImageAddr(image), length, size)
            for run, image, length, size in cp["pieces"]
        ),
        zero=tuple((int(lo), int(hi)) for lo, hi in cp["zero"]),
        handed_over=bool(cp["handed_over"]),
        forks=int(cp["forks"]),
    )
    data = tuple((int(a), int(n)) for a, n in raw.pop("data"))
    return Record(checkpoint=checkpoint, data=data, **raw)


class Generation:
    """One daemon instance's journal (``DIR/GEN``)."""

    def __init__(self, path: Path, *, create: bool) -> None:
        self.path = path
        self.name = path.name
        self._procs = path / "procs"
        marks = path / "marks"
        if create:
            self._procs.mkdir(parents=True, mode=0o700)
            size = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], MARKS_MAX)
            with marks.open("wb") as file:
                file.truncate(max(size, 1024))
        with marks.open("r+b") as file:
            self._marks = mmap.mmap(file.fileno(), 0)
        self.mark_slots = len(self._marks)

    @property
    def marks(self) -> mmap.mmap:
        """The marks, shared with the C demand thread (``uffdd_demander_marks``)."""
        return self._marks

    @property
    def keeper_socket(self) -> Path:
        return self.path / "keeper.sock"

    def mark(self, fd: int, value: int) -> None:
        if 0 <= fd < self.mark_slots:
            self._marks[fd] = value

    def marked(self, fd: int) -> bool:
        return 0 <= fd < self.mark_slots and self._marks[fd] != 0

    def write(self, record: Record) -> None:
        """Write (or replace) a process's record; it is whole or absent, never half."""
        final = self._procs / f"{record.proc}.json"
        partial = self._procs / f".{record.proc}.json.partial"
        partial.write_text(_encode(record))
        os.replace(partial, final)

    def checkpoint(self, proc: str, checkpoint: Checkpoint) -> None:
        """Replace the checkpoint of a journaled process (after a layout change)."""
        record = self.read(proc)
        if record is not None:
            self.write(replace(record, checkpoint=checkpoint))

    def read(self, proc: str) -> Record | None:
        try:
            return _decode((self._procs / f"{proc}.json").read_text())
        except FileNotFoundError:
            return None

    def remove(self, proc: str) -> None:
        (self._procs / f"{proc}.json").unlink(missing_ok=True)

    def records(self) -> list[Record]:
        """Every record (a file that does not decode is an error: nothing is guessed)."""
        found = []
        for path in sorted(self._procs.glob("*.json")):
            try:
                found.append(_decode(path.read_text()))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"journal record {path} is damaged: {exc}") from exc
        return found

    def close(self) -> None:
        self._marks.close()

    def discard(self) -> None:
        """Remove this generation (its processes ended or were taken over)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


class StateDir:
    """``DIR``: the generations of every daemon instance that used it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"state directory {path}: {exc.strerror or exc}") from exc

    def new_generation(self) -> Generation:
        """A fresh journal for this daemon instance."""
        name = f"gen-{os.getpid()}-{_start_time(os.getpid())}"
        return Generation(self.path / name, create=True)

    def generations(self, *, besides: str = "") -> Iterator[Generation]:
        """The journals of earlier instances (oldest first)."""
        for path in sorted(self.path.glob("gen-*")):
            if path.name != besides and (path / "marks").exists():
                yield Generation(path, create=False)


def _start_time(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]
