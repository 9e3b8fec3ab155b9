"""The fault-injection runner: restores on the three dialects, the daemon SIGKILLed mid-way.

Why: uffdd's first promise, never a wrong byte, must hold when the daemon itself dies. One
run draws a scenario from its seed: a dialect (native handover, CRIU lazy-pages, the
Firecracker backend), where pages come from (a page server, or local images), how the
daemon dies (SIGKILL from outside at a random moment, or ``UFFDD_CRASH_AT`` making it kill
itself at a named point, the n-th time it gets there) and whether a new daemon is started
on the same ``--state-dir``. The restored processes storm fork/mremap/madvise/munmap
while reading and check every byte they read. A run ends in one of:

- ``resumed``: a new daemon took the processes back; the workload completed and every
  byte it read (all of its memory, after full residency) was right;
- ``resumed, a child killed``: as above, and a forked child the new daemon could not prove
  was killed (its reason in the logs), never served from a guess;
- ``killed at the deadline``: no daemon resumed within ``--resume-deadline``; the whole
  tree is dead and the reason is in the keeper's log;
- ``killed, unprovable``: the daemon died inside a read of a uffd (the ``uffd-read``
  point, or an outside SIGKILL that landed there): what it read is lost, so the keeper
  killed the tree at once, restart or not, with that reason;
- ``finished first``: the workload was done (every byte right) before the kill landed or
  before the crash point was reached;
- anything else is a failure, and so is a single wrong byte in any run.

``tests/faults/test_faults.py`` runs a few scenarios per dialect; ``tests/faults/soak.py``
runs as many as asked (the soak command the README names).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from support.criu_restorer import (
    LazyPages,
    Restorer,
    Tree,
    lazy_pages_command,
    tree_spec,
    write_dump,
)
from support.firecracker_support import PAGE, VMM_SCRIPT, make_memfile
from support.lazy_restore import Restored, make_demo_image, page_server, start_restored
from support.waiting import wait_until

from uffdd.demo.services import (
    KILLED_TREE,
    kill_reasons,
    start,
    stop,
    uffdd_command,
    wait_for_path,
)

DIALECTS = ("native", "criu", "firecracker")
POINTS: dict[str, tuple[str | None, ...]] = {
    # None: SIGKILL from outside at a random moment
    "native": (
        None,
        None,
        "before-ack",
        "uffd-read",
        "fork-read",
        "layout-read",
        "installing",
        "grace",
    ),
    "criu": (None, None, "uffd-read", "fork-read", "layout-read", "installing", "grace"),
    "firecracker": (None, None, "uffd-read", "layout-read", "installing", "grace"),
}
DEADLINE_REASON = "resumed within"
"""In the reason of a kill at the deadline (``... no daemon resumed within N s ...``)."""
UNPROVEN = "with no journal of the uffd"
"""In the reason of a kill of a tree whose state the journal cannot prove."""
IN_HANDOVER = "while the restore was being handed over"
"""In the reason of a kill of a restore whose handover the daemon's death interrupted (a
CRIU restore before its restore-finished marker; a VMM whose uffd was not journaled yet):
it cannot be resumed."""
UNPROVABLE: tuple[str | None, ...] = ()
"""Deaths after which the journal may not prove a tree's state: none (every read lands
in the journal's slot first, so a death inside one is replayed); a kill with
``UNPROVEN`` as its reason is a failure."""
RESUMED_EVENT = '"resumed"'
"""A resumed daemon's log event (JSON), once per tree taken back."""
RESUMED = "resumed"
CHILD_KILLED = "resumed, a child killed"
KILLED = "killed at the deadline"
UNPROVABLE_KILL = "killed, unprovable"
HANDOVER_KILL = "killed, handover cut"
STOPPED = "killed by the graceful stop"
FINISHED_FIRST = "finished first"
FAILED = "FAILED"
OUTCOMES = (
    RESUMED,
    CHILD_KILLED,
    KILLED,
    UNPROVABLE_KILL,
    HANDOVER_KILL,
    STOPPED,
    FINISHED_FIRST,
    FAILED,
)

WAIT = 120.0
"""Seconds a run's workload may take to end: a hang guard, never a measurement."""
RESTART_DEADLINE = 30.0
"""--resume-deadline when a restart follows: far more than a daemon takes to start."""
GIVE_UP_DEADLINE = 1.0
"""--resume-deadline when nobody restarts: the keeper's kill comes soon."""
DEFAULT_DEADLINE = 5.0
"""The product's --resume-deadline, for a command that is not given one."""
LEAVE = 10.0
"""Seconds a keeper may take past its deadline to leave after a run (a hang guard)."""
BULK_RATE = "8M"
"""The page server's bulk lane rate: the background transfer is still going when the
daemon dies (demand faults are not limited)."""
MIB = 1 << 20
DETAIL = 600
"""Characters of a failure's detail printed (the run's directory keeps the logs)."""
FC_SIZE = 32 * MIB
FC_REGIONS = [
    {"offset": 0, "size": 24 * MIB, "page_size": PAGE},
    {"offset": 24 * MIB, "size": 8 * MIB, "page_size": PAGE},
]
MARKS = {"native": 12, "criu": 6, "firecracker": 3}
"""The workload's steps an outside kill may follow: the handover is step 1; then the
native storm's phases, the CRIU tree's reports, the VMM's steps (early ones: pages are
still missing)."""
FC_BALLOON = [[0, 0, 4 * PAGE, 4 * PAGE], [0, 1, MIB, MIB], [0, 0, 9 * MIB, 2 * MIB]]


@dataclass(frozen=True)
class Scenario:
    """One run, all drawn from ``seed``."""

    seed: int
    dialect: str
    source: str  # "page-server" or "images"
    point: str | None  # a crash point, or None: SIGKILL from outside
    nth: int  # the crash point's n-th visit
    mark: int  # the outside kill (or SIGTERM) comes after the workload's mark-th step...
    delay: float  # ... and this many seconds more
    restart: bool
    command: str  # which uffdd command serves: "daemon", "lazy-pages", "firecracker"

    @classmethod
    def draw(
        cls,
        seed: int,
        dialect: str | None = None,
        restart: bool | None = None,
        source: str | None = None,
    ) -> Scenario:
        """The scenario of ``seed``; a given ``dialect``, ``restart`` or ``source``
        replaces what was drawn (the other draws stay the same)."""
        rng = random.Random(seed)
        drawn = rng.choice(DIALECTS)  # drawn even when given: the same seed, the same run
        dialect = dialect or drawn
        point = rng.choice(POINTS[dialect])
        drawn_source = rng.choice(("page-server", "images"))
        commands = {
            "native": ("daemon",),
            "criu": ("daemon", "lazy-pages"),
            "firecracker": ("firecracker",),
        }
        restarts = rng.random() < 0.6
        return cls(
            seed=seed,
            dialect=dialect,
            source=source or drawn_source,
            point=point,
            nth=rng.randint(1, 3) if point in ("layout-read", "installing") else 1,
            mark=rng.randint(1, MARKS[dialect]),
            delay=round(rng.uniform(0.0, 0.1), 3),
            restart=restarts if restart is None else restart,
            command=rng.choice(commands[dialect]),
        )

    def describe(self) -> str:
        how = f"UFFDD_CRASH_AT={self.point}:{self.nth}" if self.point else "SIGKILL"
        if self.point in (None, "grace"):
            how += f" {self.delay:g} s after step {self.mark}"
        then = "restart" if self.restart else "no restart"
        return (
            f"seed {self.seed}: {self.dialect} via `uffdd {self.command}` from {self.source}, "
            f"{how}, {then}"
        )

    def reproduce(self) -> str:
        restart = "always" if self.restart else "never"
        return (
            f"python tests/faults/soak.py --runs 1 --seed {self.seed} --dialect {self.dialect} "
            f"--source {self.source} --restart {restart}"
        )


@dataclass
class Result:
    """What one run ended in, and why."""

    scenario: Scenario
    outcome: str
    detail: str = ""
    wrong: int = 0
    verified_bytes: int = 0
    daemon_killed: bool = False

    def line(self) -> str:
        text = f"{self.outcome:<24} {self.scenario.describe()}"
        if self.detail:
            detail = self.detail if len(self.detail) <= DETAIL else self.detail[:DETAIL] + "..."
            text += f"\n    {detail}"
        if self.outcome == FAILED:
            text += f"\n    reproduce: {self.scenario.reproduce()}"
        return text


@dataclass
class Assets:
    """What every run restores from, built once: the demo image, a Firecracker memory file
    and its image, a scratch directory."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def memfile(self) -> Path:
        return self.root / "vm.mem"

    @property
    def fc_images(self) -> Path:
        return self.root / "fc-images"

    @classmethod
    def build(cls, root: Path) -> Assets:
        """Build them under ``root`` (kept from an earlier soak in the same place)."""
        assets = cls(root)
        built = root / "built"
        if built.exists():
            return assets
        shutil.rmtree(root, ignore_errors=True)
        make_demo_image(assets.images, "demo")
        make_memfile(assets.memfile, FC_SIZE, [(2 * MIB, MIB), (FC_SIZE - 3 * PAGE, 3 * PAGE)])
        subprocess.run(
            uffdd_command("image", "from-raw", str(assets.memfile), "-o", str(assets.fc_images),
                          "--image-id", "vm"),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        built.touch()
        return assets


# -- the workloads, one per dialect -------------------------------------------------------


@dataclass
class Ending:
    """How a workload ended, as the runner saw it."""

    verified: bool = False
    killed: bool = False  # by SIGKILL
    wrong: int = 0
    verified_bytes: int = 0
    children_killed: int = 0
    reason: str = ""  # what reached the restorer, if anything did
    detail: str = ""


class Workload:
    """A dialect's restored side: prepared before the daemon starts, then driven in a
    thread (so the runner can kill and restart the daemon meanwhile)."""

    def __init__(self, scenario: Scenario, assets: Assets, run: Path) -> None:
        self.scenario = scenario
        self.assets = assets
        self.run = run
        self._steps = 0
        self._stepped = threading.Condition()
        self.done = threading.Event()
        self.ending = Ending()
        self.pidfds: dict[int, int] = {}
        """The restored tree's processes (pid -> pidfd), opened as each became known."""
        self.daemon: subprocess.Popen[bytes] | None = None
        """The first daemon (set before :meth:`start`)."""
        self._thread: threading.Thread | None = None

    def prepare(self) -> None:
        """Anything the daemon must find when it starts (a dump)."""

    def daemon_args(self, pages: str) -> list[str]:
        raise NotImplementedError

    def ready_path(self) -> Path:
        raise NotImplementedError

    def state_args(self, deadline: float) -> list[str]:
        """The serving command's state directory (fresh) and resume deadline."""
        return ["--state-dir", str(self.run / "state"), "--resume-deadline", str(deadline)]

    def drive(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """The workload took one more step (the handover is the first)."""
        with self._stepped:
            self._steps += 1
            self._stepped.notify_all()

    def wait_step(self, count: int) -> None:
        """Until the workload took ``count`` steps or ended."""
        with self._stepped:
            if not self._stepped.wait_for(lambda: self._steps >= count or self.done.is_set(), WAIT):
                raise TimeoutError(f"the workload never took {count} steps")

    def start(self) -> None:
        def body() -> None:
            try:
                self.drive()
            except Exception as exc:
                self.ending.detail = f"the driver failed: {type(exc).__name__}: {exc}"
            finally:
                self.done.set()
                self.step()

        self._thread = threading.Thread(target=body, name=f"drive-{self.scenario.dialect}")
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(WAIT)

    def known(self, pid: int) -> None:
        """``pid`` belongs to the restored tree: hold a pidfd of it (gone already: dead)."""
        with contextlib.suppress(ProcessLookupError):
            self.pidfds[pid] = os.pidfd_open(pid)

    def kill(self) -> None:
        """Leave nothing running (called whatever happened), by pidfd: never a stranger
        that got a dead process's pid."""
        for pidfd in self.pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    def close(self) -> None:
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.pidfds.clear()

    def alive(self) -> list[int]:
        """The pids of the restored tree still running (a pidfd polls readable once its
        process exited)."""
        return [pid for pid, fd in self.pidfds.items() if not select.select([fd], [], [], 0)[0]]


class NativeWorkload(Workload):
    """The demo workload in storm mode, restored through the native handover."""

    def daemon_args(self, pages: str) -> list[str]:
        source = ["--page-server", pages] if pages else ["--images", str(self.assets.images)]
        return ["daemon", "--handover", str(self.run / "handover.sock"), *source]

    def ready_path(self) -> Path:
        return self.run / "handover.sock"

    def drive(self) -> None:
        with open(self.run / "workload.err", "wb") as stderr:
            restored = start_restored(
                self.run / "handover.sock",
                "demo",
                mode="storm",
                extra=("--storm-seed", str(self.scenario.seed), "--rounds", "24"),
                stderr=stderr,
            )
        self.known(restored.process.pid)
        assert restored.process.stdout is not None
        code: int | None = None
        for line in restored.process.stdout:
            event: dict[str, Any] = json.loads(line)
            restored.events.append(event)
            if event["event"] in ("handed_over", "phase"):
                self.step()
            elif event["event"] == "forked":
                self.known(int(event["pid"]))
        code = restored.process.wait(WAIT)
        restored.process.stdout.close()
        self._conclude(restored, code)

    def _conclude(self, restored: Restored, code: int) -> None:
        ending = self.ending
        phases = [e for e in restored.events if e["event"] == "phase"]
        ending.wrong = sum(int(p["mismatches"]) for p in phases)
        done = [e for e in restored.events if e["event"] == "done"]
        failed = [str(e["reason"]) for e in restored.events if e["event"] == "failed"]
        stderr = (self.run / "workload.err").read_text(errors="replace")
        ending.reason = " ".join([*failed, stderr])
        if done:
            ending.wrong = max(ending.wrong, int(done[-1]["mismatches"]))
            ending.verified_bytes = int(done[-1]["verified_bytes"])
            ending.children_killed = int(done[-1].get("killed_children", 0))
        ending.killed = code == -signal.SIGKILL
        ending.verified = code == 0 and bool(done) and bool(done[-1]["ok"])
        if not ending.verified and not ending.killed:
            tail = restored.events[-3:]
            ending.detail = f"workload exit {code}; last events {tail}; stderr {stderr[-400:]!r}"


class CriuWorkload(Workload):
    """A CRIU-restored tree (support/criu_tree.py, script "ops"), its dump, criu's part."""

    TASKS_WITH_OPS = 2
    REPORTS: ClassVar[dict[str, int]] = {"ops_done": 2, "verified": 4, "forked": 2}

    def prepare(self) -> None:
        self.dump = self.run / "dump"
        self.work = self.run / "criu-work"
        self.work.mkdir(parents=True)
        self.tree = Tree.start(tree_spec("ops"), self.run / "spec.json")
        for pid in self.tree.pids.values():
            self.known(pid)
        write_dump(self.dump, self.tree)

    def daemon_args(self, pages: str) -> list[str]:
        if self.scenario.command == "lazy-pages":
            extra = ["--page-server", "--address", pages] if pages else []
            command = lazy_pages_command(self.dump, self.work, *extra)
            return command[3:]  # without the interpreter and "-m uffdd"
        source = ["--page-server", pages] if pages else []
        return ["daemon", "--handover", str(self.run / "handover.sock"), *source,
                "--criu-images", str(self.dump), "--criu-work-dir", str(self.work)]  # fmt: skip

    def ready_path(self) -> Path:
        return self.work / "lazy-pages.socket"

    def state_args(self, deadline: float) -> list[str]:
        # `uffdd lazy-pages` takes CRIU's options only: its state directory is in the
        # work directory, its resume deadline the default one.
        return [] if self.scenario.command == "lazy-pages" else super().state_args(deadline)

    def drive(self) -> None:
        tree = self.tree
        assert self.daemon is not None
        lazy = LazyPages(self.daemon, self.run / "daemon-1.log")
        restorer = Restorer(lazy.connect(self.work))
        restorer.hand_over(tree)
        self.step()
        try:
            self._follow(tree, restorer)
        except EOFError:
            # every task hung up: check how they ended
            self.ending.killed = tree.proc.wait(WAIT) == -signal.SIGKILL
            self._wrong_from(tree.reports)
            if not self.ending.killed:
                self.ending.detail = f"the tree ended with {tree.proc.returncode}: {tree.reports}"
            return
        finally:
            with contextlib.suppress(OSError):
                restorer.sock.close()
        self._wrong_from(tree.reports)
        code = tree.close()
        self.ending.verified = self.ending.wrong == 0 and code == 0
        if not self.ending.verified:
            self.ending.detail = f"the tree ended with {code}: {tree.reports}"

    def _follow(self, tree: Tree, restorer: Restorer) -> None:
        """criu restore's part after the handover: RSTF once the tasks' operations ran;
        then until every task and forked child reported its check."""
        finished = False
        while True:
            counts = {key: sum(key in r for r in tree.reports) for key in self.REPORTS}
            if counts["ops_done"] >= self.TASKS_WITH_OPS and not finished:
                finished = True
                with contextlib.suppress(OSError):  # the daemon may be dead by now
                    restorer.finish()
            if all(counts[key] >= count for key, count in self.REPORTS.items()):
                return
            tree.receive()
            self.step()

    def _wrong_from(self, reports: list[dict[str, Any]]) -> None:
        bad = [r for r in reports if r.get("ok") is False]
        self.ending.wrong = len(bad)
        if bad:
            self.ending.detail = f"wrong bytes: {bad}"
        self.ending.verified_bytes = sum(int(r.get("pages", 0)) for r in reports) * PAGE

    def kill(self) -> None:
        super().kill()
        if hasattr(self, "tree"):
            with contextlib.suppress(Exception):
                self.tree.close()


class FirecrackerWorkload(Workload):
    """The test VMM (support/firecracker_vmm.py): balloons, then reads all guest memory."""

    def daemon_args(self, pages: str) -> list[str]:
        sock = ["--socket", str(self.run / "fc.sock")]
        if pages:
            return ["firecracker", *sock, "--image", "vm", "--page-server", pages]
        return ["firecracker", *sock, "--image-dir", str(self.assets.fc_images / "vm")]

    def ready_path(self) -> Path:
        return self.run / "fc.sock"

    def drive(self) -> None:
        config = {
            "socket": str(self.run / "fc.sock"),
            "memfile": str(self.assets.memfile),
            "sets": [FC_REGIONS],
            "balloon": FC_BALLOON,
        }
        with open(self.run / "vmm.err", "wb") as stderr:
            vmm = subprocess.Popen(
                [sys.executable, str(VMM_SCRIPT), json.dumps(config)],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        self.known(vmm.pid)
        assert vmm.stdout is not None
        steps: list[dict[str, Any]] = []
        for line in vmm.stdout:
            step: dict[str, Any] = json.loads(line)
            steps.append(step)
            self.step()
        code = vmm.wait(WAIT)
        vmm.stdout.close()
        names = [s["step"] for s in steps]
        self.ending.wrong = names.count("mismatch")
        self.ending.killed = code == -signal.SIGKILL
        self.ending.verified = code == 0 and "verified" in names and not self.ending.wrong
        if self.ending.verified:
            self.ending.verified_bytes = int(steps[-1]["bytes"])
        elif not self.ending.killed:
            err = (self.run / "vmm.err").read_text(errors="replace")[-400:]
            self.ending.detail = f"the VMM ended with {code}: {steps}; stderr {err!r}"


WORKLOADS: dict[str, type[Workload]] = {
    "native": NativeWorkload,
    "criu": CriuWorkload,
    "firecracker": FirecrackerWorkload,
}


# -- one run ------------------------------------------------------------------------------


def _logs(run: Path) -> list[Path]:
    """Everything the daemons and the keeper wrote (their logs, the state directory)."""
    found = []
    for directory, _, files in os.walk(run):  # a keeper may remove its journal meanwhile
        for name in files:
            path = Path(directory) / name
            if path.suffix == ".log" or any("state" in p for p in path.parts):
                found.append(path)
    return sorted(found)


def _logged(run: Path, text: str) -> bool:
    """Whether any log of the run holds ``text``."""
    return any(
        text in path.read_text(errors="replace") for path in _logs(run) if path.suffix == ".log"
    )


def _leftovers(run: Path) -> dict[int, str]:
    """Processes still running whose command line names this run's directory (a daemon,
    its keeper, a page server): pid -> command line."""
    mark = str(run)
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            command = _command_line(int(entry.name))
            if mark in command:
                found[int(entry.name)] = command
    return found


def _kill_if_still(pid: int, command: str) -> None:
    """SIGKILL ``pid`` by a pidfd, if it is still the process running ``command``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(OSError):
            if _command_line(pid) == command:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _command_line(pid: int) -> str:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _wait_either(daemon: subprocess.Popen[bytes], workload: Workload) -> None:
    """Until the daemon exits or the workload is done (a hang guard bounds it)."""
    deadline = time.monotonic() + WAIT
    while daemon.poll() is None and not workload.done.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("neither the daemon nor the workload ended")
        workload.done.wait(0.02)


def run_one(scenario: Scenario, assets: Assets, base: Path) -> Result:
    """Run ``scenario`` in a fresh directory under ``base``; everything is stopped after."""
    run = base / f"run-{scenario.seed}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    workload = WORKLOADS[scenario.dialect](scenario, assets, run)
    try:
        with ExitStack() as stack:
            result = _run(scenario, assets, run, workload, stack)
    except Exception as exc:
        result = Result(scenario, FAILED, f"the runner failed: {type(exc).__name__}: {exc}")
    finally:
        workload.kill()
        workload.join()
        workload.close()
    left = _leftovers(run)
    if left:
        # a keeper may still be waiting out its deadline: give it that long, then some
        deadline = RESTART_DEADLINE if scenario.restart else DEFAULT_DEADLINE
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not _leftovers(run), "", deadline + LEAVE)
        left = _leftovers(run)
    for pid, command in left.items():
        _kill_if_still(pid, command)
    if left:
        result.outcome = FAILED
        result.detail = f"processes left running after the run: {left}; {result.detail}"
    if result.outcome != FAILED:
        shutil.rmtree(run, ignore_errors=True)
    return result


def _run(
    scenario: Scenario, assets: Assets, run: Path, workload: Workload, stack: ExitStack
) -> Result:
    pages = ""
    if scenario.source == "page-server":
        images = assets.fc_images if scenario.dialect == "firecracker" else assets.images
        if scenario.dialect == "criu":
            images = run / "dump"
        workload.prepare()
        _, pages = stack.enter_context(page_server(run, images, "--bulk-rate-limit", BULK_RATE))
    else:
        workload.prepare()
    deadline = RESTART_DEADLINE if scenario.restart else GIVE_UP_DEADLINE
    state = workload.state_args(deadline)
    command = uffdd_command(*workload.daemon_args(pages), *state, "--log-format", "json")
    env = {} if scenario.point is None else {"UFFDD_CRASH_AT": f"{scenario.point}:{scenario.nth}"}
    daemon = start(command, run / "daemon-1.log", env)
    stack.callback(stop, daemon)
    wait_for_path(workload.ready_path(), "the daemon", daemon, run / "daemon-1.log")
    workload.daemon = daemon
    workload.start()
    if scenario.point in (None, "grace"):
        _kill_later(scenario, daemon, workload)
    _wait_either(daemon, workload)
    died = daemon.poll() == -signal.SIGKILL
    if died and scenario.restart:
        second = start(command, run / "daemon-2.log")
        stack.callback(stop, second)
    if not workload.done.wait(WAIT):
        return Result(scenario, FAILED, "the workload did not end", daemon_killed=died)
    workload.join()
    return _classify(scenario, run, workload, died)


def _kill_later(scenario: Scenario, daemon: subprocess.Popen[bytes], workload: Workload) -> None:
    """The outside fault: ``delay`` seconds after the workload's ``mark``-th step (a
    random moment of the run, not a wait for anything), SIGKILL (or SIGTERM for the
    grace point)."""
    workload.wait_step(scenario.mark)
    if workload.done.wait(scenario.delay) or daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM if scenario.point == "grace" else signal.SIGKILL)


def _classify(scenario: Scenario, run: Path, workload: Workload, died: bool) -> Result:
    ending = workload.ending

    def result(outcome: str, detail: str = "") -> Result:
        return Result(
            scenario, outcome, detail or ending.detail, ending.wrong, ending.verified_bytes, died
        )

    if ending.wrong:
        return result(FAILED, f"{ending.wrong} wrong: {ending.detail}")
    if ending.verified:
        second = run / "daemon-2.log"
        resumed = second.exists() and RESUMED_EVENT in second.read_text(errors="replace")
        if not (died and resumed):
            # the kill came after the work was done (or the point was never reached)
            return result(FINISHED_FIRST)
        if not scenario.restart:
            return result(FAILED, "no daemon was started again, yet one resumed")
        if ending.children_killed:
            if not kill_reasons(_logs(run)):
                return result(FAILED, "a child was killed and no log says why")
            return result(CHILD_KILLED)
        return result(RESUMED)
    if not died:
        # SIGTERM with nothing being served yet never reaches the grace crash point: the
        # graceful stop itself kills a VMM half-way through its handover, and says why.
        stopped = "uffdd stopped during the handover"
        ended = ending.killed or scenario.dialect == "criu"  # (its double: see below)
        if scenario.point == "grace" and ended and _logged(run, stopped):
            return result(STOPPED, stopped)
        return result(FAILED, f"the daemon did not die and the workload failed: {ending.detail}")
    if not ending.killed:
        stopped = "uffdd stopped during the handover"
        partial = [r for r in kill_reasons(_logs(run)) if DEADLINE_REASON in r]
        if scenario.dialect == "criu" and partial and "said nothing" in ending.detail:
            # uffdd serves each CRIU task as a tree of its own: the tasks that became
            # resident in time ended well, the others were killed; the test double
            # waits for every task's report, so it is the runner that ends it.
            return result(KILLED, "; ".join(sorted(set(partial))))
        if scenario.dialect == "criu" and _logged(run, stopped):
            # criu restore fails a restore whose handover broke and kills its tree; the
            # test double of it only stops talking: its tasks are ended by the runner.
            return result(STOPPED, stopped)
        return result(FAILED, f"neither completed nor killed: {ending.detail}")
    # SIGKILL is prompt but not instant: the root's exit may be seen before a child's
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not workload.alive(), "", LEAVE)
    alive = workload.alive()
    if alive:
        return result(FAILED, f"the tree was not killed whole: {alive} alive")
    reasons = kill_reasons(_logs(run))
    if not reasons:
        return result(FAILED, f"the tree was killed and no {KILLED_TREE!r} says why")
    if any(IN_HANDOVER in r for r in reasons):
        if not all(IN_HANDOVER in r or UNPROVEN in r or DEADLINE_REASON in r for r in reasons):
            return result(FAILED, f"a cut handover, killed for another reason too: {reasons}")
        return result(HANDOVER_KILL, "; ".join(sorted(set(reasons))))
    unprovable = all(UNPROVEN in r for r in reasons)
    if unprovable and scenario.point not in UNPROVABLE:
        return result(FAILED, f"killed as unprovable after {scenario.point}: {reasons}")
    if unprovable:
        return result(UNPROVABLE_KILL, "; ".join(sorted(set(reasons))))
    if scenario.restart:
        return result(FAILED, f"a daemon was started again, yet the tree was killed: {reasons}")
    if not all(DEADLINE_REASON in r or UNPROVEN in r for r in reasons):
        return result(FAILED, f"killed for another reason: {reasons}")
    return result(KILLED, "; ".join(sorted(set(reasons))))


@contextlib.contextmanager
def scratch(base: Path | None = None) -> Iterator[Path]:
    """A directory for assets and runs (kept when given, removed when made here)."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        yield base
        return
    made = Path(os.environ.get("TMPDIR", "/tmp")) / f"uffdd-faults-{os.getpid()}"
    made.mkdir(parents=True, exist_ok=True)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def summary(results: list[Result], out: IO[str]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for item in results:
        counts[item.outcome] += 1
    wrong = sum(r.wrong for r in results)
    verified = sum(r.verified_bytes for r in results)
    kills = sum(r.daemon_killed for r in results)
    print(
        f"\n{len(results)} runs, {kills} daemon kills, {verified / MIB:.1f} MiB verified, "
        f"{wrong} wrong",
        file=out,
    )
    print(f"  {'':<24} {'all':>5}" + "".join(f" {d:>12}" for d in DIALECTS), file=out)
    for name in OUTCOMES:
        per = [
            sum(r.outcome == name and r.scenario.dialect == d for r in results) for d in DIALECTS
        ]
        print(f"  {name:<24} {counts[name]:>5}" + "".join(f" {n:>12}" for n in per), file=out)
    return counts
