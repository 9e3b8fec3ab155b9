"""What the C's build needs from the system, and what it says when it is missing.

Why: the threads checksum with XXH3 compiled in from xxHash's header; a machine without
it must get a message naming the package to install, not a compiler's error deep in a
pip log. The check is run against a copy of the system's include directory that lacks
the header.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from uffdd.native import build

SYSTEM_INCLUDE = Path("/usr/include")


def _ask(*option: str) -> str:
    done = subprocess.run([*build.compiler(), *option], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_header_is_found_here() -> None:
    build.require_xxhash()


def test_a_machine_without_xxhash_h_is_told_to_install_libxxhash_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    include = tmp_path / "include"
    include.mkdir()
    for entry in SYSTEM_INCLUDE.iterdir():
        if not entry.name.startswith("xxh"):
            (include / entry.name).symlink_to(entry)
    compiler_include = _ask("-print-file-name=include")
    multiarch = include / _ask("-print-multiarch")
    cc = [*build.compiler(), "-nostdinc", "-isystem", compiler_include]
    cc += ["-isystem", str(multiarch), "-isystem", str(include)]
    monkeypatch.setenv("CC", shlex.join(cc))
    with pytest.raises(RuntimeError, match="install libxxhash-dev") as refused:
        build.require_xxhash()
    assert "xxhash.h" in str(refused.value)
