"""Every command's settings: frozen values, from defaults, a TOML file, the environment
and flags.

Why frozen and pure: the loop, the listeners and the policy all read settings, and none
of them may see a half-updated value; parsing is a pure function of its inputs (file
text, environment, flag values), so every bad value is reported with where it came from
before a command touches a socket. The defaults written here are the only ones: the
command line shows them in ``--help`` and the components take them from here.
Precedence: defaults < ``--config`` file < environment (``UFFDD_*``) < flags.

The daemon's file holds a ``[daemon]`` table whose keys are the field names of
:class:`DaemonConfig`, and optionally an ``[engine]`` table (:class:`Engine`), e.g.::

    [daemon]
    handover = "/run/uffdd/handover.sock"
    page_server = "unix:/run/uffdd/pages.sock"
    allowed_uids = [0, 1000]
    fetch_deadline = 10.0

    [engine]
    sweep = false

No imports beyond the standard library and the error types: ``uffdd --help`` and
``uffdd check`` read this module and must stay fast.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from uffdd.core.errors import ConfigError

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

DEFAULT_LISTEN = "127.0.0.1:7070"
"""Where ``uffdd page-server`` listens unless told otherwise."""
DEFAULT_CHUNK_SIZE = 512 * 1024
"""The page server's largest data chunk: an urgent request waits behind at most one."""
DEFAULT_BULK_CHUNK_SIZE = 1024 * 1024
"""The fast lane's bulk chunks: each one costs both ends a fixed amount of Python work
(headers, checks, the daemon's bookkeeping and one UFFDIO_COPY), so bigger ones make the
sweep faster; urgent chunks, and everything on gRPC, stay at the chunk size."""
DEFAULT_BULK_NICE = 10
"""How much lower the page server's bulk worker's CPU priority is (nice increment)."""

ENGINE_ENV = "UFFDD_ENGINE"
"""The environment variable holding engine knobs: ``NAME=VALUE`` pairs, comma-separated."""


@dataclass(frozen=True, slots=True)
class Engine:
    """Mechanism switches for experiments and benchmarks, not settings for users.

    Each knob turns one mechanism off (or tunes it) so its worth can be measured against
    the plain path in the same run; the defaults are what uffdd runs in production.
    Set with the hidden ``--engine NAME=VALUE`` (repeatable), the ``UFFDD_ENGINE``
    environment variable (``NAME=VALUE,NAME=VALUE``) or the ``[engine]`` table of the
    daemon's file. One table serves every command: each takes the knobs of its own
    mechanisms (daemon: the first three; page server: the last four) and ignores the
    rest, so one ``UFFDD_ENGINE`` can hold a whole benchmark's set-up.
    """

    sweep: bool = True
    """Daemon: stream the rest in the background (off: demand faults only, never
    resident; measures demand faults alone)."""
    install_thread: bool = True
    """Daemon: install large background chunks on a C thread of their own, so demand
    faults are read and answered meanwhile (off: every install on the daemon's loop)."""
    demand_lane: bool = True
    """Daemon: read, fetch and install remote demand faults in a C thread on a
    fast-lane connection of its own (off: the loop reads them and the page client
    fetches them)."""
    urgent_thread: bool = True
    """Page server: answer the fast lane's urgent requests on a C thread, without Python
    on the way (off: on the event loop; never with TLS)."""
    bulk_worker: bool = True
    """Page server: send the fast lane's bulk data from a second process at a lower CPU
    priority, so urgent requests get the CPU first (off: one process; never with TLS or
    a bulk rate limit)."""
    bulk_nice: int = DEFAULT_BULK_NICE
    """Page server: how much lower the bulk worker's CPU priority is (0-19)."""
    fast_lane: bool = True
    """Page server: also serve fetches on a raw socket next to each listener (TCP: a port
    the kernel picks; unix:PATH: PATH.urgent), found through ListImages (off: gRPC only)."""

    def __post_init__(self) -> None:
        if not 0 <= self.bulk_nice <= 19:
            raise ConfigError("engine bulk_nice must be 0 to 19")


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
    do not queue behind it (they ask again on the urgent lane), so it can be large; a
    smaller window slows the sweep and lengthens the demand tail while it runs."""
    fault_around: int = 64 << 10
    """Bytes fetched around a demand fault (a power of two)."""
    bulk_max: int = 4 << 20
    """Largest background request; requests grow to it while no fault comes."""
    images: str = ""
    """A local image root: handovers naming no page server are served from it."""
    criu_images: str = ""
    """A CRIU dump: also take CRIU lazy-pages handovers for it, one restore per connection."""
    criu_work_dir: str = ""
    """Where ``lazy-pages.socket`` is made for ``criu_images`` (default: the dump's dir)."""
    firecracker: tuple[str, ...] = ()
    """``SOCKET=IMAGE`` specs: also take Firecracker handovers on each SOCKET."""
    state_dir: str = ""
    """Where the journal and the keeper's socket live (default: ``state`` next to the
    handover socket). A daemon started again with the same one resumes what a daemon
    that died there was serving."""
    resume_deadline: float = 10.0
    """Seconds the keeper holds a dead daemon's processes for a new daemon before it
    kills them."""
    log_format: str = "json"
    log_level: str = "info"
    engine: Engine = Engine()
    """Mechanism switches (the ``[engine]`` table, not a ``[daemon]`` key)."""

    def __post_init__(self) -> None:
        problems = []
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        for name in ("fetch_deadline", "grace", "progress_interval", "resume_deadline"):
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


@dataclass(frozen=True, slots=True)
class PageServerConfig:
    """Everything `uffdd page-server` can be told."""

    images: Path
    """Directory holding the images to serve (one subdirectory per image)."""
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    """``host:port`` or ``unix:/path`` addresses (port 0: the kernel picks)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    grace: float = 10.0
    """Seconds in-flight calls may run after SIGTERM."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bulk_chunk_size: int = DEFAULT_BULK_CHUNK_SIZE
    bulk_rate: int | None = None
    """Background (bulk) bytes per second at most; None: no cap (demand is never capped)."""
    ready_file: Path | None = None
    """Where ``{pid, addresses, fast_lane_addresses}`` is written once serving."""
    log_format: str = "json"
    log_level: str = "info"
    engine: Engine = Engine()

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("the page server needs at least one address to listen on")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")


@dataclass(frozen=True, slots=True)
class LazyPagesConfig:
    """Everything `uffdd lazy-pages` (one CRIU restore, then exit) can be told."""

    images_dir: Path
    """The dump's images (pstree, mm, pagemap; pages when served locally)."""
    work_dir: Path
    """Where ``lazy-pages.socket`` is made."""
    daemon: DaemonConfig = DaemonConfig()
    """The daemon serving the restore: its page server ("" = the dump's own pages),
    fetch deadline and engine."""


@dataclass(frozen=True, slots=True)
class FirecrackerConfig:
    """Everything `uffdd firecracker` (a daemon with one Firecracker socket) can be told."""

    socket: Path
    """The socket Firecracker connects to (``mem_backend.backend_path``)."""
    daemon: DaemonConfig = DaemonConfig()
    socket_mode: int = 0o600
    mem_file: Path | None = None
    """A snapshot memory file, made into an image under ``cache_dir`` once."""
    page_size: int = 4096
    """The VM's page size for ``mem_file``: 4 KiB, or 2 MiB for hugetlbfs-backed memory."""
    cache_dir: Path | None = None
    """Where the image of ``mem_file`` is kept; None: a per-user default."""
    image_dir: Path | None = None
    image_id: str | None = None
    """An image on the daemon's page server."""
    fd_wait: float = 2.0
    """Seconds a region list may wait for its userfaultfd."""

    def __post_init__(self) -> None:
        chosen = [x for x in (self.mem_file, self.image_dir, self.image_id) if x is not None]
        if len(chosen) != 1:
            raise ConfigError("give exactly one of --mem-file, --image-dir, --image")
        if (self.image_id is None) != (not self.daemon.page_server):
            raise ConfigError("--image and --page-server go together")


def defaults_of(cls: type[Any]) -> dict[str, Any]:
    """A config class's default values by field name (fields without one are left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def parse_size(text: str) -> int:
    """``"64K"``, ``"4MiB"``, ``"1.5G"``, ``"0x1000"`` or plain bytes -> bytes (powers
    of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper()
    try:
        if cleaned.startswith("0X"):
            return int(cleaned, 16)
        cleaned = cleaned.removesuffix("IB").removesuffix("B")
        suffix = cleaned[-1:] if cleaned[-1:] in units else ""
        number = cleaned[: len(cleaned) - len(suffix)]
        value = int(number) if number.isdigit() else float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 64K, 4M)") from None
    if value < 0:
        raise ValueError(f"not a size: {text!r} (negative)")
    return int(value * units[suffix])


def format_size(value: int) -> str:
    """Bytes as :func:`parse_size` reads them, in the largest unit that divides them."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


_FIELD_TYPES = {f.name: f.type for f in fields(DaemonConfig) if f.name != "engine"}
_ENGINE_TYPES = {f.name: f.type for f in fields(Engine)}


def load_toml(text: str, source: str = "config") -> dict[str, Any]:
    """The ``[daemon]`` table of a TOML document, checked for unknown keys; its
    ``[engine]`` table, if any, comes along under the key ``"engine"``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown_tables = set(document) - {"daemon", "engine"}
    if unknown_tables:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(sorted(unknown_tables))}")
    table = document.get("daemon", {})
    engine = document.get("engine", {})
    for name, value in (("daemon", table), ("engine", engine)):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
    unknown = set(table) - set(_FIELD_TYPES)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
    unknown = set(engine) - set(_ENGINE_TYPES)
    if unknown:
        raise ConfigError(f"{source}: unknown engine knob(s) {', '.join(sorted(unknown))}")
    return {**table, "engine": engine} if engine else dict(table)


def build(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    engine: Sequence[str] = (),
) -> DaemonConfig:
    """Defaults, then the file's values, then every override that is not None; the
    engine from the file's ``[engine]`` table, then the ``NAME=VALUE`` pairs given."""
    settings = {k: v for k, v in file_values.items() if k != "engine"}
    merged = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
    values: dict[str, Any] = {}
    for name, value in merged.items():
        if name not in _FIELD_TYPES:
            raise ConfigError(f"unknown setting {name}")
        values[name] = _coerce(name, value)
    values["engine"] = build_engine(file_values.get("engine", {}), engine)
    return replace(DaemonConfig(), **values)


def engine_pairs(environ: Mapping[str, str], flags: Sequence[str] = ()) -> list[str]:
    """The engine's ``NAME=VALUE`` pairs: ``$UFFDD_ENGINE`` first, then the flags."""
    from_env = [pair.strip() for pair in environ.get(ENGINE_ENV, "").split(",")]
    return [pair for pair in from_env if pair] + list(flags)


def build_engine(table: Mapping[str, Any] | None = None, pairs: Sequence[str] = ()) -> Engine:
    """The defaults, then the ``[engine]`` table's values, then ``NAME=VALUE`` pairs
    (later ones win); an unknown knob or a bad value is a ConfigError naming it."""
    values: dict[str, Any] = {}
    for name, value in (table or {}).items():
        if name not in _ENGINE_TYPES:
            raise ConfigError(f"unknown engine knob {name}; known: {', '.join(_ENGINE_TYPES)}")
        values[name] = _engine_value(name, value, f"[engine] {name}", text=False)
    for pair in pairs:
        raw_name, sep, text = pair.partition("=")
        name = raw_name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"engine {pair!r} is not NAME=VALUE")
        if name not in _ENGINE_TYPES:
            raise ConfigError(
                f"engine {pair!r}: unknown knob {name}; known: {', '.join(_ENGINE_TYPES)}"
            )
        values[name] = _engine_value(name, text.strip(), f"engine {pair!r}", text=True)
    return replace(Engine(), **values)


_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")


def _engine_value(name: str, value: Any, where: str, *, text: bool) -> Any:
    """One knob's value: typed from TOML, or from text (``on``/``off``, a number)."""
    boolean = _ENGINE_TYPES[name] in (bool, "bool")
    if text:
        if boolean and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if not boolean and value.lstrip("-").isdigit():
            return int(value)
    elif isinstance(value, bool) == boolean and isinstance(value, int):
        return value
    expected = "on or off" if text else "true or false"
    raise ConfigError(f"{where}: expected {expected if boolean else 'an integer'}, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    """Check and convert one setting; a wrong type names the setting."""
    kind = _FIELD_TYPES[name]
    try:
        if name == "allowed_uids":
            uids = [value] if isinstance(value, int) else list(value)
            if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids):
                raise ValueError("a list of non-negative integers")
            return frozenset(uids)
        if name == "firecracker":
            specs = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(s, str) for s in specs):
                raise ValueError("a list of SOCKET=IMAGE strings")
            return tuple(specs)
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
