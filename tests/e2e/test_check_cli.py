"""`uffdd check` through the installed console script, on this host and a degraded one;
`uffdd check` and `--help` without the weight of the components they do not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

UFFDD = str(Path(sys.executable).with_name("uffdd"))


def _check(*prefix: str) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [*prefix, UFFDD, "check", "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode, json.loads(result.stdout), result.stderr


@pytest.mark.timeout(60)
def test_this_host_is_usable_with_every_feature() -> None:
    code, report, stderr = _check()
    assert code == 0, stderr
    assert report["usable"] is True
    assert report["api"] == 0xAA
    granted = [name for name, state in report["features"].items() if state["granted"]]
    assert len(granted) == 17, granted
    assert "COPY" in report["registration"]["anon"]["missing"]["ioctls"]
    assert "CONTINUE" in report["registration"]["shmem"]["minor"]["ioctls"]


@pytest.mark.timeout(60)
def test_human_report_names_every_feature() -> None:
    result = subprocess.run(
        [UFFDD, "check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "features granted       17 of 17" in result.stdout
    assert "verdict: this host is usable for uffdd" in result.stdout


@pytest.mark.timeout(60)
def test_without_cap_sys_ptrace_event_fork_is_missing_and_exit_is_nonzero() -> None:
    # Root without CAP_SYS_PTRACE: the kernel still offers EVENT_FORK, but this
    # process may not enable it, so restored process trees cannot be followed.
    code, report, stderr = _check("setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace")
    assert code == 1
    assert report["usable"] is False
    assert any("EVENT_FORK" in problem for problem in report["problems"]), report["problems"]
    assert report["features"]["EVENT_FORK"] == {"granted": True, "usable_here": False}
    assert "EVENT_FORK" in stderr


# Runs the command in-process, then reports every module it imported (stderr, last line).
_MODULES_AFTER = """
import json, sys
from uffdd.cli import main
try:
    main(sys.argv[1:], prog_name="uffdd")
except SystemExit:
    pass
sys.stderr.write("\\n" + json.dumps(sorted(sys.modules)))
"""
HEAVY = ("grpc", "google.protobuf", "uffdd.v1", "uffdd.daemon", "uffdd.pageserver")


def _imported_by(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    modules: list[str] = json.loads(result.stderr.splitlines()[-1])
    return set(modules)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["--help"], ["daemon", "--help"], ["page-server", "--help"]])
def test_help_imports_no_component(args: list[str]) -> None:
    modules = _imported_by(*args)
    assert "uffdd.cli" in modules
    loaded = sorted(m for m in modules if m.startswith((*HEAVY, "_cffi_backend", "structlog")))
    assert loaded == []


@pytest.mark.timeout(60)
def test_check_imports_no_grpc_or_protobuf() -> None:
    modules = _imported_by("check", "--json")
    assert "uffdd.check" in modules
    assert sorted(m for m in modules if m.startswith(HEAVY)) == []
