"""The daemon SIGKILLed mid-restore on each dialect: resumed with every byte, or killed.

A few seeded scenarios per dialect from the fault runner (``runner.py``), pages from a
rate-limited page server so the daemon dies mid-transfer: one with a restart (the
workload must complete, every byte verified; a tree whose state a crash point made
unprovable is killed with that reason instead) and one without (the whole tree killed,
the reason in the keeper's log).
The seed is random per session unless ``UFFDD_FAULT_SEED`` is set; a failure prints it
with the command that replays the run. ``soak.py`` runs the same scenarios in bulk.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from faults.runner import DIALECTS, FAILED, Assets, Scenario, run_one

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SESSION_SEED = int(os.environ.get("UFFDD_FAULT_SEED", random.SystemRandom().randrange(1 << 31)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return Assets.build(tmp_path_factory.mktemp("fault-assets"))


@pytest.mark.parametrize("restart", [True, False], ids=["restart", "no-restart"])
@pytest.mark.parametrize("dialect", DIALECTS)
def test_daemon_death_costs_no_wrong_byte(
    assets: Assets, tmp_path: Path, dialect: str, restart: bool
) -> None:
    seed = SESSION_SEED + DIALECTS.index(dialect) * 2 + restart
    scenario = Scenario.draw(seed, dialect, restart, source="page-server")
    result = run_one(scenario, assets, tmp_path)
    assert result.wrong == 0, result.line()
    assert result.outcome != FAILED, result.line()  # the runner's rules, per restart
