"""The long-running daemon takes CRIU restores too: ``serve_criu_restores`` as a door.

Two dumps, two ``lazy-pages.socket`` doors on one daemon (running in this test's loop;
the trees are other processes), both trees restored at the same time, every page
checked; a malformed restore on one door kills only its own tasks, and the daemon
carries on serving the other.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from support.criu_restorer import TIMEOUT, Restorer, Tree, task_spec, write_dump

from uffdd.config import DaemonConfig
from uffdd.daemon.doors.criu import (
    LAZY_PAGES_SOCKET,
    bind_lazy_pages_socket,
    serve_criu_restores,
)
from uffdd.daemon.lifecycle import Daemon

pytestmark = pytest.mark.timeout(180)


def _specs() -> list[dict[str, Any]]:
    return [task_spec(0, None, script="ops"), task_spec(1, 0, script="check")]


def _connect(work: Path) -> Restorer:
    """criu restore's connection (the door's socket is listening before the daemon runs)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(work / LAZY_PAGES_SOCKET))
    except BaseException:
        sock.close()
        raise
    return Restorer(sock)


def _restore(tree: Tree, work: Path) -> list[dict[str, Any]]:
    """criu restore's part, run in a thread: hand over, RSTF after the ops, reports."""
    restorer = _connect(work)
    restorer.hand_over(tree)
    tree.wait_reports("ops_done", 1)
    restorer.finish()
    return tree.wait_reports("verified", 2) + tree.wait_reports("forked", 1)


def _break(tree: Tree, work: Path) -> None:
    restorer = _connect(work)
    restorer.send_task(tree.pids[0], tree.uffds[0], tree.real_pids[0])
    restorer.send_pid(tree.pids[1], tree.real_pids[1])  # and no uffd after it
    restorer.sock.close()
    tree.close_uffds()


def test_two_criu_restores_through_one_daemon(tmp_path: Path) -> None:
    with (
        Tree.start(_specs(), tmp_path / "a.json") as first,
        Tree.start([task_spec(5, None), task_spec(6, 0)], tmp_path / "b.json") as broken,
    ):
        write_dump(tmp_path / "a", first)
        write_dump(tmp_path / "b", broken, style="3.x")

        async def main() -> list[dict[str, Any]]:
            daemon = Daemon(DaemonConfig(handover=str(tmp_path / "unused.sock")))
            # bound before the daemon runs: each restorer may connect at once
            door_a = bind_lazy_pages_socket(tmp_path / "a")
            door_b = bind_lazy_pages_socket(tmp_path / "work-b")
            doors = [
                lambda d: serve_criu_restores(d, tmp_path / "a", listener=door_a),
                lambda d: serve_criu_restores(
                    d, tmp_path / "b", tmp_path / "work-b", listener=door_b
                ),
            ]
            running = asyncio.create_task(daemon.run(doors))
            try:
                await asyncio.to_thread(_break, broken, tmp_path / "work-b")
                status = await asyncio.to_thread(broken.proc.wait, TIMEOUT)
                assert status == -signal.SIGKILL
                return await asyncio.to_thread(_restore, first, tmp_path / "a")
            finally:
                daemon.stop()
                await running

        reports = asyncio.run(asyncio.wait_for(main(), 150))
        assert len(reports) == 3
        for report in reports:
            assert report["ok"], report
        assert first.close() == 0
        assert not (tmp_path / "a" / LAZY_PAGES_SOCKET).exists()
