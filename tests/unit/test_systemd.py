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


def _receive(receiver: socket.socket) -> tuple[bytes, list[int]]:
    message, fds, _flags, _address = socket.recv_fds(receiver, 4096, 16)
    return message, fds


def test_fd_store_sends_the_fds_with_their_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    read_end, write_end = os.pipe()
    memfd = os.memfd_create("stored")
    received: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        try:
            assert systemd.fd_store("uffdd.r1.p42", [write_end, memfd])
            message, received = _receive(receiver)
            assert message == b"FDSTORE=1\nFDNAME=uffdd.r1.p42"
            assert len(received) == 2
            # The same open files, in the order given: the pipe's write end carries
            # bytes to our read end, and the memfd is the same inode.
            os.write(received[0], b"through the store")
            assert os.read(read_end, 64) == b"through the store"
            assert os.fstat(received[1]).st_ino == os.fstat(memfd).st_ino
            # The caller keeps its own fds: the message carried copies.
            os.fstat(write_end)
            assert systemd.fd_store_remove("uffdd.r1.p42")
            assert _receive(receiver) == (b"FDSTOREREMOVE=1\nFDNAME=uffdd.r1.p42", [])
        finally:
            for fd in (read_end, write_end, memfd, *received):
                os.close(fd)


def test_fd_store_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    read_end, write_end = os.pipe()
    try:
        assert systemd.fd_store("kept", [write_end]) is False
        assert systemd.fd_store_remove("kept") is False
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize(
    "name", ["", "a:b", "tab\there", "new\nline", "del\x7f", "x" * 256, "caf\u00e9"]
)
def test_fd_store_refuses_names_systemd_would_not_keep(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert not systemd.valid_fdname(name)
        with pytest.raises(ValueError, match="FDNAME"):
            systemd.fd_store(name, [0])
        with pytest.raises(ValueError, match="FDNAME"):
            systemd.fd_store_remove(name)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)


def test_fd_store_accepts_the_longest_valid_name() -> None:
    assert systemd.valid_fdname("x" * 255)
    assert systemd.valid_fdname("uffdd restore=r1 pid=42 ~!")


def test_fd_store_needs_an_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent")
    with pytest.raises(ValueError, match="at least one fd"):
        systemd.fd_store("empty", [])


def test_fd_store_failure_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nobody listens: the fds were not stored, and the caller must hear it.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    with pytest.raises(FileNotFoundError):
        systemd.fd_store("lost", [0])


def test_by_name_groups_the_passed_fds_keeping_their_order() -> None:
    passed = [
        systemd.ListenFd(3, "handover"),
        systemd.ListenFd(4, "uffdd.r1.p42"),
        systemd.ListenFd(5, "uffdd.r1.p43"),
        systemd.ListenFd(6, "uffdd.r1.p42"),
    ]
    assert systemd.by_name(passed, "uffdd.") == {"uffdd.r1.p42": [4, 6], "uffdd.r1.p43": [5]}
    assert systemd.by_name(passed) == {
        "handover": [3],
        "uffdd.r1.p42": [4, 6],
        "uffdd.r1.p43": [5],
    }
