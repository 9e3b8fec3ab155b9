"""A real systemd for tests: a minimal Debian bookworm tree booted by systemd-nspawn.

Why: the fd store, Type=notify and Restart= only mean something when the real service
manager does them; a fake NOTIFY_SOCKET proves our half of the protocol, not systemd's.
A systemd 252 boots here as PID 1 of a container (``systemd-nspawn -b``), with this
checkout and its interpreter bind-mounted at the same paths, so the ``uffdd`` of
``.venv/bin`` runs inside unchanged.

- ``tree()``: the root tree, built once by ``debootstrap --variant=minbase`` from the
  mirror apt already uses, cached under ``$UFFDD_NSPAWN_CACHE`` (default
  ``/var/cache/uffdd-nspawn``) in a directory named by ``TREE_VERSION``; a tree is only
  used once it is complete (built aside, then renamed).
- ``Container``: boots the tree with ``--volatile=overlay`` (writes go to a tmpfs, the
  cached tree is never changed, so each boot starts from the same state), drives it with
  ``nsenter -t <its PID 1> -a`` and tears it down with what nspawn leaves behind.

Run as a script to build the tree ahead of the tests:
``PYTHONPATH=tests python3 tests/systemd/nspawn.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from support.waiting import wait_until

TREE_VERSION = "bookworm-minbase-systemd-dbus-python3-1"
"""Names the cached tree; change it whenever what ``_build`` puts in the tree changes."""
SUITE = "bookworm"
PACKAGES = ("systemd", "dbus", "python3")
"""python3 brings the shared libraries the bind-mounted interpreter's modules load."""

CACHE = Path(os.environ.get("UFFDD_NSPAWN_CACHE", "/var/cache/uffdd-nspawn"))
REPOSITORY = Path(__file__).resolve().parents[2]
INTERPRETER = Path(sys.base_prefix)
"""The interpreter the checkout's .venv was made from; bound read-only at its own path."""
UFFDD = REPOSITORY / ".venv" / "bin" / "uffdd"
PYTHON = REPOSITORY / ".venv" / "bin" / "python"

BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


def mirror(suite: str = SUITE) -> str:
    """The Debian mirror apt on this machine uses for ``suite`` (from its own sources)."""
    listing = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(TARGET_OF)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] == suite and fields[2] == "deb":
            return fields[0]
    raise RuntimeError(f"apt has no source for {suite!r}; add one or run apt-get update")


def tree(cache: Path = CACHE) -> Path:
    """The container's root tree, built now if missing (serialized by a lock file)."""
    root = cache / TREE_VERSION
    if (root / "etc" / "os-release").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "etc" / "os-release").exists():
            _build(root)
    return root


def _build(root: Path) -> None:
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: apt-get install systemd-container debootstrap")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(partial),
            mirror(),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # No getty on the console (nobody logs in), and a machine-id so journald and
    # the unit state directories work from the first boot.
    (partial / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
    for unit in ("console-getty.service", "getty@.service"):
        (partial / "etc" / "systemd" / "system" / unit).symlink_to("/dev/null")
    shutil.rmtree(partial / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    partial.rename(root)


def _container_init(ancestor: int) -> list[int]:
    """The descendant of ``ancestor`` that is a systemd running as PID 1 of its own pid
    namespace ([] until there is one)."""
    pending = [ancestor]
    while pending:
        pid = pending.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            spaces = _nspid(pid)
            own_init = len(spaces) > 1 and spaces[-1] == "1"
            if own_init and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return [pid]
            pending += _children(pid)
    return []


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(x) for x in (task / "children").read_text().split()]
    return found


def _nspid(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    return []


class Container:
    """A booted container; use as a context manager (boot on enter, tear down on exit).

    ``binds`` are bound read-write: a host path at the same path inside, or nspawn's
    ``SOURCE:DESTINATION``; the checkout and the interpreter are always bound at their
    own paths (the interpreter read-only).
    """

    def __init__(
        self, name: str, *, binds: Sequence[Path | str] = (), nspawn_args: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.binds = [str(REPOSITORY), *map(str, binds)]
        self.nspawn_args = list(nspawn_args)
        self.console = Path(f"/tmp/uffdd-nspawn-{name}.console")
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        """The container's PID 1 as this namespace sees it."""

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def boot(self) -> None:
        root = tree()
        command = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            f"--directory={root}",
            f"--machine={self.name}",
            f"--bind-ro={INTERPRETER}",
            *(f"--bind={bind}" for bind in self.binds),
            *self.nspawn_args,
        ]
        groups = cgroups(self.name)
        for group in groups:
            group.mkdir(exist_ok=True)
        # nspawn starts in the container's own cgroups (the shell moves itself, then
        # becomes nspawn).
        enter = "".join(f'echo $$ > "{group}/cgroup.procs"; ' for group in groups)
        with self.console.open("wb") as console:
            self._nspawn = subprocess.Popen(
                ["sh", "-c", enter + 'exec "$@"', "sh", *command],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        try:
            self.leader = self._find_leader()
            self._wait_booted()
        except BaseException:
            self.stop()
            raise

    def _find_leader(self) -> int:
        """The pid (here) of the process that is PID 1 in the container's namespace."""
        nspawn = self._nspawn
        assert nspawn is not None
        found: list[int] = []

        def look() -> bool:
            if nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited early:\n{self.tail()}")
            found[:] = _container_init(nspawn.pid)
            return bool(found)

        wait_until(look, lambda: f"systemd as PID 1 in the container\n{self.tail()}", BOOT_TIMEOUT)
        return found[0]

    def _wait_booted(self) -> None:
        """Until systemd finished booting ("degraded" counts: a unit a container cannot
        run). ``--wait`` waits for the boot, but fails until systemd's private socket
        exists, so a failure to connect is tried again."""
        seen: list[str] = []

        def booted() -> bool:
            state = self.run("systemctl", "is-system-running", "--wait", check=False)
            seen[:] = [state.stdout + state.stderr]
            return state.stdout.strip() in ("running", "degraded")

        wait_until(booted, lambda: f"a booted container: {seen}\n{self.tail()}", BOOT_TIMEOUT)

    def tail(self, lines: int = 40) -> str:
        """The end of the container's console (what nspawn and systemd printed)."""
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def run(
        self, *argv: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside (all the container's namespaces, its root)."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *argv],
            check=False,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -P``)."""
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def install_unit(self, name: str, text: str) -> None:
        """Write a unit file under /etc/systemd/system and reload."""
        self.write(f"/etc/systemd/system/{name}", text)
        self.systemctl("daemon-reload")

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "-", path, input=text)

    def stop(self) -> None:
        """Power the container off (SIGKILL after STOP_TIMEOUT) and clean what is left."""
        if self._nspawn is not None and self._nspawn.poll() is None:
            # SIGTERM to nspawn asks the container's systemd to power off.
            self._nspawn.send_signal(signal.SIGTERM)
            try:
                self._nspawn.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait()
        self._nspawn = None
        self.leader = 0
        cleanup(self.name)
        self.console.unlink(missing_ok=True)


NO_PRIVATE_TMP = "[Service]\nPrivateTmp=no\n"


def install_shipped_units(container: Container, config: str = "[daemon]\n") -> None:
    """The units of systemd/ with ``/usr/local/bin/uffdd`` replaced by this checkout's,
    and ``config`` as /etc/uffdd/uffdd.toml."""
    for unit in ("uffdd.socket", "uffdd.service"):
        text = (REPOSITORY / "systemd" / unit).read_text()
        container.write(
            f"/etc/systemd/system/{unit}", text.replace("/usr/local/bin/uffdd", str(UFFDD))
        )
    if any(Path("/tmp") in path.parents for path in (REPOSITORY, INTERPRETER)):
        # A checkout under /tmp would vanish behind the unit's PrivateTmp=.
        container.write("/etc/systemd/system/uffdd.service.d/checkout.conf", NO_PRIVATE_TMP)
    container.write("/etc/uffdd/uffdd.toml", config)
    container.systemctl("daemon-reload")


def _hierarchies() -> list[tuple[Path, str]]:
    """The cgroup hierarchies systemd uses (mount point, this process's group in it):
    the named v1 "systemd" one and the unified one of a hybrid host, or the unified one
    mounted at /sys/fs/cgroup."""
    mine = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _number, controllers, path = line.split(":", 2)
        mine[controllers] = path.lstrip("/")
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [(root, mine[""])]
    found = [(root / "unified", mine[""])] if (root / "unified" / "cgroup.procs").exists() else []
    if (root / "systemd" / "cgroup.procs").exists():
        found.append((root / "systemd", mine["name=systemd"]))
    return found


def cgroups(name: str) -> list[Path]:
    """The cgroups (one per hierarchy) a container named ``name`` runs in. nspawn
    without a host systemd makes its ``payload``/``supervisor`` groups inside the group
    it was started in: a group of its own keeps two containers apart and is removed
    whole afterwards."""
    return [mount / here / f"uffdd-nspawn-{name}" for mount, here in _hierarchies()]


def cleanup(name: str) -> None:
    """Remove what a container named ``name`` leaves once it is gone: its (empty) cgroups
    and its mount-propagation directory."""
    for group in cgroups(name):
        if group.is_dir():
            _remove_cgroup(group)
    shutil.rmtree(Path("/run/systemd/nspawn/propagate") / name, ignore_errors=True)


def _remove_cgroup(group: Path) -> None:
    """rmdir a cgroup and its descendants, deepest first (each must be empty)."""
    for child in [p for p in group.iterdir() if p.is_dir()]:
        _remove_cgroup(child)
    group.rmdir()


if __name__ == "__main__":
    started = time.monotonic()
    print(tree(), f"({time.monotonic() - started:.0f} s)")
