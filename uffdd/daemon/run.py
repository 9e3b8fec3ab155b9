"""``uffdd daemon``: the configured front doors around one :class:`Daemon`, until SIGTERM.

Why apart from the life cycle: the doors (``doors/``) are built on ``lifecycle.Daemon``,
so choosing which of them a daemon opens (native always; CRIU and Firecracker when
configured) sits above both. Sockets are bound before the daemon runs, so a bad path
or image fails the start with a ConfigError instead of a background task.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from uffdd.config import DaemonConfig
from uffdd.core.errors import ConfigError
from uffdd.daemon.doors.criu import serve_criu_restores
from uffdd.daemon.doors.firecracker.doors import firecracker_doors
from uffdd.daemon.doors.native.door import native_door
from uffdd.daemon.lifecycle import Daemon, Door
from uffdd.daemon.resume import resume_door
from uffdd.log import get_logger

_log = get_logger("uffdd.daemon.lifecycle")


def run_daemon(config: DaemonConfig) -> None:
    """Serve handed-over userfaultfds until stopped; ConfigError (logged) if it cannot
    start."""
    daemon = Daemon(config)
    daemon.prepare()  # before any door is bound
    try:
        doors = firecracker_doors(config.firecracker, config)
        try:
            listeners: list[Door] = [resume_door, native_door(), *doors.doors]
            if config.criu_images:
                listeners.append(_criu_door(config))
            asyncio.run(daemon.run(listeners))
        finally:
            doors.close()
    except ConfigError as exc:
        daemon.abandon()
        _log.error("cannot start", error=str(exc))
        raise


def _criu_door(config: DaemonConfig) -> Door:
    dump = Path(config.criu_images)
    if not dump.is_dir():
        raise ConfigError(f"criu_images {dump} is not a directory")
    work = Path(config.criu_work_dir) if config.criu_work_dir else None
    page_server = config.page_server or None

    async def door(daemon: Daemon) -> None:
        await serve_criu_restores(daemon, dump, work, page_server)

    return door
