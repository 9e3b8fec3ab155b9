"""Settings: precedence, the engine table, and a clear error naming every bad value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from uffdd.config import (
    ENGINE_ENV,
    DaemonConfig,
    Engine,
    FirecrackerConfig,
    PageServerConfig,
    build,
    build_engine,
    engine_pairs,
    format_size,
    load_toml,
    parse_size,
)
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


def test_tuning_values() -> None:
    config = build(load_toml("[daemon]\nfault_around = 131072\n"), {})
    assert config.fault_around == 128 << 10
    with pytest.raises(ConfigError, match="bulk_max must be a power of two"):
        build({}, {"bulk_max": 3 << 20})


def test_engine_switches_from_the_file_then_the_pairs() -> None:
    text = "[daemon]\ngrace = 5\n[engine]\nsweep = false\ninstall_thread = false\n"
    config = build(load_toml(text), {})
    assert config.engine.sweep is False
    assert config.engine.install_thread is False
    assert config.engine.demand_lane is True
    assert build({}, {}).engine == Engine()
    assert build(load_toml(text), {}, ["install_thread=on"]).engine.install_thread is True
    with pytest.raises(ConfigError, match=r"\[engine\] sweep: expected true or false"):
        build(load_toml('[engine]\nsweep = "no"\n'), {})
    with pytest.raises(ConfigError, match=r"unknown engine knob\(s\) sweeep"):
        load_toml("[engine]\nsweeep = false\n")
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) sweep"):
        load_toml("[daemon]\nsweep = false\n")  # a switch is not a user setting


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], Engine()),
        (["sweep=off"], Engine(sweep=False)),
        (["sweep=off", "sweep=on"], Engine()),  # the last one wins
        (
            ["urgent-thread=0", "bulk_worker=no", "bulk_nice=5"],
            Engine(urgent_thread=False, bulk_worker=False, bulk_nice=5),
        ),
        ([" fast_lane = false "], Engine(fast_lane=False)),
    ],
)
def test_engine_pairs_parse(pairs: list[str], expected: Engine) -> None:
    assert build_engine(None, pairs) == expected


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("sweep", "'sweep' is not NAME=VALUE"),
        ("=on", "'=on' is not NAME=VALUE"),
        ("sweeep=off", "unknown knob sweeep; known: sweep, install_thread"),
        ("sweep=maybe", "expected on or off, got 'maybe'"),
        ("bulk_nice=high", "expected an integer, got 'high'"),
        ("bulk_nice=20", "bulk_nice must be 0 to 19"),
    ],
)
def test_engine_pairs_are_rejected_with_a_reason(pair: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_engine(None, [pair])


def test_engine_environment_comes_before_the_flags() -> None:
    environ = {ENGINE_ENV: "sweep=off, demand_lane=off,"}
    assert engine_pairs(environ, ["sweep=on"]) == ["sweep=off", "demand_lane=off", "sweep=on"]
    assert engine_pairs({}, []) == []
    assert build_engine(None, engine_pairs(environ, ["sweep=on"])) == Engine(demand_lane=False)


def test_daemon_locations_from_the_file() -> None:
    text = (
        '[daemon]\ncriu_images = "/dumps/one"\n'
        'firecracker = ["/run/fc.sock=vm1", "/run/fc2.sock=/images/vm2"]\n'
    )
    config = build(load_toml(text), {"firecracker": ("/run/other.sock=vm3",)})
    assert config.criu_images == "/dumps/one"
    assert config.firecracker == ("/run/other.sock=vm3",)
    with pytest.raises(ConfigError, match="setting firecracker: expected a list of SOCKET"):
        build(load_toml("[daemon]\nfirecracker = [1]\n"), {})


def test_command_configs_check_their_combinations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        PageServerConfig(tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="at least one address"):
        PageServerConfig(tmp_path, listen=())
    with pytest.raises(ConfigError, match="exactly one of --mem-file, --image-dir, --image"):
        FirecrackerConfig(tmp_path / "fc.sock")
    with pytest.raises(ConfigError, match="--image and --page-server go together"):
        FirecrackerConfig(tmp_path / "fc.sock", image_id="vm1")
    remote = FirecrackerConfig(
        tmp_path / "fc.sock", DaemonConfig(page_server="unix:/p.sock"), image_id="vm1"
    )
    assert remote.page_size == 4096


@pytest.mark.parametrize(
    ("text", "size"),
    [("64K", 64 << 10), ("4MiB", 4 << 20), ("512", 512), ("1.5G", 3 << 29), ("0x1000", 4096),
     ("2t", 2 << 40), ("0x1b", 27)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "lots", "-4K", "0xzz"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(("size", "text"), [(64 << 10, "64K"), (4 << 20, "4M"), (4097, "4097")])
def test_format_size_reads_back(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size
