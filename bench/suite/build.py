"""Compile the C references (``bench/c/``) with the system's C compiler, at run time.

Why at run time: the references must be built on the machine they are measured on,
with plain ``-O2``, so nobody can suspect a tuned or stale binary. Outputs land in
``bench/build/`` (ignored by git) and are rebuilt when a source is newer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
C_DIR = BENCH / "c"
BUILD_DIR = BENCH / "build"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")


@dataclass(frozen=True)
class Built:
    refhandler: Path
    """The reference fault handler and bulk installer (executable)."""
    remoteref: Path
    """The remote reference: a C page server and a C handler fetching from it."""
    faulter: Path
    """The timing loop the faulting process loads (shared library)."""


def _compile(source: Path, output: Path, *extra: str) -> Path:
    inputs = [source, *C_DIR.glob("*.h")]  # a header edit rebuilds every program
    if output.exists() and output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return output
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc, or $CC) to build the references")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(output.suffix + ".tmp")
    subprocess.run(
        [compiler, *CFLAGS, *extra, "-o", str(temporary), str(source)],
        check=True,
        timeout=120,
    )
    temporary.replace(output)
    return output


def build(build_dir: Path = BUILD_DIR) -> Built:
    """Build (or reuse) the C programs; raises CalledProcessError on a compile error."""
    return Built(
        refhandler=_compile(C_DIR / "refhandler.c", build_dir / "refhandler"),
        remoteref=_compile(C_DIR / "remoteref.c", build_dir / "remoteref", "-pthread"),
        faulter=_compile(C_DIR / "faulter.c", build_dir / "libfaulter.so", "-shared", "-fPIC"),
    )


def build_roundtrip(build_dir: Path = BUILD_DIR) -> Path:
    """Build (or reuse) the round-trip reference of ``bench_page_server.py`` alone.

    Apart from ``build()`` because that benchmark needs none of the other programs.
    """
    return _compile(C_DIR / "roundtrip.c", build_dir / "roundtrip")
