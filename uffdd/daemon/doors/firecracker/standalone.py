"""``uffdd firecracker``: a daemon whose only front door is Firecracker's UFFD socket.

Why a command of its own: a Firecracker host points ``mem_backend.backend_path`` at a
socket and expects a handler there; this runs the ordinary daemon (executor, page
clients, graceful stop, systemd notify) with just that door and the image the VMs are
restored from: a snapshot memory file (made into an image in a cache directory once),
an image directory, or an image on a page server.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from uffdd.config import FirecrackerConfig
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
from uffdd.daemon.lifecycle import Daemon, Door
from uffdd.log import get_logger

_log = get_logger("uffdd.firecracker")


def run_firecracker(config: FirecrackerConfig, resume: Door | None = None) -> None:
    """Serve VMs on ``config.socket`` until stopped; ConfigError (logged) if it cannot
    start (an unusable socket path, memory file or image)."""
    backing: Backing | None = None
    listening: FirecrackerSocket | None = None
    settings = config.daemon
    if not settings.state_dir:
        settings = replace(settings, state_dir=str(config.socket.parent / "uffdd-state"))
    daemon = Daemon(settings)
    daemon.prepare()  # a VMM hands over as soon as the socket exists
    ran = False
    try:
        if config.mem_file is not None:
            cache = config.cache_dir or default_cache_dir()
            image = image_from_memfile(config.mem_file, cache, config.page_size)
            _log.info("image of the memory file", mem_file=str(config.mem_file), image=str(image))
            backing = LocalImage(image)
        elif config.image_dir is not None:
            backing = LocalImage(config.image_dir)
        else:
            assert config.image_id is not None
            backing = RemoteImage(config.image_id, config.daemon.page_server)
        listening = FirecrackerSocket.bind(config.socket, mode=config.socket_mode)
        uids = config.daemon.allowed_uids
        policy = (
            FirecrackerPolicy(fd_wait=config.fd_wait)
            if uids is None
            else FirecrackerPolicy(allowed_uids=uids, fd_wait=config.fd_wait)
        )
        door = firecracker_door(listening, backing, policy)
        ran = True
        asyncio.run(daemon.run([door] if resume is None else [resume, door]))
    except ConfigError as exc:
        _log.error("cannot start", error=str(exc))
        raise
    finally:
        if not ran:
            daemon.abandon()
        if listening is not None:
            listening.close()
        if backing is not None:
            backing.close()
