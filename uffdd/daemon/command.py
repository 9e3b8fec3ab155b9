"""The `uffdd daemon` command: flags and config file in, a running Daemon out.

Why apart from daemon.py: parsing and error reporting for people (click, exit codes)
stay out of the service's life cycle, which tests drive directly.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from uffdd.cli_options import allow_uids, page_server_tls
from uffdd.config import LOG_FORMATS, build, load_toml, parse_size
from uffdd.core.errors import ConfigError
from uffdd.daemon.doors.criu import serve_criu_restores
from uffdd.daemon.doors.firecracker.doors import firecracker_doors
from uffdd.daemon.doors.native.door import native_door
from uffdd.daemon.lifecycle import Daemon
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
@allow_uids
@click.option(
    "--page-server",
    envvar="UFFDD_PAGE_SERVER",
    help="Default page server: HOST:PORT or unix:/path.",
)
@page_server_tls
@click.option(
    "--fetch-deadline",
    type=float,
    help="Seconds a page request may take before its process tree is killed.",
)
@click.option("--grace", type=float, help="Seconds SIGTERM waits for restores in progress.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), envvar="UFFDD_LOG_FORMAT")
@click.option("--log-level", type=click.Choice(LEVELS), envvar="UFFDD_LOG_LEVEL")
@click.option(
    "--images",
    envvar="UFFDD_IMAGES",
    help="Local image root: handovers naming no page server are served from it.",
)
@click.option("--fault-around", metavar="SIZE", help="Bytes fetched around a fault (64K).")
@click.option("--bulk-max", metavar="SIZE", help="Largest background request (4M).")
@click.option("--max-inflight", metavar="SIZE", help="Bulk bytes in flight per process (64M).")
@click.option(
    "--sweep/--no-sweep",
    default=None,
    help="Stream the rest in the background (default) or serve demand faults only.",
)
@click.option(
    "--install-thread/--no-install-thread",
    default=None,
    help="Install large background chunks on a thread of their own (default) or on "
    "the daemon's loop.",
)
@click.option(
    "--demand-lane/--no-demand-lane",
    default=None,
    help="Read, fetch and install remote demand faults in a C thread on a fast-lane "
    "connection of its own (default), or on the loop through the page client.",
)
@click.option(
    "--criu-images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also take CRIU lazy-pages handovers for this dump (lazy-pages.socket in "
    "--criu-work-dir, default the dump directory); one restore per connection.",
)
@click.option("--criu-work-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--firecracker",
    "firecracker_specs",
    multiple=True,
    metavar="SOCKET=IMAGE",
    help="Also take Firecracker handovers on SOCKET, restoring from IMAGE (an image id "
    "on --page-server, or an image directory). Repeat for more sockets.",
)
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
    images: str | None,
    fault_around: str | None,
    bulk_max: str | None,
    max_inflight: str | None,
    sweep: bool | None,
    install_thread: bool | None,
    demand_lane: bool | None,
    criu_images: Path | None,
    criu_work_dir: Path | None,
    firecracker_specs: tuple[str, ...],
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
                "images": images,
                "fault_around": _size(fault_around, "--fault-around"),
                "bulk_max": _size(bulk_max, "--bulk-max"),
                "max_inflight_bytes": _size(max_inflight, "--max-inflight"),
                "sweep": sweep,
                "install_thread": install_thread,
                "demand_lane": demand_lane,
            },
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    configure_logging(json=config.log_format == "json", level=config.log_level)
    try:
        doors = firecracker_doors(firecracker_specs, config)
        listeners = [native_door(), *doors.doors]
        if criu_images is not None:
            dump, work = criu_images, criu_work_dir
            listeners.append(
                lambda daemon: serve_criu_restores(daemon, dump, work, config.page_server or None)
            )
        try:
            asyncio.run(Daemon(config).run(listeners))
        finally:
            doors.close()
    except ConfigError as exc:
        get_logger("uffdd.daemon.lifecycle").error("cannot start", error=str(exc))
        click.echo(f"uffdd daemon: {exc}", err=True)
        sys.exit(2)


def _size(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from exc
