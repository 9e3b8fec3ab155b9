"""Daemon settings: precedence, and a clear error naming every bad value."""

from __future__ import annotations

import pytest

from uffdd.config import DaemonConfig, build, load_toml, parse_size
from uffdd.core.errors import ConfigError


def test_defaults_are_valid() -> None:
    config = build({}, {})
    assert config == DaemonConfig()
    assert config.handover == "/run/uffdd/handover.sock"


def test_file_then_overrides() -> None:
    file_values = load_toml(
        '[daemon]\npage_server = "unix:/run/p.sock"\nfetch_deadline = 3\n'
        'allowed_uids = [0, 1000]\nhandover_mode = "0660"\n'
    )
    config = build(file_values, {"fetch_deadline": 5.5, "page_server": None})
    assert config.page_server == "unix:/run/p.sock"
    assert config.fetch_deadline == 5.5
    assert config.allowed_uids == frozenset({0, 1000})
    assert config.handover_mode == 0o660


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon\n", "not valid TOML"),
        ("[other]\nx = 1\n", "unknown table(s) other"),
        ("[daemon]\nfetch_deadlin = 1\n", "unknown setting(s) fetch_deadlin"),
        ('[daemon]\nfetch_deadline = "soon"\n', "setting fetch_deadline: expected a number"),
        ("[daemon]\nallowed_uids = [-1]\n", "setting allowed_uids"),
        ("[daemon]\nmax_inflight_bytes = 1.5\n", "setting max_inflight_bytes: expected an integer"),
        ("[daemon]\ngrace = 0\n", "grace must be positive"),
        ('[daemon]\nlog_format = "xml"\n', "log_format must be one of json, console"),
        ('[daemon]\ntls_cert = "c.pem"\n', "tls_cert and tls_key go together"),
    ],
)
def test_bad_values_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(load_toml(text, "uffdd.toml"), {})


def test_tuning_values_and_switches() -> None:
    text = "[daemon]\nsweep = false\nfault_around = 131072\ninstall_thread = false\n"
    config = build(load_toml(text), {})
    assert config.sweep is False
    assert config.fault_around == 128 << 10
    assert config.install_thread is False
    assert build({}, {}).install_thread is True
    assert build(load_toml(text), {"install_thread": True}).install_thread is True
    with pytest.raises(ConfigError, match="setting sweep: expected true or false"):
        build(load_toml('[daemon]\nsweep = "no"\n'), {})
    with pytest.raises(ConfigError, match="bulk_max must be a power of two"):
        build({}, {"bulk_max": 3 << 20})


@pytest.mark.parametrize(("text", "size"), [("64K", 64 << 10), ("4MiB", 4 << 20), ("512", 512)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size
