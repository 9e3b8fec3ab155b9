"""``kernel/ownership.py`` against real processes: kcmp, smaps flags, pidfds.

A child process makes or receives uffds and registers its own memory; the test process
asks whether the child holds a uffd and has the ranges registered. Nothing here touches
registered memory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from uffdd.core.addresses import PAGE_SIZE
from uffdd.kernel.ownership import (
    Unproven,
    first_uncovered,
    holds_file,
    pidfd_alive,
    prove_owner,
    read_vmas,
    same_file,
)
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.restorer import map_anonymous, unmap

pytestmark = pytest.mark.timeout(60)

P = PAGE_SIZE
WAIT = 15.0
HIGH = 0x3D0000000000
"""Where the child registers its memory: far from anything a Python process maps, so
this process can map the same addresses too."""

HOLDER = r"""
import json, socket, sys
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.restorer import map_anonymous

link = socket.socket(fileno=int(sys.argv[1]))
registered = map_anonymous(8 * 4096, address=int(sys.argv[2]))
plain = map_anonymous(8 * 4096)
uffd = Uffd.create(nonblocking=True)
uffd.api(Feature.EVENT_REMOVE)
uffd.register(registered, 4 * 4096, RegisterMode.MISSING)  # the first half only
socket.send_fds(link, [b"uffd"], [uffd.fd])
print(json.dumps({"registered": registered, "plain": plain}), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder() -> Iterator[tuple[subprocess.Popen[str], Uffd, dict[str, Any]]]:
    """A child that registered 4 of 8 mapped pages with a uffd it keeps and sent us."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(theirs.fileno()), str(HIGH)],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        ours.settimeout(WAIT)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        assert child.stdout is not None
        said = json.loads(child.stdout.readline())
        with Uffd(fds[0]) as uffd:
            yield child, uffd, said
    finally:
        ours.close()
        child.kill()
        child.communicate(timeout=WAIT)


def test_kcmp_tells_one_open_file_from_another() -> None:
    with Uffd.create() as first, Uffd.create() as second:
        me = os.getpid()
        duplicate = os.dup(first.fd)
        try:
            assert same_file(me, first.fd, me, duplicate)
            assert not same_file(me, first.fd, me, second.fd)
        finally:
            os.close(duplicate)


def test_a_child_holding_our_uffd_with_its_ranges_registered_is_proven(
    holder: tuple[subprocess.Popen[str], Uffd, dict[str, Any]],
) -> None:
    child, uffd, said = holder
    pidfd = os.pidfd_open(child.pid)
    try:
        assert holds_file(child.pid, uffd.fd)
        assert prove_owner(pidfd, child.pid, uffd.fd, [(said["registered"], 4 * P)]) is None
        half = prove_owner(pidfd, child.pid, uffd.fd, [(said["registered"], 8 * P)])
        assert half is not None
        assert half.unproven is Unproven.NOT_REGISTERED
        plain = prove_owner(pidfd, child.pid, uffd.fd, [(said["plain"], P)])
        assert plain is not None
        assert plain.unproven is Unproven.NOT_REGISTERED
        with Uffd.create() as other:  # registered ranges, but not this uffd's holder
            other_fd = prove_owner(pidfd, child.pid, other.fd, [(said["registered"], P)])
            assert other_fd is not None
            assert other_fd.unproven is Unproven.NOT_HELD
            assert f"pid {child.pid} holds no descriptor" in other_fd.reason
        unmapped = prove_owner(pidfd, child.pid, uffd.fd, [(P, P)])  # below mmap_min_addr
        assert unmapped is not None
        assert unmapped.unproven is Unproven.NOT_MAPPED
    finally:
        os.close(pidfd)


def test_the_process_holding_a_uffd_is_not_the_process_it_registered(
    holder: tuple[subprocess.Popen[str], Uffd, dict[str, Any]],
) -> None:
    """We hold the child's uffd now, but our memory at those addresses is not its."""
    _, uffd, said = holder
    ours = map_anonymous(4 * P, address=said["registered"])
    pidfd = os.pidfd_open(os.getpid())
    try:
        disproof = prove_owner(pidfd, os.getpid(), uffd.fd, [(ours, 4 * P)])
        assert disproof is not None
        assert disproof.unproven is Unproven.NOT_REGISTERED
    finally:
        os.close(pidfd)
        unmap(ours, 4 * P)


def test_a_process_that_exited_is_never_proven() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait(WAIT)
        assert not pidfd_alive(pidfd)
        with Uffd.create() as uffd:
            disproof = prove_owner(pidfd, child.pid, uffd.fd, [(P, P)])
        assert disproof is not None
        assert disproof.unproven is Unproven.GONE
    finally:
        os.close(pidfd)


def test_smaps_flags_and_coverage() -> None:
    address = map_anonymous(4 * P)
    try:
        with Uffd.create() as uffd:
            uffd.api(Feature(0))
            uffd.register(address + P, 2 * P, RegisterMode.MISSING)
            vmas = {v.start: v for v in read_vmas(os.getpid())}
            assert "um" in vmas[address + P].flags
            assert vmas[address + P].end == address + 3 * P
            assert "um" not in vmas[address].flags
    finally:
        unmap(address, 4 * P)
    spans = [(0, 10), (10, 20), (30, 40)]
    assert first_uncovered(spans, [(5, 10), (30, 10)]) is None  # adjacent spans join
    assert first_uncovered(spans, [(5, 10), (15, 10), (0, 1)]) == (15, 10)
    assert first_uncovered(spans, [(40, 1)]) == (40, 1)
    assert first_uncovered([], [(0, 1)]) == (0, 1)
