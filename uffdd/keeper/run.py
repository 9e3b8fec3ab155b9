"""The keeper: what the daemon's twin becomes once the daemon died.

Why: the twin inherited the dead daemon's whole descriptor table, so every uffd is
still held and every restored process blocks on its next fault instead of reading
zeros. This program decides, from the journal, what happens next:

- a tree whose state cannot be proven (a uffd was being read, or a layout event was read
  and not journaled, when the daemon died) is killed at once, with its reason;
- every other tree waits, held, for a daemon to take it back (``keeper/handback.py``);
- if none does within ``--resume-deadline`` seconds, every tree is killed and each
  native restorer gets ``Failed`` with the reason. Only processes proven to be the ones
  served are killed: the root by the pidfd the daemon opened at the handover, the rest
  by ``kernel/proc.py:kill_tree`` from it.

Descriptors the journal does not name (listening sockets, page-server connections) are
closed first: a handover socket must not look alive while nobody accepts on it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from uffdd.core.handover import Failed
from uffdd.keeper.handback import send_all, wait_taken
from uffdd.keeper.journal import (
    Generation,
    PendingHandover,
    Record,
    daemon_alive,
    fork_children,
)
from uffdd.kernel.proc import kill_proven, kill_senders_in_flight, kill_tree
from uffdd.kernel.unix_listener import bind_listener
from uffdd.log import configure_logging, get_logger
from uffdd.wire.handover import encode_reply

_log = get_logger("uffdd.keeper")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uffdd-keeper")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--generation", required=True)
    parser.add_argument("--resume-deadline", type=float, required=True)
    parser.add_argument("--log-format", default="json")
    inherited = _open_descriptors()
    args = parser.parse_args(argv)
    configure_logging(json=args.log_format == "json")
    if daemon_alive(args.generation):
        return 0  # not a death: the daemon closed the descriptor the twin watched
    generation = Generation(args.state_dir / args.generation, create=False)
    keeper = Keeper(generation, args.resume_deadline, inherited)
    try:
        return keeper.run()
    except BaseException as exc:
        # The keeper is the last holder: whatever went wrong, nothing it holds may be
        # released to read zeros. Kill what it still holds, then fail.
        _log.error("the keeper failed: killing what it holds", error=repr(exc))
        for root in list(keeper.trees):
            keeper.kill(root, f"the uffdd keeper failed ({exc!r}): the process is killed")
        raise
    finally:
        generation.close()


class Keeper:
    def __init__(self, generation: Generation, deadline: float, inherited: set[int]) -> None:
        self.generation = generation
        self.deadline = deadline
        self.inherited = inherited
        """The descriptors the dead daemon left (the keeper's own are not among them)."""
        self.trees: dict[str, list[Record]] = {}

    def run(self) -> int:
        try:
            records = self.generation.records()
        except ValueError as exc:
            # Nothing can be proven: the roots named in whole records are still killed.
            _log.error("journal unreadable", error=str(exc))
            records = []
        for record in records:
            self.trees.setdefault(record.root, []).append(record)
        # A handover in progress may have uffds in flight on its connection, which
        # closing it would release: those stay open until their senders are killed.
        pending = self.generation.pending_handovers()
        self._close_unnamed(
            keep={fd for p in pending for fd in (p.conn, *(r[0] for r in p.received))}
        )
        for handover in pending:
            self._kill_handover(handover)
        for root, members in list(self.trees.items()):
            unproven = [r.proc for r in members if not self.generation.provable(r)]
            if unproven or not any(r.proc == root for r in members):
                self.kill(
                    root,
                    "the uffdd daemon died with no journal of the uffd of "
                    f"{', '.join(unproven) or root}: what it read is not known, so the "
                    "process cannot be served right",
                )
        if not self.trees:
            _log.info("nothing to keep")
            self.generation.discard()
            return 0
        _log.warning(
            "the daemon died: holding its processes for a daemon to resume them",
            trees=sorted(self.trees),
            deadline_s=self.deadline,
        )
        if self._wait_for_daemon():
            self.generation.discard()
            return 0
        reason = (
            f"the uffdd daemon died and no daemon resumed within {self.deadline:g} s: "
            "the process is killed rather than left reading wrong memory"
        )
        for root in list(self.trees):
            self.kill(root, reason)
        self.generation.discard()
        return 0

    def _kill_handover(self, pending: PendingHandover) -> None:
        reason = (
            "the uffdd daemon died while the restore was being handed over: it cannot be resumed"
        )
        for root, members in list(self.trees.items()):
            if any(r.handover_id == pending.name for r in members):
                self.kill(root, reason)
        senders = kill_senders_in_flight(pending.conn)
        for _, pid, started in pending.received:
            if kill_proven(pid, started):
                senders.append(pid)
        for fd in (pending.conn, *(r[0] for r in pending.received)):
            with contextlib.suppress(OSError):
                os.close(fd)
        if senders:
            _log.error(
                "killed restore tree",
                proc=pending.name,
                restorer=pending.pid,
                killed=senders,
                reason=reason,
            )
        self.generation.end_handover(pending.name)

    def _held(self) -> list[int]:
        """Every descriptor the journal names: the records', and the uffds of fork
        children in batches a resuming daemon will replay."""
        held = []
        for members in self.trees.values():
            for record in members:
                held.extend(record.descriptors())
                held.extend(fork_children(self.generation.pending(record)))
        return held

    def _close_unnamed(self, keep: set[int]) -> None:
        keep = {0, 1, 2, *self._held(), *keep}
        for fd in sorted(self.inherited):
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def kill(self, root: str, reason: str) -> None:
        members = self.trees.pop(root)
        for record in members:  # first: a restorer that is not the process hears it
            if record.conn >= 0:
                tell_restorer(record.conn, reason)
        for record in members:
            if record.proc == root and record.pidfd >= 0:
                kill_tree(record.pid, record.pidfd)
        _log.error("killed restore tree", proc=root, reason=reason)
        for record in members:
            for fd in [*record.descriptors(), *fork_children(self.generation.pending(record))]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.generation.remove(record.proc)

    def _wait_for_daemon(self) -> bool:
        """Hand everything to the first daemon that takes it back in time."""
        sock, _, _ = bind_listener(self.generation.keeper_address, socket.SOCK_SEQPACKET)
        sock.setblocking(True)
        end = time.monotonic() + self.deadline
        try:
            while (left := end - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                conn, _ = sock.accept()
                with conn:
                    if not _trusted(conn):
                        continue
                    conn.settimeout(max(end - time.monotonic(), 1.0))
                    try:
                        send_all(conn, self._held())
                    except OSError as exc:
                        _log.info("a resuming daemon went away", error=str(exc))
                        continue
                    if wait_taken(conn):
                        _log.info("a daemon took the processes back", trees=sorted(self.trees))
                        return True
            return False
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                self.generation.keeper_socket.unlink()


def _open_descriptors() -> set[int]:
    """The descriptors open now (not the one that listing them opened for a moment)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(int(name), fcntl.F_GETFD)
            found.add(int(name))
    return found


def _trusted(conn: socket.socket) -> bool:
    """Only root or the keeper's own uid may take uffds."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    uid = int.from_bytes(creds[4:8], sys.byteorder)
    return uid in (0, os.geteuid())


def tell_restorer(conn: int, reason: str) -> None:
    """Send a native restorer ``Failed(reason)`` on its connection (best effort)."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=conn)
        sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            sock.sendall(encode_reply(Failed(reason)))
        sock.detach()
