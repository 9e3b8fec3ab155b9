"""`uffdd daemon --firecracker SOCKET=IMAGE`: spec parsing and set-up errors.

Why unit tests: a bad spec must fail the daemon's start with a message naming it,
and leave no socket behind.
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from uffdd.config import DaemonConfig
from uffdd.core.errors import ConfigError
from uffdd.daemon.doors.firecracker.backing import RemoteImage
from uffdd.daemon.doors.firecracker.doors import firecracker_doors, parse_spec
from uffdd.daemon.doors.firecracker.endpoint import FirecrackerSocket

pytestmark = pytest.mark.timeout(30)


def test_parse_spec() -> None:
    assert parse_spec("/run/uffdd/fc.sock=vm1") == (Path("/run/uffdd/fc.sock"), "vm1")
    assert parse_spec("fc.sock=/images/vm1") == (Path("fc.sock"), "/images/vm1")


@pytest.mark.parametrize("text", ["fc.sock", "=vm1", "fc.sock=", ""])
def test_malformed_specs(text: str) -> None:
    with pytest.raises(ConfigError, match="expected SOCKET=IMAGE_ID or SOCKET=IMAGE_DIR"):
        parse_spec(text)


def test_an_image_id_needs_a_page_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --page-server"):
        firecracker_doors([f"{tmp_path}/fc.sock=vm1"], DaemonConfig())
    assert not (tmp_path / "fc.sock").exists()


def test_binds_each_socket_and_cleans_up_on_a_later_failure(tmp_path: Path) -> None:
    config = DaemonConfig(page_server="unix:/nowhere")
    made = firecracker_doors([f"{tmp_path}/a.sock=vm1"], config)
    try:
        assert (tmp_path / "a.sock").exists()
        assert isinstance(made.backings[0], RemoteImage)
        assert len(made.doors) == 1
    finally:
        made.close()
    assert not (tmp_path / "a.sock").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        firecracker_doors([f"{tmp_path}/b.sock=vm1", f"{tmp_path}/file=vm2"], config)
    assert not (tmp_path / "b.sock").exists()


def test_a_missing_image_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        firecracker_doors([f"{tmp_path}/fc.sock={tmp_path}/no-image"], DaemonConfig())


def test_a_stale_firecracker_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "fc.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: a handler that died
    listening = FirecrackerSocket.bind(path, mode=0o660)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with pytest.raises(ConfigError, match="another process is listening"):
            FirecrackerSocket.bind(path)
    finally:
        listening.close()
    assert not path.exists()
