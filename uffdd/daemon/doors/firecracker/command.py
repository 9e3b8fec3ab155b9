"""`uffdd firecracker`: a daemon whose only front door is Firecracker's UFFD socket.

Why a command of its own: a Firecracker host points ``mem_backend.backend_path`` at a
socket and expects a handler there; this runs the ordinary daemon (executor, page
clients, graceful stop, systemd notify) with just that door and the image the VMs are
restored from: a snapshot memory file (made into an image in a cache directory once),
an image directory, or an image on a page server.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from uffdd.cli_options import allow_uids, page_server_tls
from uffdd.config import LOG_FORMATS, build
from uffdd.core.errors import ConfigError
from uffdd.daemon.doors.firecracker.backing import (
    Backing,
    LocalImage,
    RemoteImage,
    default_cache_dir,
    image_from_memfile,
)
from uffdd.daemon.doors.firecracker.endpoint import FirecrackerSocket
from uffdd.daemon.doors.firecracker.listener import FirecrackerPolicy, firecracker_door
from uffdd.daemon.lifecycle import Daemon
from uffdd.image.command import parse_size
from uffdd.log import LEVELS, configure_logging, get_logger


@click.command("firecracker")
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Socket Firecracker connects to (mem_backend.backend_path).",
)
@click.option("--socket-mode", default="0600", help="Socket file mode, octal.")
@click.option(
    "--mem-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The snapshot's memory file (made into an image under --cache-dir once).",
)
@click.option(
    "--page-size",
    default="4096",
    help="With --mem-file: the VM's page size, 4K or 2M (hugetlbfs-backed guest memory).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --mem-file: where its image is kept (default /var/cache/uffdd/firecracker "
    "for root).",
)
@click.option(
    "--image-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An image directory (e.g. from `uffdd image from-raw`).",
)
@click.option("--image", "image_id", help="Image id on --page-server.")
@click.option("--page-server", help="Page server with --image: HOST:PORT or unix:/path.")
@page_server_tls
@allow_uids
@click.option(
    "--fd-wait",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds a region list may wait for its userfaultfd.",
)
@click.option(
    "--fetch-deadline",
    type=float,
    help="Seconds a page request may take before its VM is killed.",
)
@click.option("--grace", type=float, help="Seconds SIGTERM waits for VMs to become resident.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), envvar="UFFDD_LOG_FORMAT")
@click.option("--log-level", type=click.Choice(LEVELS), envvar="UFFDD_LOG_LEVEL")
def firecracker(
    *,
    socket_path: Path,
    socket_mode: str,
    mem_file: Path | None,
    page_size: str,
    cache_dir: Path | None,
    image_dir: Path | None,
    image_id: str | None,
    page_server: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    allow_uids: tuple[int, ...],
    fd_wait: float,
    fetch_deadline: float | None,
    grace: float | None,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """Serve Firecracker VMs restored with a Uffd memory backend."""
    chosen = [
        name
        for name, value in (
            ("--mem-file", mem_file),
            ("--image-dir", image_dir),
            ("--image", image_id),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --mem-file, --image-dir, --image")
    if (image_id is None) != (page_server is None):
        raise click.UsageError("--image and --page-server go together")
    try:
        mode = int(socket_mode, 8)
        size = parse_size(page_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    try:
        config = build(
            {},
            {
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
    log = get_logger("uffdd.firecracker")
    backing: Backing | None = None
    listening: FirecrackerSocket | None = None
    try:
        if mem_file is not None:
            image = image_from_memfile(mem_file, cache_dir or default_cache_dir(), size)
            log.info("image of the memory file", mem_file=str(mem_file), image=str(image))
            backing = LocalImage(image)
        elif image_dir is not None:
            backing = LocalImage(image_dir)
        else:
            assert image_id is not None
            assert page_server is not None
            backing = RemoteImage(image_id, page_server)
        listening = FirecrackerSocket.bind(socket_path, mode=mode)
        policy = FirecrackerPolicy(fd_wait=fd_wait)
        if config.allowed_uids is not None:
            policy = FirecrackerPolicy(allowed_uids=config.allowed_uids, fd_wait=fd_wait)
        door = firecracker_door(listening, backing, policy)
        asyncio.run(Daemon(config).run([door]))
    except ConfigError as exc:
        log.error("cannot start", error=str(exc))
        click.echo(f"uffdd firecracker: {exc}", err=True)
        sys.exit(2)
    finally:
        if listening is not None:
            listening.close()
        if backing is not None:
            backing.close()


if __name__ == "__main__":
    firecracker()
