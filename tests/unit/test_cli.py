"""The command line's contract: defaults and environment variables in ``--help``, the
precedence defaults < file < environment < flags, and the hidden engine table.

The run functions are replaced by recorders, so each command is parsed for real and its
config value checked without starting a daemon or a page server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from uffdd import cli
from uffdd.config import (
    DaemonConfig,
    Engine,
    FirecrackerConfig,
    LazyPagesConfig,
    PageServerConfig,
    defaults_of,
    format_size,
)

pytestmark = pytest.mark.timeout(30)

DAEMON = defaults_of(DaemonConfig)
PAGE_SERVER = defaults_of(PageServerConfig)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each command's config value, in place of running it (and no logging set-up)."""
    import uffdd.daemon.doors.criu  # noqa: PLC0415
    import uffdd.daemon.doors.firecracker.standalone  # noqa: PLC0415
    import uffdd.daemon.run  # noqa: PLC0415
    import uffdd.pageserver.server  # noqa: PLC0415
    from uffdd.daemon.doors.criu import CriuResult  # noqa: PLC0415

    configs: list[Any] = []
    monkeypatch.setattr(cli, "_configure_logging", lambda *_: None)
    monkeypatch.setattr(uffdd.daemon.run, "run_daemon", configs.append)
    monkeypatch.setattr(uffdd.pageserver.server, "run", configs.append)
    monkeypatch.setattr(
        uffdd.daemon.doors.firecracker.standalone,
        "run_firecracker",
        lambda config, resume=None: configs.append(config),
    )

    def lazy_pages(config: LazyPagesConfig, resume: object = None) -> CriuResult:
        configs.append(config)
        return CriuResult(0)

    monkeypatch.setattr(uffdd.daemon.doors.criu, "run_lazy_pages", lazy_pages)
    monkeypatch.setattr("uffdd.image.criu.images.read_pstree", lambda _: None)
    for name in ("UFFDD_ENGINE", "UFFDD_CONFIG", "UFFDD_FAULT_AROUND", "UFFDD_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    return configs


def invoke(command: click.Command, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its output, asserting a clean exit."""
    result = CliRunner().invoke(command, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def refused(command: click.Command, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``command`` expecting a usage error (exit 2); its output."""
    result = CliRunner().invoke(command, list(args), env=env)
    assert result.exit_code == 2, result.output
    return result.output


def help_text(command: click.Command) -> str:
    """``--help`` as a person reads it, joined onto one line (click wraps it)."""
    return " ".join(invoke(command, "--help").split())


# -- --help -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            cli.daemon,
            [
                "--handover PATH Native handover socket path. [env var: UFFDD_HANDOVER; "
                f"default: {DAEMON['handover']}]",
                "[env var: UFFDD_HANDOVER_MODE; default: 0600]",
                "[env var: UFFDD_FETCH_DEADLINE; default: 10.0]",
                "[env var: UFFDD_GRACE; default: 30.0]",
                "[env var: UFFDD_FAULT_AROUND; default: 64K]",
                "[env var: UFFDD_BULK_MAX; default: 4M]",
                "[env var: UFFDD_MAX_INFLIGHT; default: 64M]",
                "[env var: UFFDD_LOG_FORMAT; default: json]",
                "[env var: UFFDD_LOG_LEVEL; default: info]",
                "[env var: UFFDD_PAGE_SERVER; default: (none)]",
                "[env var: UFFDD_IMAGES; default: (none)]",
                "[env var: UFFDD_CONFIG; default: (none)]",
                "[env var: UFFDD_ALLOW_UID; default: (root and our own uid)]",
            ],
        ),
        (
            cli.page_server,
            [
                "[env var: UFFDD_PAGE_SERVER_LISTEN; default: 127.0.0.1:7070]",
                "[env var: UFFDD_PAGE_SERVER_GRACE; default: 10.0; x>=0]",
                f"[env var: UFFDD_PAGE_SERVER_CHUNK_SIZE; default: {PAGE_SERVER['chunk_size']};",
                "[env var: UFFDD_PAGE_SERVER_BULK_CHUNK_SIZE; default: "
                f"{PAGE_SERVER['bulk_chunk_size']};",
                "[env var: UFFDD_PAGE_SERVER_LOG_FORMAT; default: json]",
            ],
        ),
        (
            cli.lazy_pages,
            [
                "[env var: UFFDD_LAZY_PAGES_ADDRESS; default: (none)]",
                "[env var: UFFDD_LAZY_PAGES_FETCH_DEADLINE; default: 10.0; x>=0.001]",
                "[env var: UFFDD_LAZY_PAGES_LOG_FORMAT; default: json]",
            ],
        ),
        (
            cli.firecracker,
            [
                "[env var: UFFDD_FIRECRACKER_SOCKET; required]",
                "[env var: UFFDD_FIRECRACKER_SOCKET_MODE; default: 0600]",
                "[env var: UFFDD_FIRECRACKER_PAGE_SIZE; default: 4K]",
                "[env var: UFFDD_FIRECRACKER_FD_WAIT; default: 2.0]",
                "[env var: UFFDD_FETCH_DEADLINE; default: 10.0]",
                "[env var: UFFDD_LOG_LEVEL; default: info]",
            ],
        ),
        (cli.restore, ["[env var: UFFDD_HANDOVER; default: /run/uffdd/handover.sock]"]),
        (cli.demo, ["[default: 256; 8<=x<=16384]"]),
    ],
    ids=lambda x: x.name if isinstance(x, click.Command) else "",
)
def test_help_shows_defaults_and_environment_variables(
    command: click.Command, expected: list[str]
) -> None:
    text = help_text(command)
    for fragment in expected:
        assert fragment in text
    assert "--engine" not in text


@pytest.mark.parametrize(
    ("command", "without"),
    [
        (cli.daemon, set()),
        (cli.page_server, set()),
        (cli.firecracker, set()),
        (cli.lazy_pages, {"images_dir", "work_dir", "use_page_server", "verbose"}),
    ],
    ids=lambda x: x.name if isinstance(x, click.Command) else "",
)
def test_every_operator_setting_has_an_environment_variable(
    command: click.Command, without: set[str]
) -> None:
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    named = {p.name for p in options if p.envvar and p.show_envvar}
    assert {p.name for p in options} - named == without
    assert all(str(p.envvar).startswith("UFFDD_") for p in options if p.envvar)


def test_daemon_help_defaults_are_the_config_defaults() -> None:
    """One source of truth: what --help shows is what DaemonConfig() holds."""
    text = help_text(cli.daemon)
    assert f"default: {format_size(DaemonConfig().fault_around)}]" in text
    assert f"default: {DaemonConfig().fetch_deadline}]" in text


def test_experiment_switches_are_not_flags() -> None:
    for flag in ("--no-sweep", "--install-thread", "--no-demand-lane"):
        assert "No such option" in refused(cli.daemon, flag)
    for flag in ("--no-urgent-thread", "--bulk-worker", "--bulk-nice", "--no-fast-lane"):
        assert "No such option" in refused(cli.page_server, "--images", ".", flag)


# -- precedence: defaults < file < environment < flags ----------------------------------


def test_daemon_precedence(recorded: list[Any], tmp_path: Path) -> None:
    toml = tmp_path / "uffdd.toml"
    toml.write_text('[daemon]\nfault_around = 131072\nlog_level = "debug"\n')
    env = {"UFFDD_CONFIG": str(toml)}
    invoke(cli.daemon, env=env)
    invoke(cli.daemon, env={**env, "UFFDD_FAULT_AROUND": "256K"})
    invoke(cli.daemon, "--fault-around", "512K", env={**env, "UFFDD_FAULT_AROUND": "256K"})
    invoke(cli.daemon)
    file_only, from_env, from_flag, plain = recorded
    # a flag's default never hides the file's value
    assert (file_only.fault_around, file_only.log_level) == (128 << 10, "debug")
    assert from_env.fault_around == 256 << 10
    assert from_flag.fault_around == 512 << 10
    assert plain == DaemonConfig()


def test_environment_variables_set_values(recorded: list[Any], tmp_path: Path) -> None:
    invoke(
        cli.daemon,
        env={
            "UFFDD_ALLOW_UID": "0 1000",
            "UFFDD_FIRECRACKER": "/run/a.sock=vm1 /run/b.sock=/images/vm2",
            "UFFDD_HANDOVER_MODE": "0660",
            "UFFDD_LOG_LEVEL": "warning",
        },
    )
    invoke(
        cli.page_server,
        "--images",
        str(tmp_path),
        env={"UFFDD_PAGE_SERVER_LISTEN": "unix:/run/a.sock 127.0.0.1:0"},
    )
    daemon, page_server = recorded
    assert daemon.allowed_uids == frozenset({0, 1000})
    assert daemon.firecracker == ("/run/a.sock=vm1", "/run/b.sock=/images/vm2")
    assert (daemon.handover_mode, daemon.log_level) == (0o660, "warning")
    assert page_server.listen == ("unix:/run/a.sock", "127.0.0.1:0")


def test_lazy_pages_address_from_the_environment_needs_the_flag(
    recorded: list[Any], tmp_path: Path
) -> None:
    env = {"UFFDD_LAZY_PAGES_ADDRESS": "unix:/run/pages.sock"}
    invoke(cli.lazy_pages, "-D", str(tmp_path), env=env)
    invoke(cli.lazy_pages, "-D", str(tmp_path), "--page-server", env=env)
    assert "need --page-server" in refused(cli.lazy_pages, "-D", str(tmp_path), "--port", "1")
    local, remote = recorded
    assert local.daemon.page_server == ""  # the variable alone changes nothing
    assert remote.daemon.page_server == "unix:/run/pages.sock"
    assert remote.work_dir == tmp_path


# -- the engine table -------------------------------------------------------------------


def test_engine_from_environment_and_flags(recorded: list[Any], tmp_path: Path) -> None:
    env = {"UFFDD_ENGINE": "sweep=off,urgent_thread=off"}
    invoke(cli.daemon, env=env)
    invoke(cli.daemon, "--engine", "sweep=on", "--engine", "demand_lane=off", env=env)
    invoke(cli.page_server, "--images", str(tmp_path), "--engine", "bulk_nice=3", env=env)
    invoke(
        cli.firecracker,
        "--socket", str(tmp_path / "fc.sock"), "--image-dir", str(tmp_path),
        "--engine", "install_thread=off",
    )  # fmt: skip
    daemon_env, daemon_flags, page_server, firecracker = recorded
    assert daemon_env.engine == Engine(sweep=False, urgent_thread=False)
    assert daemon_flags.engine == Engine(demand_lane=False, urgent_thread=False)
    assert isinstance(page_server, PageServerConfig)
    assert page_server.engine == Engine(sweep=False, urgent_thread=False, bulk_nice=3)
    assert isinstance(firecracker, FirecrackerConfig)
    assert firecracker.daemon.engine == Engine(install_thread=False)


def test_engine_from_the_config_file_under_the_environment(
    recorded: list[Any], tmp_path: Path
) -> None:
    toml = tmp_path / "uffdd.toml"
    toml.write_text("[engine]\nsweep = false\ninstall_thread = false\n")
    invoke(cli.daemon, "--config", str(toml), env={"UFFDD_ENGINE": "install_thread=on"})
    (config,) = recorded
    assert config.engine == Engine(sweep=False)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--engine", "sweeep=off"], {}, "unknown knob sweeep"),
        (["--engine", "sweep"], {}, "'sweep' is not NAME=VALUE"),
        ([], {"UFFDD_ENGINE": "sweep=perhaps"}, "expected on or off, got 'perhaps'"),
        (["--engine", "bulk_nice=99"], {}, "bulk_nice must be 0 to 19"),
    ],
)
def test_bad_engine_knobs_are_usage_errors(
    recorded: list[Any], args: list[str], env: dict[str, str], message: str
) -> None:
    for command, extra in ((cli.daemon, []), (cli.page_server, ["--images", "."])):
        assert message in refused(command, *extra, *args, env=env)
    assert recorded == []
