"""Take back what a daemon that died was serving, and serve it to full residency.

Why a door of its own: it runs once at start, next to the handover doors, and needs
what they know (a native restorer's reply channel) as well as the life cycle. For each
earlier generation of the state directory whose keeper still listens
(``keeper/run.py``), it receives the descriptors, rebuilds every tree from the journal
(``keeper/journal.py``), journals them in this daemon's generation (held by this
daemon's twin from the moment they arrive) and only then lets the old keeper go. A tree
that cannot be proven (a read mark set) or whose page source this daemon cannot reach
is killed with its reason; nothing is served from a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from uffdd.core.events import Fork, ProcId, UffdEvent
from uffdd.core.wire import decode_messages
from uffdd.daemon.doors.native.listener import ReplyChannel, let_go
from uffdd.daemon.lifecycle import Daemon, Reporter, Restore, Resumed, SilentReporter
from uffdd.daemon.sources import LocalImageSource, PageSource
from uffdd.image.criu.reader import CriuImageReader, CriuLayout
from uffdd.keeper import handback
from uffdd.keeper.journal import (
    FD_STORE_PREFIX,
    Generation,
    Record,
    stored_names,
)
from uffdd.keeper.run import tell_restorer
from uffdd.kernel.fdpass import close_fds
from uffdd.kernel.proc import kill_proven, kill_tree
from uffdd.kernel.uffd import Uffd
from uffdd.log import get_logger
from uffdd.systemd import by_name

_log = get_logger("uffdd.daemon.resume")


async def resume_door(daemon: Daemon) -> None:
    """Resume every tree an earlier daemon of this state directory left to its keeper,
    or, when its keeper is gone too, to systemd's fd store."""
    try:
        await _resume_all(daemon)
    finally:
        daemon.resumed.set()


async def _resume_all(daemon: Daemon) -> None:
    assert daemon.journal is not None
    await asyncio.sleep(0)  # every door starts first (and registers its resumer)
    stored = by_name(daemon.passed, FD_STORE_PREFIX)
    used: set[int] = set()
    for old in daemon.state.generations(besides=daemon.journal.name):
        await _keeper_ready(old, daemon.config.resume_deadline)
        try:
            taken = handback.take_back(old.keeper_address)
        except (OSError, ValueError, ConnectionError) as exc:
            _log.error("cannot take back from a keeper", generation=old.name, error=str(exc))
            old.close()
            continue
        claimed: set[int] = set()
        if taken is not None:
            sock, fds = taken
            try:
                await _resume_generation(daemon, old, fds, claimed)
            finally:
                close_fds([fd for fd in fds.values() if fd not in claimed])
                handback.release(sock)
                old.close()
            continue
        # No keeper: it ended (gave up and killed, or handed everything on: then its
        # journal is gone), or it was killed with the daemon (systemd's KillMode): then
        # the fd store holds what the journal names.
        fds = _from_fd_store(old, stored)
        used.update(fds.values())
        try:
            await _resume_generation(daemon, old, fds, claimed)
        finally:
            old.discard()
    close_fds([fd for fds in stored.values() for fd in fds if fd not in used])


async def _keeper_ready(old: Generation, deadline: float) -> None:
    """Give a twin that is becoming the keeper (its daemon just died) time to listen."""
    end = time.monotonic() + deadline
    while not old.keeper_socket.exists() and old.twin_alive() and time.monotonic() < end:
        await asyncio.sleep(0.02)


def _from_fd_store(old: Generation, stored: dict[str, list[int]]) -> dict[int, int]:
    """{old number: descriptor} of ``old``'s records, from the fd store's entries."""
    fds: dict[int, int] = {}
    for record in old.records():
        for name, number in stored_names(record).items():
            if stored.get(name):
                fds[number] = stored[name][0]
    return fds


async def _resume_generation(
    daemon: Daemon, old: Generation, fds: dict[int, int], claimed: set[int]
) -> None:
    """Resume each tree of ``old``; ``claimed`` gets the descriptors they now own."""
    trees: dict[str, list[Record]] = {}
    for record in old.records():
        trees.setdefault(record.root, []).append(record)
    # A handover the dead daemon was still taking (its keeper, had it lived, did this).
    for pending in old.pending_handovers():
        for root_name in [
            r for r, members in trees.items() if any(m.handover_id == pending.name for m in members)
        ]:
            members = trees.pop(root_name)
            _fail(
                members[0].with_descriptors(fds),
                "the daemon died while the restore was being handed over",
            )
        for _, pid, started in pending.received:
            kill_proven(pid, started)
        old.end_handover(pending.name)
    for root_name, members in trees.items():
        members.sort(key=lambda r: r.proc.count("."))  # parents before their children
        root = members[0].with_descriptors(fds)
        if root.proc != root_name or root.uffd < 0:
            _fail(root, "the journal has no root record for this tree")
            continue
        if not all(old.provable(r) for r in members):
            _fail(root, "the uffdd daemon died with no journal of its uffd")
            continue
        missing = [r.proc for r in members if r.uffd not in fds]
        lost = [
            e.child_fd
            for r in members
            for e in decode_messages(old.pending(r))
            if isinstance(e, Fork) and e.child_fd not in fds
        ]
        if missing or lost:
            which = ", ".join(missing) or "a fork child"
            _fail(root, f"uffds lost with the daemon and its keeper ({which})")
            continue
        replay = _replays(old, members, fds)
        try:
            resumed = await _take_over(daemon, root)
        except Exception as exc:
            _fail(root, f"it cannot be served after a restart: {exc}")
            continue
        taken = [(_with_forks(members[0], members).with_descriptors(fds), resumed.uffd)] + [
            (
                _with_forks(r, members).with_descriptors(fds),
                Uffd.adopt(fds[r.uffd], nonblocking=True),
            )
            for r in members[1:]
        ]
        claimed.update(root.descriptors())
        for record, _ in taken:
            claimed.update(record.descriptors())
        for events in replay.values():
            claimed.update(e.child_fd for e in events if isinstance(e, Fork))
        reporter, close_reply = await _reporter(root)
        kept = Uffd(os.dup(resumed.uffd.fd)) if isinstance(reporter, ReplyChannel) else None

        def close(
            resumed: Resumed = resumed,
            close_reply: Callable[[], None] = close_reply,
            reporter: Reporter = reporter,
            kept: Uffd | None = kept,
            root: Record = root,
        ) -> None:
            # A native restorer keeps its copy until it reads Resident: let go first.
            if kept is not None:
                if isinstance(reporter, ReplyChannel) and reporter.resident and root.pidfd >= 0:
                    let_go(kept, root.pid, root.pidfd, root.handover_id)
                kept.close()
            close_reply()
            resumed.close()

        restore = Restore(
            name=root.proc,
            pid=root.pid,
            pidfd=root.pidfd,
            uffd=resumed.uffd,
            image_id=root.image_id,
            regions=[],
            data=list(root.data),
            source=resumed.source,
            reporter=reporter,
            close=close,
            on_done=resumed.on_done,
            dialect=root.dialect,
            origin=root.source,
            conn=root.conn,
            handover_id=root.handover_id,
        )
        daemon.resume(restore, taken[0][0], taken, replay)


def _replays(
    old: Generation, members: list[Record], fds: dict[int, int]
) -> dict[ProcId, list[UffdEvent]]:
    """The layout events each process's checkpoint does not include yet (a batch held
    when the daemon died), fork children's uffds translated. A fork whose child is in
    the journal already (written just before the parent's checkpoint) is not replayed."""
    journaled = {r.uffd for r in members}
    replay: dict[ProcId, list[UffdEvent]] = {}
    for record in members:
        events: list[UffdEvent] = []
        for event in decode_messages(old.pending(record)):
            if not isinstance(event, Fork):
                events.append(event)
            elif event.child_fd not in journaled and event.child_fd in fds:
                events.append(Fork(fds[event.child_fd]))
        if events:
            replay[ProcId(record.proc)] = events
    return replay


def _with_forks(record: Record, members: list[Record]) -> Record:
    """``record`` as this daemon resumes it: with a fork count past every journaled
    child's name (a child written before its parent's checkpoint has a name the
    checkpoint's count does not cover), and handed over: whoever was handing it over
    (CRIU, before its restore-finished marker) lost its connection with the daemon, so
    nothing will ever say more, and the background sweep starts now."""
    prefix = f"{record.proc}."
    named = [
        int(tail)
        for r in members
        if r.proc.startswith(prefix) and (tail := r.proc[len(prefix) :]).isdigit()
    ]
    forks = max([record.checkpoint.forks, *named])
    return replace(record, checkpoint=replace(record.checkpoint, forks=forks, handed_over=True))


async def _take_over(daemon: Daemon, root: Record) -> Resumed:
    """The root's page source and the uffd the executor reads: from its door when the
    door registered a way (Firecracker), else from the journaled page source. ``root``
    names the descriptors taken back (new numbers)."""
    door = next((f"{kind}:{where}" for kind, where in root.source.items()), "")
    resumer = daemon.resumers.get(door)
    if resumer is not None:
        return await resumer(root, Uffd.adopt(root.uffd, nonblocking=True))
    source = await _source(daemon, root)
    uffd = Uffd.adopt(root.uffd, nonblocking=True)

    def close(uffd: Uffd = uffd, pidfd: int = root.pidfd) -> None:
        uffd.close()
        if pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(pidfd)

    return Resumed(source, uffd, close)


async def _source(daemon: Daemon, root: Record) -> PageSource:
    if "page_server" in root.source:
        client = daemon.clients.get(root.source["page_server"])
        await client.image_info(root.image_id, timeout=daemon.config.fetch_deadline)
        return client
    if "criu_images" in root.source:
        images = Path(root.source["criu_images"])
        layout = CriuLayout.load(images, int(root.source["task"]))
        return LocalImageSource(CriuImageReader(images, layout))
    if "images" in root.source:
        if str(daemon.image_store().root) != root.source["images"]:
            raise ValueError(f"this daemon serves images from {daemon.config.images or 'nowhere'}")
        return LocalImageSource(daemon.image_store().open(root.image_id))
    raise ValueError("the journal does not say where its pages come from")


async def _reporter(root: Record) -> tuple[Reporter, Callable[[], None]]:
    """The restorer's reply channel; a restorer not acked yet gets its Ack now."""
    if root.conn < 0:
        return SilentReporter(), lambda: None
    sock = socket.socket(fileno=root.conn)
    sock.setblocking(False)
    channel = ReplyChannel(sock, root.handover_id)
    if root.acked:
        channel.acked = True
    else:
        await channel.send_ack()
    return channel, channel.close


def _fail(root: Record, reason: str) -> None:
    """Kill a tree that cannot be resumed (by its pidfd, taken back), and say why."""
    _log.error("killed restore tree", proc=ProcId(root.proc), reason=reason, by="resume")
    if root.pidfd >= 0:
        kill_tree(root.pid, root.pidfd)
    else:  # its pidfd was lost: only the very process that started then
        kill_proven(root.pid, root.started)
    if root.conn >= 0:
        tell_restorer(root.conn, reason)
