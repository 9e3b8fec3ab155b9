"""uffdd's systemd integration under a real systemd 252 (a container booted by nspawn).

- uffdd.service as shipped in systemd/ (only its binary path changed to this
  checkout's): ``uffdd check`` passes as its ExecStartPre, the daemon adopts the
  socket of uffdd.socket and tells systemd READY=1.
- The fd store through uffdd.systemd: a service stores fds by name, is SIGKILLed, is
  started again by Restart=on-failure and gets the same open files back with their
  names (fdstore_probe.py), and what systemd drops on the way.

Each test boots its own container (the cached tree under a tmpfs overlay, about a
second). They need root, systemd-nspawn and debootstrap (Debian's ``systemd-container``
and ``debootstrap``): a missing tool fails with the install line, as a missing
userfaultfd does. The first run builds the tree (about a minute, see nspawn.py).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn import PYTHON, Container, install_shipped_units
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

PROBE = Path(__file__).with_name("fdstore_probe.py")

_names = itertools.count()


SHARED = "/var/lib/probe"
"""Where the test's tmp_path appears inside (outside /tmp: uffdd.service has PrivateTmp)."""


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    """A freshly booted container; the test's tmp_path is bound at SHARED."""
    with Container(f"uffdd-{os.getpid()}-{next(_names)}", binds=[f"{tmp_path}:{SHARED}"]) as booted:
        yield booted


def test_uffdd_service_checks_the_host_and_becomes_ready(container: Container) -> None:
    install_shipped_units(container)
    container.systemctl("start", "uffdd.socket")
    # Type=notify: start returns once the daemon sent READY=1 (or fails).
    done = container.systemctl("start", "uffdd.service", check=False)
    journal = container.journal("uffdd.service")
    assert done.returncode == 0, journal
    assert container.show("uffdd.service", "ActiveState") == "active"
    assert container.show("uffdd.service", "SubState") == "running"
    assert container.show("uffdd.service", "StatusText") == "waiting for handovers"
    # ExecStartPre=uffdd check ran inside, under nspawn's syscall filter and capabilities.
    assert "verdict: this host is usable for uffdd" in journal
    assert "code=exited ; status=0 }" in container.show("uffdd.service", "ExecStartPre")
    assert container.show("uffdd.service", "FileDescriptorStoreMax") == "16384"
    # The daemon serves the socket uffdd.socket made (passed as fd 3, "handover"):
    # systemd holds the same socket.
    daemon = container.show("uffdd.service", "MainPID")
    listening = container.run("readlink", f"/proc/{daemon}/fd/3").stdout.strip()
    assert listening.startswith("socket:[")
    held = container.run(
        "sh",
        "-c",
        'for f in /proc/1/fd/*; do [ "$(readlink $f)" = "$1" ] && echo $f; done; true',
        "-",
        listening,
    ).stdout.split()
    assert held, f"systemd does not hold {listening}: the daemon bound its own socket"


PROBE_UNIT = f"""\
[Unit]
Description=fd store probe

[Service]
Type=notify
NotifyAccess=main
FileDescriptorStoreMax=16
Restart=on-failure
RestartSec=100ms
ExecStart={PYTHON} {PROBE} {SHARED}
"""

PROBE_IN_UFFDD_SERVICE = f"""\
[Service]
ExecStartPre=
ExecStart=
ExecStart={PYTHON} {PROBE} {SHARED}
ReadWritePaths={SHARED}
"""
"""A drop-in that runs the probe as uffdd.service's main process: everything else is
the shipped unit (sandbox, capabilities, NotifyAccess=, FileDescriptorStoreMax=)."""


def install_probe(container: Container, unit: str) -> None:
    if unit == "uffdd.service":
        install_shipped_units(container)
        container.install_unit("uffdd.service.d/probe.conf", PROBE_IN_UFFDD_SERVICE)
    else:
        container.install_unit(unit, PROBE_UNIT)


def _reports(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("unit", ["probe.service", "uffdd.service"])
def test_fd_store_survives_sigkill_and_restart(
    container: Container, tmp_path: Path, unit: str
) -> None:
    os.mkfifo(tmp_path / "fifo")
    fifo = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    report = tmp_path / "report.jsonl"
    try:
        install_probe(container, unit)
        container.systemctl("start", unit)
        (first,) = _reports(report)
        # 10 stored, less "again" (the same open file as "memfd"), "dropme" (removed)
        # and "pidfd-gone" once systemd saw its POLLHUP.
        stored = "8"
        wait_until(
            lambda: container.show(unit, "NFileDescriptorStore") == stored,
            lambda: f"{container.show(unit, 'NFileDescriptorStore')} fds stored",
        )

        container.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", unit)
        wait_until(lambda: len(_reports(report)) == 2, "the probe started again", timeout=60)
        wait_until(
            lambda: container.show(unit, "ActiveState") == "active",
            "the probe is active again",
        )
        second = _reports(report)[1]
        assert second["pid"] != first["pid"]
        # uffdd.socket's fd comes with the stored ones, on both starts, told apart by name.
        sockets = ["handover"] if unit == "uffdd.service" else []
        assert first["sockets"] == second["sockets"] == sockets
        assert container.show(unit, "NRestarts") == "1"
        assert container.show(unit, "Result") == "success"

        assert container.show(unit, "NFileDescriptorStore") == stored

        fds = second["fds"]
        assert isinstance(fds, dict)
        assert sorted(fds) == [
            "fifo",
            "memfd",
            "pair",
            "pidfd-init",
            "pidfd-init-again",
            "uffd",
            "uffd-other",
        ]
        # The same memfd: same inode, and the token the first start wrote.
        (memfd,) = fds["memfd"]
        assert memfd["inode"] == first["memfd_inode"]
        assert memfd["content"] == first["token"]
        # Two fds under one name both come back (in no promised order).
        assert sorted(each["content"] for each in fds["pair"]) == ["first", "second"]
        # The same userfaultfds: initialized, each with the features it was given.
        assert [each["features"] for each in fds["uffd"]] == [first["uffd_features"]]
        assert [each["features"] for each in fds["uffd-other"]] == [first["other_features"]]
        # Two pidfds of one process are two files, and both are kept.
        assert (
            fds["pidfd-init"]
            == fds["pidfd-init-again"]
            == [{"target": "anon_inode:[pidfd]", "pid": 1}]
        )
        # The same pipe: what the second start wrote through the stored write end
        # arrives at the read end this test opened before the first start.
        assert os.read(fifo, 4096) == f"written by {second['pid']} through the stored fd\n".encode()
    finally:
        os.close(fifo)


def test_fd_store_kept_by_restart_and_emptied_by_stop(container: Container, tmp_path: Path) -> None:
    # What operations.md tells operators: `systemctl restart` hands the store to the
    # new process, `systemctl stop` empties it (systemd 252 has no
    # FileDescriptorStorePreserve=).
    os.mkfifo(tmp_path / "fifo")
    fifo = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    report = tmp_path / "report.jsonl"
    try:
        container.install_unit("probe.service", PROBE_UNIT)
        container.systemctl("start", "probe.service")
        wait_until(
            lambda: container.show("probe.service", "NFileDescriptorStore") == "8",
            "the probe's fds stored",
        )
        container.systemctl("restart", "probe.service")
        first, second = _reports(report)
        assert second["pid"] != first["pid"]
        assert "fds" in second, "the restarted probe got nothing back"
        container.systemctl("stop", "probe.service")
        assert container.show("probe.service", "NFileDescriptorStore") == "0"
        container.systemctl("start", "probe.service")
        third = _reports(report)[2]
        assert "fds" not in third, "a stopped unit's store was passed to its next start"
    finally:
        os.close(fifo)
