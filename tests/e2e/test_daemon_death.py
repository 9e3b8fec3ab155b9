"""The daemon's death never costs a wrong byte: restart resumes, no restart kills.

Each test restores the demo workload (which checks every byte it reads against the
snapshot) through a real page server and daemon, SIGKILLs the daemon mid-restore, and
then either starts a daemon again on the same handover socket and state directory (the
workload must finish with every byte right) or does not (the keeper must kill the
restored process within the resume deadline, with the reason in its log, and nothing
else). A crash point kills the daemon between reading a FORK and journaling the child:
the journal holds what that read consumed, and the next daemon replays it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.lazy_restore import daemon, make_demo_image, page_server, start_restored
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_demo_image(root, "demo")
    return root


def _log_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


def _kills(path: Path) -> list[dict[str, object]]:
    """The keeper's (or a resuming daemon's) kills in a log."""
    return [e for e in _log_events(path) if e["event"] == "killed restore tree"]


def _crash_and_restart(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> list[dict[str, object]]:
    """Restore the demo workload, let the daemon kill itself at crash ``point``, start a
    daemon again on the same socket and state directory: the workload must end with
    every byte right. Returns the second daemon's log."""
    monkeypatch.setenv("UFFDD_CRASH_AT", point)
    with page_server(tmp_path, images, "--bulk-rate-limit", "4M") as (_, target):
        with daemon(tmp_path, target, "--resume-deadline", "30") as first:
            monkeypatch.delenv("UFFDD_CRASH_AT")
            restored = start_restored(tmp_path / "handover.sock", "demo")
            assert first.wait(60) == -signal.SIGKILL
        os.rename(tmp_path / "daemon.log", tmp_path / "first.log")
        with daemon(tmp_path, target):
            code = restored.finish()
            log = _log_events(tmp_path / "daemon.log")
    assert code == 0, restored.events[-3:]
    assert restored.last("done")["mismatches"] == 0
    assert all(p["mismatches"] == 0 for p in restored.events if p["event"] == "phase")
    assert [e["event"] for e in log].count("resumed") == 1
    assert any(e["event"] == "fully resident" for e in log)
    return log


def test_a_restarted_daemon_resumes_mid_sweep_and_every_byte_is_right(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crash_and_restart(images, tmp_path, monkeypatch, "installing:10")


def test_a_fork_read_and_not_yet_journaled_is_replayed_by_the_next_daemon(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon dies between reading a FORK (the child's uffd is in its table) and
    # journaling the child: the held batch is replayed, the child served.
    log = _crash_and_restart(images, tmp_path, monkeypatch, "fork-read")
    (replayed,) = [e for e in log if e["event"] == "replaying held layout events"]
    assert replayed["forks"] == 1


def test_a_death_right_after_a_read_loses_nothing_it_read(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel wrote what the read consumed into the journal's slot: the next daemon
    # replays it, whatever the moment of the death.
    _crash_and_restart(images, tmp_path, monkeypatch, "uffd-read:3")


def test_without_a_restart_the_keeper_kills_the_tree_and_says_why(
    images: Path, tmp_path: Path
) -> None:
    log = tmp_path / "daemon.log"
    with (
        page_server(tmp_path, images, "--bulk-rate-limit", "4M") as (_, target),
        daemon(tmp_path, target, "--resume-deadline", "1") as first,
    ):
        restored = start_restored(tmp_path / "handover.sock", "demo")
        assert restored.read_until("phase") is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        code = restored.finish()
        wait_until(lambda: bool(_kills(log)), "the keeper's kill in the log", timeout=30)
    assert code == -signal.SIGKILL
    assert not any(e["event"] == "done" for e in restored.events)
    assert all(p["mismatches"] == 0 for p in restored.events if p["event"] == "phase")
    (killed,) = _kills(log)
    assert "no daemon resumed within 1 s" in str(killed["reason"])


def test_uffdd_restore_prints_the_reason_when_its_memory_is_killed(
    images: Path, tmp_path: Path
) -> None:
    # `uffdd restore` restores into a child and keeps the line to the daemon itself:
    # the keeper's Failed reaches its stderr though the memory's process was killed.
    log = tmp_path / "daemon.log"
    with (
        page_server(tmp_path, images, "--bulk-rate-limit", "2M") as (_, target),
        daemon(tmp_path, target, "--resume-deadline", "1") as first,
    ):
        restore = subprocess.Popen(
            [sys.executable, "-m", "uffdd", "restore", str(images / "demo"),
             "--handover", str(tmp_path / "handover.sock"), "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(
            lambda: any(e["event"] == "serving" for e in _log_events(log)),
            "the daemon serving the restore",
            timeout=30,
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        out, err = restore.communicate(timeout=60)
    assert restore.returncode == 3, (out, err)
    assert "no daemon resumed within 1 s" in err
    assert out == ""
