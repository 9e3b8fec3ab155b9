"""The C threads tested on their own, under AddressSanitizer, UndefinedBehaviorSanitizer
and LeakSanitizer.

Why: the Python tests reach the C only through its owners and the daemon; here each
``tests/native/test_*.c`` links the product C (``uffdd/native/csrc/*.c``) and drives one
piece directly (a pthread that faults on this process's own userfaultfd, a fake page
server on a socket pair, an image in memory), asserting on real results. This module
compiles each program with the sanitizers and the product's warning flags and runs it;
a non-zero exit or any sanitizer report fails it. The ``canary_*.c`` programs prove
each sanitizer reports here (a leak, a use after free, an overflowing int).

LeakSanitizer stops the process's threads with ptrace to look for leaks; it works where
the tests run as root (CI's VM). A container without CAP_SYS_PTRACE would need
``detect_leaks=0``, and the leak canary says so by failing. Each program ends itself
with alarm() (``harness.h``) and is bounded by the timeout here as well.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from uffdd.native import build

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

HERE = Path(__file__).resolve().parent
PROGRAMS = sorted(HERE.glob("test_*.c"))
CANARIES = {
    "canary_leak": "LeakSanitizer: detected memory leaks",
    "canary_use_after_free": "AddressSanitizer: heap-use-after-free",
    "canary_undefined": "runtime error: signed integer overflow",
}
SANITIZE = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
    "-pthread",
)
RUN_SECONDS = 120
REPORTS = ("Sanitizer", "runtime error:")
"""What every sanitizer report contains."""


def _compile(output: Path, *sources: Path) -> Path:
    command = [
        *build.compiler(), *SANITIZE, *build.CFLAGS, f"-I{build.CSRC}", f"-I{HERE}",
        "-o", str(output), *map(str, sources),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr}"
    return output


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The product C, compiled once with the sanitizers (two compilers at a time)."""
    where = tmp_path_factory.mktemp("csrc")
    jobs = [
        (source, subprocess.Popen(
            [*build.compiler(), *SANITIZE, *build.CFLAGS, f"-I{build.CSRC}", "-c",
             "-o", str(where / f"{source.stem}.o"), str(source)],
            stderr=subprocess.PIPE, text=True,
        ))
        for source in build.SOURCES
    ]  # fmt: skip
    for source, job in jobs:
        _, errors = job.communicate()
        assert job.returncode == 0, f"{source.name}:\n{errors}"
    return [where / f"{source.stem}.o" for source in build.SOURCES]


def _run(program: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
    return subprocess.run(
        [str(program)], capture_output=True, text=True, env=env, timeout=RUN_SECONDS, check=False
    )


def test_every_c_program_is_found() -> None:
    names = {program.stem for program in PROGRAMS}
    assert {
        "test_answerer",
        "test_common",
        "test_demander",
        "test_fast_serve",
        "test_frames",
        "test_installer",
        "test_receiver",
    } <= names


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_c_program_passes_under_the_sanitizers(
    program: Path, objects: list[Path], tmp_path: Path
) -> None:
    binary = _compile(tmp_path / program.stem, program, *objects)
    done = _run(binary)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert not any(report in output for report in REPORTS), output


@pytest.mark.parametrize("canary", sorted(CANARIES))
def test_each_sanitizer_reports_here(canary: str, tmp_path: Path) -> None:
    binary = _compile(tmp_path / canary, HERE / f"{canary}.c")
    done = _run(binary)
    assert done.returncode != 0, f"{canary} passed: its sanitizer is not working"
    assert CANARIES[canary] in done.stderr, done.stderr
