"""The `uffdd daemon` command: flags and config file in, a running Daemon out.

Why apart from daemon.py: parsing and error reporting for people (click, exit codes)
stay out of the service's life cycle, which tests drive directly.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from uffdd.config import LOG_FORMATS, build, load_toml
from uffdd.daemon import Daemon
from uffdd.errors import ConfigError
from uffdd.log import LEVELS, configure_logging, get_logger


@click.command("daemon")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="UFFDD_CONFIG",
    help="TOML file with a [daemon] table.",
)
@click.option("--handover", envvar="UFFDD_HANDOVER", help="Native handover socket path.")
@click.option("--handover-mode", help="Socket file mode, octal (default 0600).")
@click.option(
    "--allow-uid",
    "allow_uids",
    type=int,
    multiple=True,
    help="Peer uid allowed to hand over (repeat; default root and our uid).",
)
@click.option(
    "--page-server",
    envvar="UFFDD_PAGE_SERVER",
    help="Default page server: HOST:PORT or unix:/path.",
)
@click.option("--tls-ca", help="CA bundle to verify the page server (enables TLS).")
@click.option("--tls-cert", help="Client certificate for mutual TLS.")
@click.option("--tls-key", help="Key of the client certificate.")
@click.option(
    "--fetch-deadline",
    type=float,
    help="Seconds a page request may take before its process tree is killed.",
)
@click.option("--grace", type=float, help="Seconds SIGTERM waits for restores in progress.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), envvar="UFFDD_LOG_FORMAT")
@click.option("--log-level", type=click.Choice(LEVELS), envvar="UFFDD_LOG_LEVEL")
def daemon(
    config_file: Path | None,
    handover: str | None,
    handover_mode: str | None,
    allow_uids: tuple[int, ...],
    page_server: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    fetch_deadline: float | None,
    grace: float | None,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """Serve handed-over userfaultfds until every process is fully resident."""
    try:
        file_values = {}
        if config_file is not None:
            try:
                text = config_file.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from exc
            file_values = load_toml(text, str(config_file))
        config = build(
            file_values,
            {
                "handover": handover,
                "handover_mode": handover_mode,
                "allowed_uids": allow_uids or None,
                "page_server": page_server,
                "tls_ca": tls_ca,
                "tls_cert": tls_cert,
                "tls_key": tls_key,
                "fetch_deadline": fetch_deadline,
                "grace": grace,
                "log_format": log_format,
                "log_level": log_level,
            },
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    configure_logging(json=config.log_format == "json", level=config.log_level)
    try:
        asyncio.run(Daemon(config).run())
    except ConfigError as exc:
        get_logger("uffdd.daemon").error("cannot start", error=str(exc))
        click.echo(f"uffdd daemon: {exc}", err=True)
        sys.exit(2)
