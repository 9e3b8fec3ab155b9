"""A state directory hands a resuming daemon only the journals of daemons that died.

Why: two daemons started on one state directory (a mistake, or a restart racing the old
daemon's exit) must never take, or discard, each other's journal.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from uffdd.keeper.journal import StateDir


def test_a_running_daemons_journal_is_not_offered_for_resume(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    alive = state.new_generation()  # named for this process, which runs
    dead = state.path / "gen-999999999-1"  # no such process
    shutil.copytree(alive.path, dead)
    try:
        offered = [g.name for g in state.generations()]
        assert offered == [dead.name]
        assert alive.name.startswith(f"gen-{os.getpid()}-")
    finally:
        for generation in state.generations():
            generation.close()
        alive.discard()
