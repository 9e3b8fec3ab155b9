"""A lazy restore survives the death of uffdd.service under a real systemd 252.

Why under systemd: what saves the restore there is systemd's own doing (KillMode=process
leaves the keeper alive, Restart= starts the daemon again, the fd store hands back what
the daemon stored, ``systemctl kill --kill-whom=all`` takes the keeper too), and only the
real service manager shows that these fit together.

Each test boots a container (nspawn.py), installs the shipped uffdd.socket and
uffdd.service, runs a page server throttled to 4 MB/s (so the restore lasts seconds) as
a transient unit, and the demo workload (which checks every byte it reads against the
snapshot) as a transient unit of its own, outside uffdd.service's cgroup, writing its
JSON events to a file. Once the workload has had demand faults served and is not yet
resident, uffdd.service is killed:

- with a restart (main process SIGKILLed or SIGABRTed: the keeper hands everything
  back; every process of the unit SIGKILLed: the fd store does), the workload must
  finish with every byte right and the new daemon's journal must say "resumed";
- without one (Restart=no, or a stop before the restart), the keeper must kill the
  workload at ``resume_deadline``, with its reason in the unit's journal, and no page
  may have been read wrong.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn import PYTHON, UFFDD, Container, install_shipped_units
from support.lazy_restore import SEED, SIZE_MIB, make_demo_image
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

SHARED = "/var/lib/uffdd-test"
"""Where the test's tmp_path appears inside (the workload's events are written there)."""
IMAGES = "/var/lib/uffdd/images"
"""Where the demo image appears inside (the shipped page-server unit's image root)."""
PAGES = "/run/uffdd-pages/pages.sock"
HANDOVER = "/run/uffdd/handover.sock"

RESTART_CONFIG = f'[daemon]\npage_server = "unix:{PAGES}"\n'
"""The daemon's settings for a restart: the shipped ``resume_deadline`` (5 s), which must
cover uffdd.service's RestartSec=2, its ExecStartPre check and the new daemon's start."""
DEADLINE = 2
NO_RESTART = "[Service]\nRestart=no\n"

_names = itertools.count()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_demo_image(root, "demo")
    return root


@pytest.fixture
def container(tmp_path: Path, images: Path) -> Iterator[Container]:
    binds = [f"{tmp_path}:{SHARED}", f"{images}:{IMAGES}"]
    with Container(f"uffdd-death-{os.getpid()}-{next(_names)}", binds=binds) as booted:
        yield booted


class Restore:
    """uffdd.service, a page server and the demo workload, running in ``container``."""

    def __init__(self, container: Container, events: Path) -> None:
        self.container = container
        self.events_file = events

    def start(self) -> None:
        c = self.container
        c.systemctl("start", "uffdd.socket", "uffdd.service")
        c.run(
            "systemd-run", "--unit=pages", "-p", "RuntimeDirectory=uffdd-pages",
            str(UFFDD), "page-server", "--images", IMAGES, "--listen", f"unix:{PAGES}",
            "--ready-file", "/run/uffdd-pages/ready", "--bulk-rate-limit", "4M",
            "--log-format", "json",
        )  # fmt: skip
        wait_until(
            lambda: c.run("test", "-e", "/run/uffdd-pages/ready", check=False).returncode == 0,
            lambda: f"the page server ready\n{c.journal('pages.service')}",
        )
        # --remain-after-exit: the unit (and how its process ended) stays to be read.
        c.run(
            "systemd-run", "--unit=workload", "--remain-after-exit",
            "-p", f"StandardOutput=file:{SHARED}/{self.events_file.name}",
            str(PYTHON), "-m", "uffdd.demo.workload", "restored",
            "--size-mib", str(SIZE_MIB), "--seed", str(SEED),
            "--handover", HANDOVER, "--image", "demo", "--resident-timeout", "60",
        )  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        """The workload's events so far (whole lines only)."""
        if not self.events_file.exists():
            return []
        lines = self.events_file.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == name]

    def wait_served_not_resident(self, phase: str = "") -> None:
        """Until demand faults were served (a phase checked: ``phase`` if named) and the
        workload is not yet resident; fails if it became resident first (nothing left
        to lose)."""
        wait_until(
            lambda: any(not phase or p["name"] == phase for p in self.named("phase")),
            lambda: f"a phase of the workload: {self.events()[-3:]}\n{self.journal()}",
            timeout=60,
        )
        assert not self.named("resident"), "resident before the kill: the test proves nothing"

    def wait_workload_ended(self) -> None:
        wait_until(
            lambda: self.container.show("workload.service", "SubState") != "running",
            lambda: f"the workload's end: {self.events()[-3:]}\n{self.journal()}",
            timeout=120,
        )

    def journal(self) -> str:
        return self.container.journal("uffdd.service")

    def daemon_events(self) -> list[dict[str, Any]]:
        """uffdd.service's JSON log lines: every daemon's and keeper's."""
        return [json.loads(x) for x in self.journal().splitlines() if x.startswith("{")]

    def seen(self) -> str:
        """What a failed assertion shows: the workload's last events and the errors
        uffdd.service logged (a kill and its reason among them)."""
        errors = [e for e in self.daemon_events() if e["level"] in ("error", "critical")]
        return f"workload: {self.events()[-3:]}\nuffdd.service errors: {errors}"

    def assert_no_wrong_page(self) -> None:
        phases = self.named("phase")
        assert phases
        assert all(p["mismatches"] == 0 for p in phases), self.seen()

    def assert_done_every_byte_right(self) -> None:
        c = self.container
        assert c.show("workload.service", "Result") == "success", self.seen()
        assert c.show("workload.service", "ExecMainStatus") == "0"
        (done,) = self.named("done")
        assert done["ok"] is True, done
        assert done["mismatches"] == 0
        self.assert_no_wrong_page()
        # Every byte checked while served, and again once fully resident.
        names = [p["name"] for p in self.named("phase")]
        assert names[-2:] == ["every byte, all regions", "every byte again, fully resident"]
        logged = self.daemon_events()
        assert [e["event"] for e in logged].count("resumed") == 1, self.journal()
        assert any(e["event"] == "fully resident" for e in logged)


@pytest.fixture
def restore(container: Container, tmp_path: Path) -> Restore:
    return Restore(container, tmp_path / "events.jsonl")


def _kill_and_resume(restore: Restore, whom: str, signal: str, phase: str = "") -> int:
    """Kill uffdd.service mid-restore (after the workload's ``phase``, if named); wait
    for the workload's end. The daemon's main pid before the kill."""
    c = restore.container
    install_shipped_units(c, RESTART_CONFIG)
    restore.start()
    restore.wait_served_not_resident(phase)
    first = c.show("uffdd.service", "MainPID")
    # The daemon stored each uffd, pidfd and restorer connection in the fd store.
    assert int(c.show("uffdd.service", "NFileDescriptorStore")) > 0
    c.systemctl("kill", f"--kill-whom={whom}", f"--signal={signal}", "uffdd.service")
    restore.wait_workload_ended()
    restore.assert_done_every_byte_right()
    assert c.show("uffdd.service", "NRestarts") == "1"
    assert c.show("uffdd.service", "MainPID") != first
    return int(first)


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGABRT"])
def test_the_main_process_dies_the_keeper_hands_everything_back(
    restore: Restore, signal: str
) -> None:
    # KillMode=process: the keeper outlives the daemon in the unit's cgroup; SIGABRT is
    # what systemd's watchdog sends.
    _kill_and_resume(restore, "main", signal)
    logged = [e["event"] for e in restore.daemon_events()]
    assert "a daemon took the processes back" in logged, restore.journal()


def test_the_whole_unit_dies_the_fd_store_gives_everything_back(restore: Restore) -> None:
    # The keeper is SIGKILLed with the daemon: only systemd's fd store still holds the
    # uffds, and the restarted daemon resumes from it alone. After the workload's forks:
    # a FORK read in the last moments before such a kill has its child's uffd in no
    # store yet (docs/operations.md: the one window the fd store alone leaves).
    _kill_and_resume(restore, "all", "SIGKILL", phase="fork tree, 3 levels, untouched memory")
    logged = [e["event"] for e in restore.daemon_events()]
    assert "a daemon took the processes back" not in logged, restore.journal()
    assert "the daemon died: holding its processes for a daemon to resume them" not in logged


@pytest.mark.parametrize("no_restart", ["Restart=no", "systemctl stop"])
def test_without_a_restart_the_keeper_kills_the_workload_and_says_why(
    restore: Restore, container: Container, no_restart: str
) -> None:
    install_shipped_units(container, f"{RESTART_CONFIG}resume_deadline = {DEADLINE}\n")
    if no_restart == "Restart=no":
        container.install_unit("uffdd.service.d/no-restart.conf", NO_RESTART)
    restore.start()
    restore.wait_served_not_resident()
    container.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", "uffdd.service")
    if no_restart == "systemctl stop":
        # Within RestartSec: the stop cancels the restart (and empties the fd store,
        # which the keeper, alive, does not need).
        container.systemctl("stop", "uffdd.service")
    restore.wait_workload_ended()
    assert container.show("workload.service", "Result") == "signal", restore.seen()
    assert container.show("workload.service", "ExecMainStatus") == "9"  # SIGKILL
    assert not restore.named("done")
    restore.assert_no_wrong_page()
    assert container.show("uffdd.service", "NRestarts") == "0"
    (killed,) = [e for e in restore.daemon_events() if e["event"] == "killed restore tree"]
    assert f"no daemon resumed within {DEADLINE} s" in killed["reason"], killed
