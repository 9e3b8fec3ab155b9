"""``uffdd lazy-pages`` driven as ``criu restore --lazy-pages`` drives ``criu lazy-pages``.

A real tree (root, child, grandchild, zombie, second child; ``support/criu_tree.py``)
with its dump written from the pattern the tasks check against; the test restorer hands
each task's uffd over in pstree order (the zombie as a negated pid), with forks,
mremaps, DONTNEEDs and munmaps of missing pages before the RSTF marker, and every task
(and every forked child) checks every page. Pages come from the images directory or
through ``uffdd page-server`` on a Unix socket. The malformed handovers must end
``uffdd lazy-pages`` non-zero with the reason, and kill the tasks already handed over.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.criu_restorer import (
    TIMEOUT,
    LazyPages,
    Restorer,
    Tree,
    page_server,
    task_spec,
    tree_spec,
    write_dump,
)

pytestmark = pytest.mark.timeout(180)

TASKS_WITH_OPS = 2  # tasks 0 and 1 fork, remap, remove and unmap
CHECKING_TASKS = 4  # every task but the zombie checks all of its memory


def _serve_tree(tmp_path: Path, tree: Tree, lazy: LazyPages) -> None:
    """Hand the tree over; RSTF once the ops ran; every check must pass; exit 0."""
    work = tmp_path / "work"
    restorer = Restorer(lazy.connect(work))
    restorer.hand_over(tree)
    tree.wait_reports("ops_done", TASKS_WITH_OPS)
    restorer.finish()
    verified = tree.wait_reports("verified", CHECKING_TASKS)
    forked = tree.wait_reports("forked", TASKS_WITH_OPS)
    for report in verified + forked:
        assert report["ok"], report
        assert report["pages"] > 0
    assert lazy.wait() == 0, lazy.text()
    events = [json.loads(line) for line in lazy.text().splitlines() if line.startswith("{")]
    resident = [e for e in events if e.get("event") == "fully resident"]
    assert len(resident) == CHECKING_TASKS, lazy.text()
    assert any(e.get("event") == "zombie" for e in events)
    assert tree.close() == 0


@pytest.mark.parametrize("style", ["4.x", "3.x"])
def test_tree_restored_from_local_images(tmp_path: Path, style: str) -> None:
    with Tree.start(tree_spec("ops"), tmp_path / "spec.json") as tree:
        images = tmp_path / "images"
        write_dump(images, tree, style="4.x" if style == "4.x" else "3.x")
        lazy = LazyPages.start(images, tmp_path / "work")
        try:
            _serve_tree(tmp_path, tree, lazy)
        finally:
            lazy.close()


def test_tree_restored_through_page_server(tmp_path: Path) -> None:
    images = tmp_path / "images"
    with Tree.start(tree_spec("ops"), tmp_path / "spec.json") as tree:
        write_dump(images, tree, style="3.x")
        lazy: LazyPages | None = None
        with page_server(images, tmp_path) as (target, _):
            # the restore side has the layout images only: pages come from the server
            restore_side = tmp_path / "restore-images"
            restore_side.mkdir()
            for image in images.iterdir():
                if not image.name.startswith("pages-"):
                    (restore_side / image.name).write_bytes(image.read_bytes())
            lazy = LazyPages.start(
                restore_side, tmp_path / "work", "--page-server", "--address", target
            )
            try:
                _serve_tree(tmp_path, tree, lazy)
            finally:
                lazy.close()


def test_page_server_image_missing_is_fatal(tmp_path: Path) -> None:
    """A page server that does not hold the task's image: exit 1, the task killed."""
    specs = [task_spec(0, None)]
    with Tree.start(specs, tmp_path / "spec.json") as tree:
        images = tmp_path / "images"
        write_dump(images, tree)
        empty = tmp_path / "empty"
        empty.mkdir()
        with page_server(empty, tmp_path) as (target, _):
            log_file = tmp_path / "work" / "criu-style.log"
            lazy = LazyPages.start(
                images, tmp_path / "work", "--page-server", "--address", target, "-o", str(log_file)
            )
            try:
                restorer = Restorer(lazy.connect(tmp_path / "work"))
                restorer.hand_over(tree)
                restorer.finish()
                assert lazy.wait() == 1
                assert f"no image 'criu-{tree.pids[0]}'" in log_file.read_text()
                assert lazy.text() == ""  # -o: everything went to the log file
                assert tree.proc.wait(TIMEOUT) == -signal.SIGKILL
            finally:
                lazy.close()


# -- malformed handovers -------------------------------------------------------------------


def _malformed(tmp_path: Path, act: str) -> tuple[LazyPages, Tree]:
    specs = [task_spec(0, None), task_spec(1, 0), task_spec(2, 0, zombie=True)]
    tree = Tree.start(specs, tmp_path / "spec.json")
    try:
        write_dump(tmp_path / "images", tree)
        lazy = LazyPages.start(tmp_path / "images", tmp_path / "work")
    except BaseException:
        tree.kill()
        tree.close()
        raise
    try:
        _act(Restorer(lazy.connect(tmp_path / "work")), tree, act)
    except BaseException:
        lazy.close()
        tree.kill()
        tree.close()
        raise
    return lazy, tree


def _act(restorer: Restorer, tree: Tree, act: str) -> None:
    """Break the protocol; uffdd may hang up before the last send (as on criu restore)."""
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _send(restorer, tree, act)
    finally:
        restorer.sock.close()
        tree.close_uffds()


def _send(restorer: Restorer, tree: Tree, act: str) -> None:
    sock = restorer.sock
    pid0, pid1 = tree.pids[0], tree.pids[1]
    uffd0, uffd1 = tree.uffds[0], tree.uffds[1]
    real0, real1 = tree.real_pids[0], tree.real_pids[1]
    if act == "short pid":
        restorer.send_task(pid0, uffd0, real0)
        sock.sendall(b"\x01\x02")
    elif act == "missing fd":
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_pid(pid1, real1)
        restorer.send_zombie(tree.pids[2])
    elif act == "hang-up":
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_task(pid1, uffd1, real1)
        restorer.send_zombie(tree.pids[2])
    elif act == "unknown pid":
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_task(4_000_000, uffd1, real1)
    elif act == "twice":
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_task(pid0, uffd1, real0)
    elif act == "not the sender":  # criu restore itself sends task 1's pid and uffd
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_task(pid1, uffd1, None)
    elif act == "another task's credentials":
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_task(pid1, uffd1, real0)
    elif act == "pid and uffd from two senders":
        restorer.send_task(pid0, uffd0, real0)
        restorer.send_pid(pid1, real1)
        restorer.send(b"\0", real0, [uffd1])


@pytest.mark.parametrize(
    ("act", "reason"),
    [
        ("short pid", "short pid: 2 byte(s)"),
        ("missing fd", "expected its uffd"),
        ("hang-up", "hung up before the restore-finished marker"),
        ("unknown pid", "pid 4000000 is not a task of pstree.img"),
        ("twice", "handed over twice"),
        ("not the sender", "its sender is not that task"),
        ("another task's credentials", "its sender is not that task"),
        ("pid and uffd from two senders", "its pid came from process"),
    ],
)
def test_malformed_handover_fails_and_kills(tmp_path: Path, act: str, reason: str) -> None:
    lazy, tree = _malformed(tmp_path, act)
    try:
        assert lazy.wait() == 1, lazy.text()
        assert reason in lazy.text()
        # task 0 was handed over: it must be killed, not left to read zeros
        assert tree.proc.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        lazy.close()
        tree.kill()
        tree.close()


@contextlib.contextmanager
def _handed_over(tmp_path: Path, script: str) -> Iterator[tuple[Tree, LazyPages, Restorer]]:
    """Two tasks running ``script``, handed over (no marker yet) to ``uffdd lazy-pages``."""
    specs = [task_spec(0, None, script=script), task_spec(1, 0, script=script)]
    with Tree.start(specs, tmp_path / "spec.json") as tree:
        images = tmp_path / "images"
        write_dump(images, tree)
        lazy = LazyPages.start(images, tmp_path / "work")
        try:
            restorer = Restorer(lazy.connect(tmp_path / "work"))
            restorer.hand_over(tree)
            yield tree, lazy, restorer
        finally:
            lazy.close()


def test_task_that_exits_before_resident_exits_3(tmp_path: Path) -> None:
    with _handed_over(tmp_path, "wait") as (tree, lazy, restorer):
        lazy.wait_for_event("serving", 2)  # both tasks taken over
        assert tree.close() == 0  # both tasks leave, nothing touched, no sweep yet
        restorer.finish()
        assert lazy.wait() == 3, lazy.text()
        assert "exited before fully resident" in lazy.text()


def test_task_that_exits_after_being_fully_served_exits_0(tmp_path: Path) -> None:
    """As for ``criu lazy-pages``: tasks that read every page (all of it served, every
    byte checked) and then exit, even before the restore-finished marker, are a success."""
    with _handed_over(tmp_path, "check") as (tree, lazy, restorer):
        for report in tree.wait_reports("verified", 2):
            assert report["ok"], report
            assert report["pages"] > 0
        assert tree.close() == 0
        lazy.wait_for_event("process exited", 2)  # both left before the marker
        restorer.finish()
        assert lazy.wait() == 0, lazy.text()
        assert "exited before fully resident" not in lazy.text()


def test_broken_images_refused_before_listening(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "pstree.img").write_bytes(b"\x19\x43\x56\x54garbage")
    lazy = LazyPages.start(images, tmp_path / "work")
    try:
        assert lazy.wait() == 1
        assert "pstree.img" in lazy.text()
        assert not (tmp_path / "work" / "lazy-pages.socket").exists()
    finally:
        lazy.close()
