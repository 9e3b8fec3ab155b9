"""Firecracker sockets on the long-running daemon: ``uffdd daemon --firecracker SOCKET=IMAGE``.

Why a helper: `uffdd daemon` should take Firecracker handovers beside native ones
without knowing this dialect. Each spec names a socket and the image its VMs are
restored from: an image id on the daemon's page server, or (when it contains a ``/``)
an image directory on this host. Sockets are bound here, before the daemon runs, so a
bad path fails the start-up instead of a background task.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uffdd.config import DaemonConfig
from uffdd.core.errors import ConfigError
from uffdd.daemon.doors.firecracker.backing import Backing, LocalImage, RemoteImage
from uffdd.daemon.doors.firecracker.endpoint import FirecrackerSocket
from uffdd.daemon.doors.firecracker.listener import FirecrackerPolicy, firecracker_door
from uffdd.daemon.lifecycle import Daemon

Door = Callable[[Daemon], Coroutine[object, object, None]]


def parse_spec(text: str) -> tuple[Path, str]:
    """``SOCKET=IMAGE`` -> (socket path, image id or directory); ConfigError if malformed."""
    socket_path, sep, image = text.partition("=")
    if not sep or not socket_path or not image:
        raise ConfigError(f"--firecracker {text!r}: expected SOCKET=IMAGE_ID or SOCKET=IMAGE_DIR")
    return Path(socket_path), image


@dataclass
class FirecrackerDoors:
    """Bound sockets and their doors; :meth:`close` after the daemon returns."""

    doors: list[Door] = field(default_factory=list)
    sockets: list[FirecrackerSocket] = field(default_factory=list)
    backings: list[Backing] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for backing in self.backings:
            backing.close()


def firecracker_doors(specs: Sequence[str], config: DaemonConfig) -> FirecrackerDoors:
    """Bind every ``SOCKET=IMAGE`` spec; raise ConfigError (nothing left open) if one fails."""
    made = FirecrackerDoors()
    policy = (
        FirecrackerPolicy()
        if config.allowed_uids is None
        else FirecrackerPolicy(allowed_uids=config.allowed_uids)
    )
    try:
        for text in specs:
            socket_path, image = parse_spec(text)
            backing: Backing
            if "/" in image:
                backing = LocalImage(Path(image))
            elif config.page_server:
                backing = RemoteImage(image, config.page_server)
            else:
                raise ConfigError(
                    f"--firecracker {text!r}: image {image!r} needs --page-server "
                    "(or give an image directory)"
                )
            made.backings.append(backing)
            listening = FirecrackerSocket.bind(socket_path, mode=config.handover_mode)
            made.sockets.append(listening)
            made.doors.append(firecracker_door(listening, backing, policy))
    except BaseException:
        made.close()
        raise
    return made
