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
- ``GEN/marks``: one byte per descriptor number of the daemon's table (``READING`` while
  that uffd is being read, ``HELD`` while a batch with a layout event read from it is
  not yet journaled), then one slot per descriptor number, which the kernel's read()
  writes the messages into (zeroed before each read; the sequence number and count of
  a held batch in its header). A daemon that resumes replays what a read consumed that
  the checkpoint does not include: no moment of the daemon's death loses an event;
- ``GEN/handovers/<name>.json``: a handover still in progress (CRIU's connection before
  its restore-finished marker: uffds may still be in flight on it), as a
  :class:`PendingHandover`; a death then kills that restore whole;
- ``GEN/keeper.sock``: a keeper waiting for a daemon to take the descriptors back.

Records name descriptors by their number in the daemon's table, which is the keeper's
table too (keeper/twin.py): no descriptor is ever sent anywhere to be journaled.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import resource
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from uffdd import systemd
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.errors import ConfigError
from uffdd.core.events import Fork
from uffdd.core.process import Checkpoint, LazyRegion
from uffdd.core.wire import decode_messages
from uffdd.kernel.proc import process_alive, start_time
from uffdd.log import get_logger

_log = get_logger("uffdd.keeper.journal")

RECORD_VERSION = 1
MARKS_MAX = 1 << 16
"""Descriptor numbers at or above this are never marked (their processes are unprovable)."""
READING = 1
HELD = 2
MSG_SIZE = 32
SLOT_MESSAGES = 64
"""A read's messages at most (the readers read 64 at a time)."""
SLOT_SIZE = 16 + SLOT_MESSAGES * MSG_SIZE
"""A slot: u64 sequence, u32 message count, u32 unused, the messages (native endian)."""
_HEADER = struct.Struct("=QI4x")


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
    acked: bool = True
    """The restorer was told the daemon holds the uffd (a native Ack); a daemon that
    resumes a restore not acked yet sends the Ack first."""
    started: str = ""
    """The root's start time (``/proc/PID/stat``): with ``pid``, proves it is the same
    process should its pidfd be lost."""
    applied: int = 0
    """The sequence number of the last held batch of its uffd that ``checkpoint``
    includes (a later one is replayed on resume)."""

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


@dataclass(frozen=True, slots=True)
class PendingHandover:
    """A handover the daemon was still taking when it died: nothing of it can be
    resumed (the connection's place in its protocol is lost), so its restore ends: every
    tree journaled under ``name`` (their records' ``handover_id``) is killed, and so is
    the sender of every uffd still in flight on the connection ``conn``; then the
    connection is closed, and the restorer (criu restore, ``pid``) fails its restore."""

    name: str
    pid: int
    conn: int
    received: tuple[tuple[int, int, str], ...] = ()
    """(descriptor number, sender pid, its start time) of every uffd received on the
    connection: a task whose uffd the daemon held but had not journaled yet is killed too
    (by a pidfd of the pid, proven by the start time)."""


def fork_children(raw: bytes) -> list[int]:
    """The descriptor numbers of the fork children's uffds in a held batch."""
    return [e.child_fd for e in decode_messages(raw) if isinstance(e, Fork)]


FD_STORE_PREFIX = "uffdd."


def stored_names(record: Record) -> dict[str, int]:
    """The fd store's names for ``record``'s descriptors (stable across daemons: a
    process keeps its name when a daemon resumes it)."""
    kinds = {"uffd": record.uffd, "pidfd": record.pidfd, "conn": record.conn}
    return {f"{FD_STORE_PREFIX}{record.proc}.{kind}": fd for kind, fd in kinds.items() if fd >= 0}


class Generation:
    """One daemon instance's journal (``DIR/GEN``). With ``fd_store`` every journaled
    descriptor is also stored in systemd's fd store (``systemd.fd_store``), a holder that
    outlives even the keeper."""

    def __init__(self, path: Path, *, create: bool, fd_store: bool = False) -> None:
        self.path = path
        self.name = path.name
        self.fd_store = fd_store
        self._procs = path / "procs"
        marks = path / "marks"
        self._handovers = path / "handovers"
        if create:
            self._procs.mkdir(parents=True, mode=0o700)
            self._handovers.mkdir(mode=0o700)
            count = max(min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], MARKS_MAX), 1024)
            with marks.open("wb") as file:  # sparse: a slot takes room once written
                file.truncate(count * (1 + SLOT_SIZE))
        with marks.open("r+b") as file:
            self._file = mmap.mmap(file.fileno(), 0)
        self._dir = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.mark_slots = len(self._file) // (1 + SLOT_SIZE)
        """Marks come first, one byte per descriptor number; the slots follow."""

    @property
    def mapping(self) -> mmap.mmap:
        """The marks and the slots, for a C reader (``ffi.from_buffer``: the marks at its
        start, the slots ``mark_slots`` bytes in). No view of it is kept here: the
        mapping is unmapped only when nothing refers to it any more."""
        return self._file

    @property
    def keeper_socket(self) -> Path:
        return self.path / "keeper.sock"

    @property
    def keeper_address(self) -> Path:
        """``keeper_socket`` as a path short enough for a socket address whatever the
        state directory's length (through this generation's directory descriptor)."""
        return Path(f"/proc/self/fd/{self._dir}/keeper.sock")

    def twin_started(self, pid: int) -> None:
        """Note the daemon's twin (a resuming daemon waits for it to become the keeper)."""
        (self.path / "twin").write_text(f"{pid} {start_time(pid)}")

    def twin_alive(self) -> bool:
        """Whether the twin noted here still runs (it may be turning into the keeper)."""
        try:
            pid, started = (self.path / "twin").read_text().split()
        except (OSError, ValueError):
            return False
        return process_alive(int(pid), started)

    def mark(self, fd: int, value: int) -> None:
        if 0 <= fd < self.mark_slots:
            self._file[fd] = value

    def marked(self, fd: int) -> int:
        """The mark of ``fd``: 0, ``READING`` or ``HELD`` (``READING`` for a number past
        the marks: nothing can be proven of it)."""
        return self._file[fd] if 0 <= fd < self.mark_slots else READING

    def read_uffd(self, fd: int) -> bytes:
        """A journaled read of uffd ``fd`` (what ``csrc/uffd.c:uffd_read_journaled``
        does in C): the kernel writes the messages into ``fd``'s slot, zeroed first,
        while the mark says ``READING``. b"" when nothing is queued. Settle it with
        :meth:`settle`. Past the marks: a plain read, and the process unprovable."""
        if not 0 <= fd < self.mark_slots:
            try:
                return os.read(fd, SLOT_MESSAGES * MSG_SIZE)
            except BlockingIOError:
                return b""
        start = self._slot(fd) + _HEADER.size
        end = start + SLOT_MESSAGES * MSG_SIZE
        self._file[start:end] = bytes(end - start)
        self._file[fd] = READING
        try:
            with memoryview(self._file) as whole, whole[start:end] as messages:
                count = os.readv(fd, [messages])
        except BlockingIOError:
            self._file[fd] = 0
            return b""
        return self._file[start : start + count]

    def settle(self, fd: int, count: int, layout: bool) -> None:
        """After a journaled read of ``count`` messages: one with a layout event is
        ``HELD`` (its count, the next sequence number) until journaled; one without is
        unmarked at once (faults are asked again on resume)."""
        if not 0 <= fd < self.mark_slots:
            return
        if not layout:
            self._file[fd] = 0
            return
        at = self._slot(fd)
        sequence, _ = _HEADER.unpack_from(self._file, at)
        struct.pack_into("=I", self._file, at + 8, count)
        struct.pack_into("=Q", self._file, at, sequence + 1)
        self._file[fd] = HELD

    def held(self, fd: int) -> tuple[int, bytes]:
        """The sequence number of ``fd``'s last held batch, and its raw messages."""
        if not 0 <= fd < self.mark_slots:
            return 0, b""
        at = self._slot(fd)
        sequence, count = _HEADER.unpack_from(self._file, at)
        count = min(count, SLOT_MESSAGES)
        return sequence, self._file[at + _HEADER.size : at + _HEADER.size + count * MSG_SIZE]

    def pending(self, record: Record) -> bytes:
        """What a read of ``record``'s uffd consumed that its checkpoint does not
        include (raw messages), for a resuming daemon to replay: a read cut short by the
        death (``READING``: every message the kernel wrote into the zeroed slot), or a
        held batch not journaled yet (``HELD``, newer than the record's ``applied``)."""
        mark = self.marked(record.uffd)
        if mark == READING and 0 <= record.uffd < self.mark_slots:
            start = self._slot(record.uffd) + _HEADER.size
            raw = self._file[start : start + SLOT_MESSAGES * MSG_SIZE]
            messages = [raw[at : at + MSG_SIZE] for at in range(0, len(raw), MSG_SIZE)]
            return b"".join(m for m in messages if m[0] != 0)
        if mark != HELD:
            return b""
        sequence, raw = self.held(record.uffd)
        return raw if sequence > record.applied else b""

    def _slot(self, fd: int) -> int:
        """Where ``fd``'s slot starts in the mapping."""
        return self.mark_slots + fd * SLOT_SIZE

    def provable(self, record: Record) -> bool:
        """Whether what the dead daemon knew of ``record``'s process can be proven: its
        uffd's descriptor number had a mark (else a read of it was never journaled)."""
        return 0 <= record.uffd < self.mark_slots

    def write(self, record: Record) -> None:
        """Write (or replace) a process's record; it is whole or absent, never half."""
        final = self._procs / f"{record.proc}.json"
        partial = self._procs / f".{record.proc}.json.partial"
        partial.write_text(_encode(record))
        os.replace(partial, final)

    def checkpoint(self, proc: str, checkpoint: Checkpoint) -> None:
        """Replace the checkpoint of a journaled process (after a layout change): it
        includes the batch held for its uffd now."""
        record = self.read(proc)
        if record is not None:
            applied, _ = self.held(record.uffd)
            self.write(replace(record, checkpoint=checkpoint, applied=applied))

    def add(self, record: Record) -> None:
        """Journal a process new to this generation: whatever its descriptor number's
        slot holds belongs to an earlier uffd and is never replayed into this one."""
        applied, _ = self.held(record.uffd)
        self.write(replace(record, applied=applied))
        if self.fd_store:
            for name, fd in stored_names(record).items():
                try:
                    systemd.fd_store(name, [fd])
                except OSError as exc:  # the keeper still holds it
                    _log.warning("fd store refused a descriptor", name=name, error=str(exc))

    def read(self, proc: str) -> Record | None:
        try:
            return _decode((self._procs / f"{proc}.json").read_text())
        except FileNotFoundError:
            return None

    def remove(self, proc: str) -> None:
        record = self.read(proc) if self.fd_store else None
        (self._procs / f"{proc}.json").unlink(missing_ok=True)
        if record is not None:
            for name in stored_names(record):
                with contextlib.suppress(OSError):
                    systemd.fd_store_remove(name)

    def begin_handover(self, pending: PendingHandover) -> None:
        partial = self._handovers / f".{pending.name}.partial"
        partial.write_text(json.dumps(asdict(pending)))
        os.replace(partial, self._handovers / f"{pending.name}.json")

    def end_handover(self, name: str) -> None:
        (self._handovers / f"{name}.json").unlink(missing_ok=True)

    def pending_handovers(self) -> list[PendingHandover]:
        found = []
        for path in sorted(self._handovers.glob("*.json")):
            with contextlib.suppress(ValueError, TypeError, OSError):
                raw = json.loads(path.read_text())
                raw["received"] = tuple(tuple(r) for r in raw.get("received", ()))
                found.append(PendingHandover(**raw))
        return found

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
        # A C reader's pointer into the marks may outlive this (until the interpreter
        # exits): then the mapping stays, and is unmapped with the process.
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1
        with contextlib.suppress(BufferError):
            self._file.close()

    def discard(self) -> None:
        """Remove this generation (its processes ended or were taken over)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def daemon_alive(generation: str) -> bool:
    """Whether the daemon of ``generation`` (``gen-PID-STARTTIME``) still runs."""
    _, pid, started = generation.split("-", 2)
    return process_alive(int(pid), started)


class StateDir:
    """``DIR``: the generations of every daemon instance that used it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def new_generation(self, *, fd_store: bool = False) -> Generation:
        """A fresh journal for this daemon instance (the directory made if need be)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"state directory {self.path}: {exc.strerror or exc}") from exc
        name = f"gen-{os.getpid()}-{start_time(os.getpid())}"
        return Generation(self.path / name, create=True, fd_store=fd_store)

    def generations(self, *, besides: str = "") -> Iterator[Generation]:
        """The journals of earlier instances that died (oldest first): a daemon that
        still runs on the same state directory keeps its own."""
        for path in sorted(self.path.glob("gen-*")):
            if path.name == besides or daemon_alive(path.name):
                continue
            if (path / "marks").exists():
                yield Generation(path, create=False)
