"""sd_notify and socket activation against a real datagram socket and real fds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from uffdd import systemd


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready("up") is False


def test_ready_and_status_reach_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.ready("serving 0 processes")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 0 processes"
        assert systemd.watchdog_ping()
        assert receiver.recv(4096) == b"WATCHDOG=1"


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"uffdd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.stopping()
        assert receiver.recv(4096) == b"STOPPING=1"


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


def test_listen_fds_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_names_the_passed_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Put two real sockets at fds 3 and 4 as systemd would, saving what was there.
    saved = {fd: os.dup(fd) for fd in (3, 4) if _is_open(fd)}
    first, second = socket.socketpair()
    try:
        os.dup2(first.fileno(), 3)
        os.dup2(second.fileno(), 4)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "2")
        monkeypatch.setenv("LISTEN_FDNAMES", "handover:pages")
        passed = systemd.listen_fds()
        assert passed == [systemd.ListenFd(3, "handover"), systemd.ListenFd(4, "pages")]
        assert not os.get_inheritable(3)
    finally:
        for fd in (3, 4):
            if fd in saved:
                os.dup2(saved.pop(fd), fd)
            else:
                os.close(fd)
        for leftover in saved.values():
            os.close(leftover)
        first.close()
        second.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
