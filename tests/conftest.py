"""Session-wide checks and fixtures.

A machine without a working userfaultfd cannot test uffdd: the run fails loudly at the
start (shared/DESIGN.md section 6: a missing userfaultfd is a failure, never a skip).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.workload import WorkloadPool

from uffdd.kernel.uffd import Uffd


def pytest_sessionstart(session: pytest.Session) -> None:
    try:
        with Uffd.create() as uffd:
            uffd.api()
    except Exception as exc:
        pytest.exit(f"userfaultfd does not work here, so nothing can be tested: {exc}", 1)


@pytest.fixture
def workloads() -> Iterator[WorkloadPool]:
    """Start scripted workload processes; all are killed and reaped after the test."""
    with WorkloadPool() as pool:
        yield pool
