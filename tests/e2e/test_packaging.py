"""The project's promises about itself: units that systemd accepts, CI = the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UFFDD = str(Path(sys.executable).with_name("uffdd"))


@pytest.mark.timeout(60)
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = sorted((ROOT / "systemd").glob("uffdd*"))
    assert {u.name for u in units} == {
        "uffdd.service",
        "uffdd.socket",
        "uffdd-page-server.service",
    }
    for unit in units:
        # The units name the installed binary; point them at this checkout's.
        text = unit.read_text().replace("/usr/local/bin/uffdd", UFFDD)
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if "uffdd" in line]
    assert result.returncode == 0, result.stderr
    assert problems == []


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the quick start has no sh block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one() -> None:
    demo, tests = _quick_start_commands()
    assert demo.endswith("uffdd demo")
    assert tests.endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "`.ci/run` must run the README's test command verbatim"
