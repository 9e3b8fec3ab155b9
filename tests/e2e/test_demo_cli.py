"""`uffdd demo` as the README runs it: a real lazy migration on this host, verified.

With the crash switch (``--kill-daemon-at``), 128 MiB keep the restore in flight when
the daemon is killed a second in: the workload is either resumed by a new daemon (every
byte right) or killed with the keeper's reason (and no count of wrong pages anywhere).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

UFFDD = str(Path(sys.executable).with_name("uffdd"))


def _demo(size_mib: int, timeout: float, *extra: str) -> str:
    result = subprocess.run(
        [UFFDD, "demo", "--size-mib", str(size_mib), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(180)
def test_demo_migrates_and_verifies_every_byte() -> None:
    out = _demo(64, 170)
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in out
    assert "resident [" in out
    assert "time to first access" in out
    assert "time to full residency" in out
    assert "fault latency" in out
    assert " 0 wrong" in out
    assert out.rstrip().endswith("result: every byte verified")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_gib_restore_with_fork_remap_remove_verifies_every_byte() -> None:
    out = _demo(1024, 880)
    assert "fork tree, 3 levels, untouched memory" in out
    assert "mremap to a new address" in out
    assert "madvise(DONTNEED) reads zeros" in out
    assert "WRONG" not in out
    assert out.rstrip().endswith("result: every byte verified")


@pytest.mark.timeout(180)
def test_demo_daemon_killed_and_restarted_resumes_with_every_byte_right() -> None:
    out = _demo(128, 170, "--kill-daemon-at", "1", "--restart")
    assert "SIGKILL to the daemon 1 s into the restore" in out
    assert "a new daemon starts on the same state directory" in out
    assert "WRONG" not in out
    assert " 0 wrong" in out
    assert "time to full residency" in out
    assert out.rstrip().endswith("result: every byte verified")


@pytest.mark.timeout(180)
def test_demo_daemon_killed_and_not_restarted_kills_the_workload_with_the_reason() -> None:
    out = _demo(128, 170, "--kill-daemon-at", "1")
    assert "SIGKILL to the daemon 1 s into the restore" in out
    assert "the workload was killed (signal 9)" in out
    assert "reason: the uffdd daemon died" in out
    assert re.search(r"\d+ wrong", out, re.IGNORECASE) is None  # no count of wrong pages
    assert out.rstrip().endswith(
        "result: the workload was killed rather than served from lost memory"
    )
