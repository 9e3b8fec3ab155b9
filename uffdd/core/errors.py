"""The exception tree: who is at fault decides the type (shared/DESIGN.md section 5).

Expected kernel outcomes (EEXIST, EAGAIN, ENOENT, ESRCH) are values, not exceptions;
these types are for what a caller cannot carry on from. This module stays importable
from the pure core (no os). A peer's fault (a restorer, a
page server, an image) must never look like our own bug, so the log and the peer's
error message can say whose fault it was.
"""

from __future__ import annotations

import errno as errno_codes


class UffddError(Exception):
    """Base of every error uffdd raises on purpose."""


class ConfigError(UffddError):
    """A flag, environment variable or config file value is wrong."""


class KernelSupportError(UffddError):
    """The running kernel (or this fd) lacks something uffdd needs."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class PeerProtocolError(UffddError):
    """A peer (restorer, handover client, uffd message stream) broke the protocol."""


class PageServerError(UffddError):
    """The page server could not deliver what was asked."""


class PageServerUnavailable(PageServerError):
    """The page server cannot be reached, or did not answer within the deadline."""


class PageServerNotFound(PageServerError):
    """The page server does not know the image or address asked for."""


class PageServerDataError(PageServerError):
    """Data arrived but is wrong: checksum mismatch, wrong length, wrong address."""


class ImageError(UffddError):
    """A snapshot image is missing, corrupt, truncated or inconsistent."""


class UffdOpError(UffddError):
    """A userfaultfd operation failed with an errno the caller did not expect."""

    def __init__(self, op: str, errno: int, start: int | None = None, length: int | None = None):
        where = "" if start is None else f" on [{start:#x}, +{length or 0:#x})"
        name = errno_codes.errorcode.get(errno, str(errno))
        super().__init__(f"{op} failed{where}: {name}")
        self.op = op
        self.errno = errno
        self.start = start
        self.length = length


class InternalError(UffddError):
    """A bug in uffdd itself: an invariant of ours does not hold."""
