"""The native handover without IO: its typed messages and every check of a request.

Why here, apart from the sockets: everything a hostile or buggy restorer can get wrong in
a request (an unknown version, regions that overlap, are unaligned, empty or absurdly
large, oversized strings) is decided by pure functions that unit tests and hypothesis
cover without a kernel. The protobuf codec is ``uffdd.wire.handover`` (generated
code stays out of the core); the socket shell (``uffdd.daemon.doors.native``) adds what only
the kernel knows (the peer's credentials, the fd). The wire format is
``proto/uffdd/v1/handover.proto``; the numbers here mirror it (a unit test checks).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr
from uffdd.core.errors import PeerProtocolError

DEFAULT_SOCKET_PATH = "/run/uffdd/handover.sock"
"""Where the daemon listens by default (``uffdd daemon --handover``)."""

PROTOCOL_VERSION = 1  # HANDOVER_VERSION_CURRENT
"""The handover protocol version this code speaks (and the only one, for now)."""
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

MAX_REQUEST_BYTES = 256 * 1024
"""Largest request record accepted; the receive buffer is one byte larger to spot more."""
MAX_REPLY_BYTES = 64 * 1024

HUGE_2M = 2 * 1024 * 1024
HUGE_1G = 1024 * 1024 * 1024


class ErrorCode(enum.IntEnum):
    """Why a handover was refused (``HandoverErrorCode`` in the proto)."""

    UNSPECIFIED = 0
    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    PERMISSION_DENIED = 3
    BAD_FD = 4
    MISSING_FEATURES = 5
    BAD_REGIONS = 6
    BAD_PID = 7
    LIMIT = 8
    BAD_REQUEST = 9
    REFUSED = 10
    INTERNAL = 11


class HandoverRejected(PeerProtocolError):
    """A handover request is unacceptable; ``code`` and the message go back to the peer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.reason = message


# -- typed values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandoverRegion:
    """One registered range: where it is mapped now, and where its pages are in the image."""

    run_address: RunAddr
    image_address: ImageAddr
    length: int
    page_size: int = PAGE_SIZE

    @property
    def run_end(self) -> int:
        return self.run_address + self.length

    @property
    def image_end(self) -> int:
        return self.image_address + self.length


@dataclass(frozen=True, slots=True)
class HandoverRequest:
    """What a restorer asks for; ``pid`` 0 means the connecting process itself."""

    image_id: str
    regions: tuple[HandoverRegion, ...]
    pid: int = 0
    page_server: str = ""
    restorer: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(region.length for region in self.regions)


@dataclass(frozen=True, slots=True)
class HandoverLimits:
    """What a daemon accepts; the defaults are generous but finite."""

    max_regions: int = 4096
    max_total_bytes: int = 1 << 44  # 16 TiB
    page_sizes: frozenset[int] = frozenset({PAGE_SIZE, HUGE_2M, HUGE_1G})
    max_address: int = 1 << 56  # the top of user space with 5-level page tables
    max_string: int = 1024
    max_labels: int = 64


@dataclass(frozen=True, slots=True)
class Ack:
    handover_id: str


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Progress:
    resident_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class ResidentSummary:
    """How the restore went, sent once every page is resident."""

    pages: int
    bytes: int
    faults: int
    fault_p50_us: float
    fault_p99_us: float
    seconds_to_resident: float


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


Reply = Ack | Error | Progress | ResidentSummary | Failed


# -- validation -----------------------------------------------------------------------


def validate_regions(
    regions: Iterable[HandoverRegion], limits: HandoverLimits = HandoverLimits()
) -> tuple[HandoverRegion, ...]:
    """Check every region and the set; return them sorted by run-time address.

    Rejected (BAD_REGIONS): no region, a page size not in ``limits.page_sizes``, a zero
    length, an address or length not a multiple of the page size, a range past the top
    of user space, run-time ranges that overlap. Image ranges may overlap (two mappings
    restored from the same snapshot pages). Too many regions or bytes: LIMIT.
    """
    ordered = sorted(regions, key=lambda r: (r.run_address, r.length))
    if not ordered:
        raise HandoverRejected(ErrorCode.BAD_REGIONS, "no regions")
    if len(ordered) > limits.max_regions:
        raise HandoverRejected(
            ErrorCode.LIMIT, f"{len(ordered)} regions, at most {limits.max_regions} allowed"
        )
    total = 0
    for region in ordered:
        _check_region(region, limits)
        total += region.length
    if total > limits.max_total_bytes:
        raise HandoverRejected(
            ErrorCode.LIMIT, f"{total} bytes in all, at most {limits.max_total_bytes} allowed"
        )
    for before, after in itertools.pairwise(ordered):
        if after.run_address < before.run_end:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"regions overlap: {_describe(before)} and {_describe(after)}",
            )
    return tuple(ordered)


def _check_region(region: HandoverRegion, limits: HandoverLimits) -> None:
    where = _describe(region)
    size = region.page_size
    if size not in limits.page_sizes:
        allowed = ", ".join(str(s) for s in sorted(limits.page_sizes))
        raise HandoverRejected(
            ErrorCode.BAD_REGIONS, f"region {where}: page size {size} not one of {allowed}"
        )
    if region.length <= 0:
        raise HandoverRejected(ErrorCode.BAD_REGIONS, f"region {where}: zero length")
    for name, value in (
        ("run address", region.run_address),
        ("image address", region.image_address),
        ("length", region.length),
    ):
        if value % size:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"region {where}: {name} {value:#x} is not a multiple of the page size {size}",
            )
    for name, end in (("run", region.run_end), ("image", region.image_end)):
        if end > limits.max_address:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"region {where}: {name} range ends at {end:#x}, past {limits.max_address:#x}",
            )


def _describe(region: HandoverRegion) -> str:
    return f"[{region.run_address:#x}, +{region.length:#x})"


def validate_request(
    request: HandoverRequest, limits: HandoverLimits = HandoverLimits()
) -> HandoverRequest:
    """Check a decoded request; return it with its regions sorted. Raise HandoverRejected."""
    check_version(request.version)
    if request.pid < 0:
        raise HandoverRejected(ErrorCode.BAD_PID, f"pid {request.pid} is negative")
    if not request.image_id:
        raise HandoverRejected(ErrorCode.BAD_REQUEST, "image_id is empty")
    _check_string("image_id", request.image_id, limits)
    _check_string("page_server", request.page_server, limits)
    _check_string("restorer", request.restorer, limits)
    if len(request.labels) > limits.max_labels:
        raise HandoverRejected(
            ErrorCode.LIMIT, f"{len(request.labels)} labels, at most {limits.max_labels} allowed"
        )
    for key, value in request.labels.items():
        _check_string("label key", key, limits)
        _check_string(f"label {key!r}", value, limits)
    regions = validate_regions(request.regions, limits)
    return HandoverRequest(
        image_id=request.image_id,
        regions=regions,
        pid=request.pid,
        page_server=request.page_server,
        restorer=request.restorer,
        labels=dict(request.labels),
        version=request.version,
    )


def _check_string(name: str, value: str, limits: HandoverLimits) -> None:
    if len(value) > limits.max_string:
        raise HandoverRejected(
            ErrorCode.LIMIT, f"{name} is {len(value)} characters, at most {limits.max_string}"
        )
    if not value.isprintable():
        raise HandoverRejected(ErrorCode.BAD_REQUEST, f"{name} {value!r} has control characters")


def check_version(version: int) -> None:
    """Refuse a version this code does not speak (0: the sender did not set one)."""
    if version not in SUPPORTED_VERSIONS:
        code = ErrorCode.MALFORMED if version == 0 else ErrorCode.UNSUPPORTED_VERSION
        raise HandoverRejected(code, _version_message(version))


def _version_message(version: int) -> str:
    spoken = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
    if version == 0:
        return f"no protocol version set (this daemon speaks version {spoken})"
    return f"protocol version {version} is not supported (this daemon speaks version {spoken})"
