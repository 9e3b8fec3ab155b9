"""The house's shape, enforced by the suite: import layers, no circles, no C in Python.

Why tests: docs/architecture.md draws the layers (core at the bottom, the CLI at the
top) and says which package may know what; these tests make that drawing true of the
code, so a back-arrow or a circle fails the same run a behaviour regression does. The
C lives in real files (``uffdd/native/csrc/``, compiled with warnings as errors and
tested under sanitizers); a Python string of C would escape both.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "uffdd"
GENERATED = PACKAGE / "v1"
C_MARKERS = ("#include", "#define ", "#ifndef ", "#pragma ", "static int ", "static void ")
"""What C source has and Python code does not."""


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    assert isinstance(contracts, list)
    return contracts


@pytest.mark.timeout(120)
def test_import_contracts_are_kept() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
         "lint_imports_command()"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_part_of_the_package_sits_in_a_layer() -> None:
    """A new top-level module or package must be placed in the layers on purpose."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    assert isinstance(layers, list)
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    parts = {
        f"uffdd.{path.stem if path.suffix == '.py' else path.name}"
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__")
        or (path.is_dir() and (path / "__init__.py").exists() and path != GENERATED)
    }
    assert parts - placed == set()
    assert placed - parts == set()


def test_no_python_file_holds_c_source() -> None:
    holding = {
        str(path.relative_to(ROOT)): [marker for marker in C_MARKERS if marker in text]
        for path in PACKAGE.rglob("*.py")
        if GENERATED not in path.parents
        for text in [path.read_text()]
    }
    assert {path: found for path, found in holding.items() if found} == {}
    assert (PACKAGE / "native" / "csrc" / "uffdd.h").exists()
