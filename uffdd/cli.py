"""The `uffdd` command line: every command and its flags, in one place.

Why one place: a user reads one file to learn every command, flag, default and
environment variable; each command turns its flags (and, for the daemon, a config file
and the environment) into a frozen config value from ``uffdd.config`` and calls one run
function in the component it drives. Components know nothing of click.

Why the components are imported inside the command bodies: the daemon, the page server
and dump pull in grpc, protobuf and cffi; ``uffdd check`` and ``--help`` must not pay for
them, and one command's missing piece must not break the others. This module itself
imports only click, ``uffdd.config`` and two pure core modules (tests/e2e/test_check_cli.py
keeps it so).

Defaults shown by ``--help`` are the config classes' own. Where a config file may also
set a value (the daemon), a flag's default is shown but never applied: only values
given on the command line or in the environment override the file. Mechanism switches
for experiments are not flags: they are the hidden ``--engine NAME=VALUE`` and
``$UFFDD_ENGINE`` (``uffdd.config.Engine``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from uffdd import __version__
from uffdd.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    DaemonConfig,
    Engine,
    FirecrackerConfig,
    LazyPagesConfig,
    PageServerConfig,
    build,
    build_engine,
    defaults_of,
    engine_pairs,
    format_size,
    load_toml,
    parse_size,
)
from uffdd.core.errors import ConfigError
from uffdd.core.handover import DEFAULT_SOCKET_PATH

if TYPE_CHECKING:
    from uffdd.image.reader import ImageReader

F = TypeVar("F", bound=Callable[..., Any])

_DAEMON = defaults_of(DaemonConfig)
_PAGE_SERVER = defaults_of(PageServerConfig)
_FIRECRACKER = defaults_of(FirecrackerConfig)


_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}
"""Every command's context: ``-h`` too, and every default shown (also run on its own)."""


@click.group(context_settings=_SETTINGS)
@click.version_option(__version__, prog_name="uffdd")
def main() -> None:
    """uffdd: lazy restore of process memory over userfaultfd."""


# -- shared pieces ----------------------------------------------------------------------


def _option(*decls: str, env: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A click option whose environment variable (if any) ``--help`` shows."""
    if env is not None:
        kwargs.update(envvar=env, show_envvar=True)
    return click.option(*decls, **kwargs)


class _Size(click.ParamType[int]):
    """A byte count: 64K, 4M, 1.5G, 0x1000 or plain bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _Size()


def _setting(
    flag: str,
    prefix: str,
    defaults: Mapping[str, Any],
    dest: str | None = None,
    *,
    short: str | None = None,
    **kwargs: Any,
) -> Callable[[F], F]:
    """A command's setting: ``--some-flag`` is read from ``<prefix>SOME_FLAG`` too, and its
    default is the config class's field ``dest`` (default: the flag's name), shown in
    ``--help`` ("none" where the field is empty)."""
    name = flag.removeprefix("--").replace("-", "_")
    if "default" not in kwargs and "show_default" not in kwargs:
        value = defaults.get(dest or name)
        if value in (None, "", ()):
            kwargs["show_default"] = "none"
        else:
            kwargs["default"] = format_size(value) if kwargs.get("type") is SIZE else value
    decls = [d for d in (short, flag, dest) if d]
    return _option(*decls, env=f"{prefix}{name.upper()}", **kwargs)


def _daemon(flag: str, dest: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A setting of the daemon's: ``UFFDD_<FLAG>``, DaemonConfig's default."""
    return _setting(flag, "UFFDD_", _DAEMON, dest, **kwargs)


def _page_server(flag: str, **kwargs: Any) -> Callable[[F], F]:
    """A setting of the page server's: ``UFFDD_PAGE_SERVER_<FLAG>``, PageServerConfig's."""
    return _setting(flag, "UFFDD_PAGE_SERVER_", _PAGE_SERVER, **kwargs)


def _firecracker(flag: str, dest: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A setting of ``uffdd firecracker``'s own: ``UFFDD_FIRECRACKER_<FLAG>``."""
    return _setting(flag, "UFFDD_FIRECRACKER_", _FIRECRACKER, dest, **kwargs)


def _daemon_shared(what: str) -> Callable[[F], F]:
    """What every daemon-like command takes as ``uffdd daemon`` does (same variables):
    the page server's TLS, the peers allowed, deadlines and logging. ``what`` names
    what a deadline kills and SIGTERM waits for (process trees, VMs)."""
    decorators = [
        _daemon("--allow-uid", "allowed_uids", type=int, multiple=True, metavar="UID",
                show_default="root and our own uid",
                help="Peer uid allowed to hand over (repeat; the variable: space-separated)."),
        _daemon("--tls-ca", metavar="FILE",
                help="CA bundle to verify the page server (enables TLS)."),
        _daemon("--tls-cert", metavar="FILE", help="Client certificate for mutual TLS."),
        _daemon("--tls-key", metavar="FILE", help="Key of the client certificate."),
        _daemon("--fetch-deadline", type=float, metavar="SECONDS",
                help=f"Seconds a page request may take before its {what} is killed."),
        _daemon("--grace", type=float, metavar="SECONDS",
                help=f"Seconds SIGTERM waits for {what}s to become resident."),
        _daemon("--state-dir", metavar="DIR", show_default="beside the socket restores come in on",
                help="Journal and keeper socket: a daemon started again with the same one "
                f"resumes the {what}s a daemon that died was serving."),
        _daemon("--resume-deadline", type=float, metavar="SECONDS",
                help=f"Seconds a dead daemon's {what}s are held for a new daemon before "
                "they are killed."),
        *_log_options(_daemon),
    ]  # fmt: skip
    return _apply(*decorators)


def _log_options(setting: Callable[..., Callable[[F], F]]) -> list[Callable[[F], F]]:
    """``--log-format`` and ``--log-level`` as ``setting`` declares a command's options."""
    return [
        setting("--log-format", type=click.Choice(LOG_FORMATS)),
        setting("--log-level", type=click.Choice(LOG_LEVELS)),
    ]


def _lazy_pages(flag: str, short: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A setting of ``uffdd lazy-pages``: ``UFFDD_LAZY_PAGES_<FLAG>``, the daemon's defaults."""
    return _setting(flag, "UFFDD_LAZY_PAGES_", _DAEMON, short=short, **kwargs)


def _apply(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several option decorators as one, in the order they are written."""

    def decorate(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def _engine_option(command: F) -> F:
    """The hidden ``--engine NAME=VALUE`` (repeatable): see ``uffdd.config.Engine``."""
    return click.option("--engine", "engine", multiple=True, hidden=True, metavar="NAME=VALUE")(
        command
    )


def _engine(flags: tuple[str, ...]) -> Engine:
    """The engine from ``$UFFDD_ENGINE`` and ``--engine`` flags; a bad one is a usage error."""
    try:
        return build_engine(None, engine_pairs(os.environ, flags))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values among ``values`` that came from the command line or the environment
    (a default stays out, so a config file's value is not overridden by it)."""
    ctx = click.get_current_context()
    return {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    }


def _configure_logging(log_format: str, level: str) -> None:
    from uffdd.log import configure_logging  # noqa: PLC0415 (structlog: not for --help)

    configure_logging(json=log_format == "json", level=level)


# -- uffdd check ------------------------------------------------------------------------


@main.command("check", context_settings=_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(as_json: bool) -> None:
    """Probe this host's userfaultfd support and say what uffdd can and cannot do."""
    from uffdd.check import run  # noqa: PLC0415

    sys.exit(run(as_json))


# -- uffdd daemon -----------------------------------------------------------------------


@main.command("daemon", context_settings=_SETTINGS)
@_daemon(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default="none",
    help="TOML file with a [daemon] table (and optionally an [engine] table).",
)
@_daemon("--handover", metavar="PATH", help="Native handover socket path.")
@_daemon(
    "--handover-mode",
    metavar="MODE",
    default=f"{_DAEMON['handover_mode']:04o}",
    help="Socket file mode, octal.",
)
@_daemon("--page-server", metavar="TARGET", help="Default page server: HOST:PORT or unix:/path.")
@_daemon_shared("process tree")
@_daemon(
    "--images",
    metavar="DIR",
    help="Local image root: handovers naming no page server are served from it.",
)
@_daemon("--fault-around", type=SIZE, help="Bytes fetched around a fault.")
@_daemon("--bulk-max", type=SIZE, help="Largest background request.")
@_daemon(
    "--max-inflight", "max_inflight_bytes", type=SIZE, help="Bulk bytes in flight per process."
)
@_daemon(
    "--criu-images",
    type=click.Path(exists=True, file_okay=False),
    help="Also take CRIU lazy-pages handovers for this dump (lazy-pages.socket in "
    "--criu-work-dir); one restore per connection.",
)
@_daemon(
    "--criu-work-dir",
    type=click.Path(file_okay=False),
    show_default="the dump directory",
    help="Where lazy-pages.socket is made for --criu-images.",
)
@_daemon(
    "--firecracker",
    multiple=True,
    metavar="SOCKET=IMAGE",
    help="Also take Firecracker handovers on SOCKET, restoring from IMAGE (an image id "
    "on --page-server, or an image directory). Repeat for more sockets (the variable: "
    "space-separated).",
)
@_engine_option
def daemon(config_file: Path | None, engine: tuple[str, ...], **settings: Any) -> None:
    """Serve handed-over userfaultfds until every process is fully resident."""
    try:
        file_values: dict[str, Any] = {}
        if config_file is not None:
            try:
                text = config_file.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from exc
            file_values = load_toml(text, str(config_file))
        config = build(file_values, _given(settings), engine_pairs(os.environ, engine))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    _configure_logging(config.log_format, config.log_level)
    from uffdd.daemon.run import run_daemon  # noqa: PLC0415

    try:
        run_daemon(config)
    except ConfigError as exc:
        click.echo(f"uffdd daemon: {exc}", err=True)
        sys.exit(2)


# -- uffdd page-server ------------------------------------------------------------------


@main.command("page-server", context_settings=_SETTINGS)
@_page_server(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    show_default=False,
    help="Directory holding the images to serve (one subdirectory per image).",
)
@_page_server(
    "--listen",
    multiple=True,
    metavar="ADDRESS",
    help="host:port or unix:/path; repeatable (port 0 = any; the variable: space-separated).",
)
@_page_server("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="PEM cert.")
@_page_server("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM key.")
@_page_server(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM CA bundle: require client certificates signed by it (mutual TLS).",
)
@_page_server(
    "--grace", type=click.FloatRange(min=0), help="Seconds in-flight calls may run after SIGTERM."
)
@_page_server(
    "--chunk-size",
    type=click.IntRange(min=4096),
    help="Largest data chunk in bytes (an urgent request waits behind at most one).",
)
@_page_server(
    "--bulk-chunk-size",
    type=click.IntRange(min=4096),
    help="Largest chunk of a bulk request on the fast lane, in bytes (at least "
    "--chunk-size; bigger chunks cost less per byte on both ends).",
)
@_page_server(
    "--bulk-rate-limit",
    metavar="RATE",
    help="Cap background (bulk) data per second, e.g. 100M; demand faults are never capped.",
)
@_page_server(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write {pid, addresses, fast_lane_addresses} as JSON here once serving.",
)
@_apply(*_log_options(_page_server))
@_engine_option
def page_server(
    *,
    images: Path,
    listen: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    grace: float,
    chunk_size: int,
    bulk_chunk_size: int,
    bulk_rate_limit: str | None,
    ready_file: Path | None,
    log_format: str,
    log_level: str,
    engine: tuple[str, ...],
) -> None:
    """Serve snapshot images to uffdd daemons (gRPC PageService, health, reflection)."""
    _configure_logging(log_format, log_level)
    from uffdd.pageserver.ratelimit import parse_rate  # noqa: PLC0415

    try:
        bulk_rate = None if bulk_rate_limit is None else parse_rate(bulk_rate_limit)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bulk-rate-limit") from exc
    try:
        config = PageServerConfig(
            images=images,
            listen=listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            grace=grace,
            chunk_size=chunk_size,
            bulk_chunk_size=bulk_chunk_size,
            bulk_rate=bulk_rate,
            ready_file=ready_file,
            log_format=log_format,
            log_level=log_level,
            engine=_engine(engine),
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    from uffdd.pageserver.server import run  # noqa: PLC0415

    try:
        run(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


# -- uffdd lazy-pages -------------------------------------------------------------------

_VERBOSITY = ("warning", "info", "debug")


def page_server_target(address: str | None, port: int | None) -> str:
    """``--address``/``--port`` as a gRPC target (``unix:/path`` passes through)."""
    if address is None:
        raise click.UsageError("--page-server needs --address (host, host:port or unix:/path)")
    if address.startswith("unix:"):
        return address
    if port is not None:
        host = f"[{address}]" if ":" in address and not address.startswith("[") else address
        return f"{host}:{port}"
    if ":" not in address:
        raise click.UsageError("--page-server needs --port (or --address HOST:PORT)")
    return address


@main.command("lazy-pages", context_settings=_SETTINGS)
@click.option(
    "-D",
    "--images-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The dump's images (pstree, mm, pagemap; pages if local).",
)
@click.option(
    "-W",
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    show_default="the images dir",
    help="Where lazy-pages.socket is made.",
)
@click.option(
    "--page-server",
    "use_page_server",
    is_flag=True,
    help="Fetch pages from uffdd page-server (images criu-<pid>) instead of -D.",
)
@_lazy_pages(
    "--address",
    help="The page server: host, host:port or unix:/path (the variable: used with "
    "--page-server only).",
)
@_lazy_pages("--port", type=click.IntRange(1, 65535), help="The page server's port.")
@_lazy_pages(
    "--fetch-deadline",
    type=click.FloatRange(min=0.001),
    help="Seconds a page may take before the task is killed.",
)
@_lazy_pages(
    "--state-dir",
    metavar="DIR",
    show_default="WORK_DIR/uffdd-state",
    help="Journal and keeper socket: uffdd lazy-pages started again with the same one "
    "takes back the restore one that died was serving.",
)
@_lazy_pages(
    "--resume-deadline",
    type=click.FloatRange(min=0.001),
    metavar="SECONDS",
    help="Seconds the tasks of a uffdd lazy-pages that died are held for another "
    "before they are killed.",
)
@_lazy_pages(
    "--log-file",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default="stderr",
    help="Log here.",
)
@click.option(
    "-v", "verbose", count=True, show_default=False, help="More log (-v info, -vv debug)."
)
@_lazy_pages("--log-format", type=click.Choice(LOG_FORMATS))
@_engine_option
def lazy_pages(
    *,
    images_dir: Path,
    work_dir: Path | None,
    use_page_server: bool,
    address: str | None,
    port: int | None,
    fetch_deadline: float,
    state_dir: str,
    resume_deadline: float,
    log_file: Path | None,
    verbose: int,
    log_format: str,
    engine: tuple[str, ...],
) -> None:
    """Serve a `criu restore --lazy-pages` (in place of `criu lazy-pages`).

    CRIU's option names: -D, -W, --page-server --address A --port P, -o and -v mean
    what they mean to criu. Serves one restore and exits: 0 when every task is fully
    resident, 1 when the restore failed (the reason is logged and printed), 3 when a
    task exited on its own before it was resident.
    """
    target = page_server_target(address, port) if use_page_server else None
    source = click.get_current_context().get_parameter_source
    if not use_page_server and ParameterSource.COMMANDLINE in (source("address"), source("port")):
        raise click.UsageError("--address/--port need --page-server")
    config = LazyPagesConfig(
        images_dir,
        work_dir or images_dir,
        _daemon_config(
            {
                "page_server": target,
                "fetch_deadline": fetch_deadline,
                "state_dir": state_dir,
                "resume_deadline": resume_deadline,
            },
            engine,
        ),
    )
    from uffdd.core.errors import ImageError  # noqa: PLC0415
    from uffdd.daemon.doors.criu import run_lazy_pages  # noqa: PLC0415
    from uffdd.daemon.resume import resume_door  # noqa: PLC0415
    from uffdd.image.criu.images import read_pstree  # noqa: PLC0415

    try:
        read_pstree(images_dir)  # fail before criu restore connects
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    if log_file is not None:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        os.dup2(fd, sys.stderr.fileno())
        os.close(fd)
    _configure_logging(log_format, _VERBOSITY[min(verbose, 2)])
    result = run_lazy_pages(config, resume=resume_door)
    if result.reason:
        click.echo(f"uffdd lazy-pages: {result.reason}", err=True)
    sys.exit(result.code)


def _daemon_config(overrides: dict[str, Any], engine: tuple[str, ...]) -> DaemonConfig:
    """A daemon's config from flags and the environment alone (no config file)."""
    try:
        return build({}, overrides, engine_pairs(os.environ, engine))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


# -- uffdd firecracker ------------------------------------------------------------------


@main.command("firecracker", context_settings=_SETTINGS)
@_firecracker(
    "--socket",
    "socket_path",
    required=True,
    show_default=False,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Socket Firecracker connects to (mem_backend.backend_path).",
)
@_firecracker(
    "--socket-mode",
    metavar="MODE",
    default=f"{_FIRECRACKER['socket_mode']:04o}",
    help="Socket file mode, octal.",
)
@_firecracker(
    "--mem-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The snapshot's memory file (made into an image under --cache-dir once).",
)
@_firecracker(
    "--page-size",
    type=SIZE,
    help="With --mem-file: the VM's page size, 4K or 2M (hugetlbfs-backed guest memory).",
)
@_firecracker(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    show_default="/var/cache/uffdd/firecracker for root, else ~/.cache/uffdd/firecracker",
    help="With --mem-file: where its image is kept.",
)
@_firecracker(
    "--image-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An image directory (e.g. from `uffdd image from-raw`).",
)
@_firecracker("--image", "image_id", metavar="ID", help="Image id on --page-server.")
@_firecracker(
    "--page-server", metavar="TARGET", help="Page server with --image: HOST:PORT or unix:/path."
)
@_daemon_shared("VM")
@_firecracker(
    "--fd-wait",
    type=float,
    metavar="SECONDS",
    help="Seconds a region list may wait for its userfaultfd.",
)
@_engine_option
def firecracker(
    *,
    socket_path: Path,
    socket_mode: str,
    mem_file: Path | None,
    page_size: int,
    cache_dir: Path | None,
    image_dir: Path | None,
    image_id: str | None,
    page_server: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    allowed_uids: tuple[int, ...],
    fd_wait: float,
    fetch_deadline: float,
    grace: float,
    state_dir: str,
    resume_deadline: float,
    log_format: str,
    log_level: str,
    engine: tuple[str, ...],
) -> None:
    """Serve Firecracker VMs restored with a Uffd memory backend.

    Settings it shares with `uffdd daemon` take the daemon's environment variables;
    its own take UFFDD_FIRECRACKER_*.
    """
    try:
        mode = int(socket_mode, 8)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--socket-mode") from exc
    daemon_config = _daemon_config(
        {
            "allowed_uids": allowed_uids or None,
            "page_server": page_server,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "fetch_deadline": fetch_deadline,
            "grace": grace,
            "state_dir": state_dir,
            "resume_deadline": resume_deadline,
            "log_format": log_format,
            "log_level": log_level,
        },
        engine,
    )
    try:
        config = FirecrackerConfig(
            socket=socket_path,
            daemon=daemon_config,
            socket_mode=mode,
            mem_file=mem_file,
            page_size=page_size,
            cache_dir=cache_dir,
            image_dir=image_dir,
            image_id=image_id,
            fd_wait=fd_wait,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    _configure_logging(log_format, log_level)
    from uffdd.daemon.doors.firecracker.standalone import run_firecracker  # noqa: PLC0415
    from uffdd.daemon.resume import resume_door  # noqa: PLC0415

    try:
        run_firecracker(config, resume=resume_door)
    except ConfigError as exc:
        click.echo(f"uffdd firecracker: {exc}", err=True)
        sys.exit(2)


# -- uffdd dump, uffdd image ------------------------------------------------------------


@contextlib.contextmanager
def _progress_bar(show: bool, label: str) -> Iterator[Callable[[int], Callable[[int], None]]]:
    """A ``start_progress`` for the image writers: a bar on stderr once the total is known."""
    bars: list[Any] = []

    def start(total: int) -> Callable[[int], None]:
        if not show:
            return lambda _: None
        bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False)
        bars.append(bar)
        bar.__enter__()
        return bar.update

    try:
        yield start
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


_IMAGES_ROOT = click.option(
    "-o",
    "--output",
    "root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Images root: the image is written to ROOT/IMAGE_ID.",
)


@main.command("dump", context_settings=_SETTINGS)
@click.argument("pid", type=int)
@_IMAGES_ROOT
@click.option("--image-id", help="Image id (default: pid<PID>-<UTC time>).")
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Also capture readable mappings whose name matches ([anon] = unnamed).",
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip mappings matching.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
def dump(
    *,
    pid: int,
    root: Path,
    image_id: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    progress: bool | None,
) -> None:
    """Snapshot the private memory of live process PID into an image.

    Captures readable private mappings that are writable or anonymous (heap, stacks,
    anonymous mmaps, data of binaries and libraries); skips shared and read-only file
    mappings and [vvar]/[vdso]/[vsyscall]. Anonymous pages never populated are
    recorded as zero without being read; all-zero pages are not stored. The process
    is stopped (SIGSTOP) while its memory is read and resumed afterwards, also on
    error. The image goes to ROOT/IMAGE_ID; its path is printed on stdout.
    """
    from uffdd.core.errors import ImageError  # noqa: PLC0415
    from uffdd.image.dump import default_image_id, dump_process  # noqa: PLC0415

    show = sys.stderr.isatty() if progress is None else progress
    try:
        with _progress_bar(show, f"dumping {pid}") as start:
            result = dump_process(
                pid,
                root,
                image_id or default_image_id(pid),
                include=include,
                exclude=exclude,
                start_progress=start,
            )
    except (ImageError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"dumped {result.regions} regions: read {result.read_bytes} of "
        f"{result.total_bytes} bytes"
        + (f", {result.unreadable_bytes} unreadable (ZERO)" if result.unreadable_bytes else ""),
        err=True,
    )
    click.echo(str(result.path))


@main.group("image", context_settings=_SETTINGS)
def image() -> None:
    """Make, inspect and verify snapshot images."""


def parse_region(text: str) -> tuple[int, int, int]:
    """``OFFSET:LENGTH[:ADDR]`` -> (offset, length, image address; default the offset)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"region {text!r} is not OFFSET:LENGTH[:ADDR]")
    offset, length = parse_size(parts[0]), parse_size(parts[1])
    address = parse_size(parts[2]) if len(parts) == 3 else offset
    return offset, length, address


@image.command("from-raw", context_settings=_SETTINGS)
@click.argument(
    "memfile", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)
)
@_IMAGES_ROOT
@click.option("--image-id", help="Image id (default: <file name>-<UTC time>).")
@click.option(
    "--region",
    "regions",
    multiple=True,
    metavar="OFFSET:LENGTH[:ADDR]",
    help="A region at a file offset; its image address defaults to the offset "
    "(Firecracker names guest pages by memory-file offset). Default: the whole file.",
)
@click.option("--page-size", type=SIZE, default="4K", help="Page size of the regions (e.g. 2M).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
def from_raw(
    *,
    memfile: Path,
    root: Path,
    image_id: str | None,
    regions: tuple[str, ...],
    page_size: int,
    progress: bool | None,
) -> None:
    """Make an image from a raw memory file (e.g. a VM snapshot's memory file)."""
    try:
        layout = [parse_region(text) for text in regions]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    from uffdd.core.errors import ImageError  # noqa: PLC0415
    from uffdd.image.raw import default_raw_image_id, image_from_raw  # noqa: PLC0415

    show = sys.stderr.isatty() if progress is None else progress
    try:
        with _progress_bar(show, f"reading {memfile.name}") as start:
            path = image_from_raw(
                memfile,
                root,
                image_id or default_raw_image_id(memfile),
                layout,
                page_size,
                start,
            )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    except (ImageError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@image.command("inspect", context_settings=_SETTINGS)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--extents", is_flag=True, help="List every extent (human output).")
def inspect(directory: Path, as_json: bool, extents: bool) -> None:
    """Show an image's metadata and layout (no checksums are checked)."""
    from uffdd.image.summary import describe, render_text  # noqa: PLC0415

    with _open_image(directory) as reader:
        info = describe(reader)
    click.echo(json.dumps(info, indent=2) if as_json else render_text(info, extents))


@image.command("verify", context_settings=_SETTINGS)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def verify(directory: Path) -> None:
    """Check an image completely: layout, sizes and every chunk checksum."""
    with _open_image(directory) as reader:
        problems = reader.verify()
    if problems:
        for problem in problems:
            click.echo(f"{directory}: {problem}", err=True)
        raise click.ClickException(f"image {directory}: {len(problems)} problem(s)")
    click.echo(f"{directory}: OK")


def _open_image(directory: Path) -> ImageReader:
    """The image's reader; a broken image is a ClickException."""
    from uffdd.core.errors import ImageError  # noqa: PLC0415
    from uffdd.image.reader import ImageReader  # noqa: PLC0415

    try:
        return ImageReader.open(directory)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc


# -- uffdd restore ----------------------------------------------------------------------

EXIT_MISMATCH = 1
EXIT_FAILED = 3


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


@main.command("restore", context_settings=_SETTINGS)
@click.argument(
    "image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="IMAGE"
)
@_option(
    "--handover",
    "socket_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_SOCKET_PATH,
    env="UFFDD_HANDOVER",
    help="The daemon's handover socket.",
)
@click.option("--image-id", help="Image id the daemon fetches (default: the image's own id).")
@click.option(
    "--page-server",
    default="",
    show_default="the daemon's",
    help="Page server gRPC target.",
)
@click.option(
    "--placement",
    type=click.Choice(["anywhere", "image"]),
    default="anywhere",
    help="Map regions where the kernel likes, or at their image addresses (fails if taken).",
)
@click.option(
    "--verify/--touch",
    default=True,
    help="Compare every byte with the image, or only read one byte per page.",
)
@click.option(
    "--wait-resident/--no-wait-resident",
    default=True,
    help="Wait for the daemon to report every page resident.",
)
@click.option("--timeout", type=float, default=60.0, help="Seconds for each wait.")
@click.option("--label", "label_pairs", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
def restore(
    *,
    image_dir: Path,
    socket_path: Path,
    image_id: str | None,
    page_server: str,
    placement: str,
    verify: bool,
    wait_resident: bool,
    timeout: float,
    label_pairs: tuple[str, ...],
) -> None:
    """Restore IMAGE (a local image directory) into this process through the daemon.

    Maps every region of IMAGE into this process, hands it over to the daemon, reads
    every page (each read of a missing page is a fault the daemon serves), compares it
    with the image, optionally waits for the daemon's Resident report, and prints one
    JSON object. Exit status: 0 all bytes match (and resident, if waited for); 1 some
    pages differ; 3 the handover was refused or the restore failed (the reason is on
    stderr).
    """
    labels = _labels(label_pairs)
    from uffdd.core.errors import UffddError  # noqa: PLC0415
    from uffdd.restorer import HandedOver, restore_and_check, watched  # noqa: PLC0415

    with _open_image(image_dir) as reader:

        def body(hand_over: Callable[[HandedOver], None]) -> dict[str, Any]:
            return restore_and_check(
                reader,
                socket_path,
                image_id=image_id,
                page_server=page_server,
                at_image_addresses=placement == "image",
                verify=verify,
                wait_resident=False,
                timeout=timeout,
                labels=labels,
                on_handed_over=hand_over if wait_resident else None,
            )

        try:
            # The memory is restored in a child; this process keeps the line back to
            # the daemon, so the reason of a kill reaches stderr.
            report = watched(body, timeout) if wait_resident else body(lambda _: None)
        except (UffddError, OSError, TimeoutError) as exc:
            click.echo(f"uffdd restore: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    click.echo(json.dumps(report))
    if report["mismatched_pages"]:
        sys.exit(EXIT_MISMATCH)


# -- uffdd demo -------------------------------------------------------------------------


@main.command("demo", context_settings=_SETTINGS)
@click.option(
    "--size-mib", type=click.IntRange(8, 16384), default=256, help="Memory the workload builds."
)
@click.option("--seed", type=int, default=7)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    show_default="a temporary dir",
    help="Keep sockets, logs and the image here.",
)
@click.option(
    "--kill-daemon-at",
    type=click.FloatRange(0, min_open=True),
    metavar="SECONDS",
    help="SIGKILL the daemon this long into the restore (the workload is then killed, "
    "with the reason, unless --restart).",
)
@click.option(
    "--restart",
    is_flag=True,
    help="With --kill-daemon-at: start a new daemon, which resumes the restore.",
)
@_engine_option
def demo(
    size_mib: int,
    seed: int,
    workdir: Path | None,
    kill_daemon_at: float | None,
    restart: bool,
    engine: tuple[str, ...],
) -> None:
    """Migrate a real process lazily through uffdd on this host and verify every byte."""
    if restart and kill_daemon_at is None:
        raise click.UsageError("--restart needs --kill-daemon-at")
    _engine(engine)  # a bad knob fails here, not in a service
    from uffdd.demo.migration import DaemonKill, DemoError, run_demo  # noqa: PLC0415

    kill = None if kill_daemon_at is None else DaemonKill(kill_daemon_at, restart)
    try:
        ok = run_demo(size_mib, seed, workdir, engine, kill)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from exc
    if not ok:
        sys.exit(1)
