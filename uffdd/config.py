"""The daemon's settings: one frozen value, from a TOML file overlaid with flags.

Why frozen and pure: the loop, the handover listener and the policy all read settings,
and none of them may see a half-updated value; parsing is a pure function of its inputs
(file text, flag values), so every bad value is reported with where it came from before
the daemon touches a socket. Precedence: defaults < ``--config`` file < environment
(``UFFDD_*``, via click) < flags.

The file holds one ``[daemon]`` table whose keys are the field names below, e.g.::

    [daemon]
    handover = "/run/uffdd/handover.sock"
    page_server = "unix:/run/uffdd/pages.sock"
    allowed_uids = [0, 1000]
    fetch_deadline = 10.0
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from uffdd.core.errors import ConfigError

LOG_FORMATS = ("json", "console")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything `uffdd daemon` can be told."""

    handover: str = "/run/uffdd/handover.sock"
    """Path of the native handover socket (SOCK_SEQPACKET)."""
    handover_mode: int = 0o600
    """File mode of the handover socket."""
    allowed_uids: frozenset[int] | None = None
    """Peers allowed to hand over; None: root and the daemon's own uid."""
    page_server: str = ""
    """Default page server (``host:port`` or ``unix:/path``) for handovers naming none."""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    fetch_deadline: float = 10.0
    """Seconds a page request may take before its process tree is killed."""
    grace: float = 30.0
    """Seconds SIGTERM waits for restores to finish before killing what is left."""
    progress_interval: float = 0.5
    """Seconds between progress messages to restorers."""
    max_inflight_bytes: int = 64 << 20
    """Bulk bytes one process may have requested and not yet installed. Demand faults
    do not queue behind it (they ask again on the urgent lane), so it can be large:
    bench, same machine, reading 2 GiB in random order: 0.24 GiB/s at 64 MiB, 0.11
    at 8 MiB; demand p99 while the sweep runs 3.4 ms at 64 MiB, 6.6 ms at 8 MiB."""
    fault_around: int = 64 << 10
    """Bytes fetched around a demand fault (a power of two)."""
    bulk_max: int = 4 << 20
    """Largest background request; requests grow to it while no fault comes."""
    sweep: bool = True
    """Stream the rest in the background (off: demand faults only; never resident)."""
    install_thread: bool = True
    """Install large background chunks on a thread of their own, so demand faults are
    read and answered meanwhile (off: every install runs on the daemon's loop)."""
    demand_lane: bool = True
    """Read, fetch and install remote demand faults in a C thread (``uffdd-demand``),
    on a fast-lane connection of its own (off: the loop reads them and the page client
    fetches them; a process that reads all its memory gets resident sooner that way on
    a small host)."""
    images: str = ""
    """A local image root: handovers naming no page server are served from it."""
    log_format: str = "json"
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems = []
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        for name in ("fetch_deadline", "grace", "progress_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.max_inflight_bytes < 1 << 20:
            problems.append("max_inflight_bytes must be at least 1 MiB")
        for name in ("fault_around", "bulk_max"):
            value = getattr(self, name)
            if value < 4096 or value & (value - 1):
                problems.append(f"{name} must be a power of two of at least 4096")
        if not 0 <= self.handover_mode <= 0o777:
            problems.append("handover_mode must be a file mode such as 0o600")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if problems:
            raise ConfigError("; ".join(problems))


def parse_size(text: str) -> int:
    """``"64K"``, ``"4MiB"``, ``"1.5G"`` or plain bytes -> bytes (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = cleaned[-1:] if cleaned[-1:] in units else ""
    try:
        value = float(cleaned[: len(cleaned) - len(suffix)]) * units[suffix]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 64K, 4M)") from None
    if value < 0:
        raise ValueError(f"not a size: {text!r} (negative)")
    return int(value)


_FIELD_TYPES = {f.name: f.type for f in fields(DaemonConfig)}


def load_toml(text: str, source: str = "config") -> dict[str, Any]:
    """The ``[daemon]`` table of a TOML document, checked for unknown keys."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown_tables = set(document) - {"daemon"}
    if unknown_tables:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(sorted(unknown_tables))}")
    table = document.get("daemon", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [daemon] must be a table")
    unknown = set(table) - set(_FIELD_TYPES)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
    return table


def build(file_values: dict[str, Any], overrides: dict[str, Any]) -> DaemonConfig:
    """Defaults, then the file's values, then every override that is not None."""
    merged = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    values: dict[str, Any] = {}
    for name, value in merged.items():
        if name not in _FIELD_TYPES:
            raise ConfigError(f"unknown setting {name}")
        values[name] = _coerce(name, value)
    return replace(DaemonConfig(), **values)


def _coerce(name: str, value: Any) -> Any:
    """Check and convert one setting; a wrong type names the setting."""
    kind = _FIELD_TYPES[name]
    try:
        if name == "allowed_uids":
            uids = [value] if isinstance(value, int) else list(value)
            if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids):
                raise ValueError("a list of non-negative integers")
            return frozenset(uids)
        if kind in (bool, "bool"):
            if not isinstance(value, bool):
                raise ValueError("true or false")
            return value
        if name == "handover_mode":
            return int(value, 8) if isinstance(value, str) else int(value)
        if kind in (float, "float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("a number")
            return float(value)
        if kind in (int, "int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("an integer")
            return value
        if not isinstance(value, str):
            raise ValueError("a string")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: expected {exc}, got {value!r}") from exc
    return value
