"""Start and stop the daemon's keeper twin (``native/csrc/twin.c``).

Why a twin: the daemon must never be the last holder of a uffd (its death would leave
the restored process reading zeros). The twin shares the daemon's descriptor table, so
it holds every uffd from the instant the daemon does, a FORK child's included, at no
cost to the fault path. When the daemon dies the twin becomes the keeper
(``keeper/run.py``); when the daemon stops cleanly it kills its twin first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from uffdd.log import get_logger
from uffdd.native._ffi import ffi, lib

_log = get_logger("uffdd.keeper.twin")


class Twin:
    """The running twin of this process."""

    def __init__(self, state_dir: Path, generation: str, resume_deadline: float, log_format: str):
        self._argv = [
            sys.executable,
            "-m",
            "uffdd.keeper",
            "--state-dir",
            str(state_dir),
            "--generation",
            generation,
            "--resume-deadline",
            repr(resume_deadline),
            "--log-format",
            log_format,
        ]
        self._self_pidfd = os.pidfd_open(os.getpid())
        self.pid = 0
        self.pidfd = -1
        self.spawn()

    def spawn(self) -> None:
        """Start a twin (again: the last one died)."""
        keep = [ffi.new("char[]", arg.encode()) for arg in self._argv]
        argv = ffi.new("char *[]", [*keep, ffi.NULL])
        env = [ffi.new("char[]", f"{k}={v}".encode()) for k, v in os.environ.items()]
        envp = ffi.new("char *[]", [*env, ffi.NULL])
        pid = int(lib.uffdd_twin_spawn(self._self_pidfd, keep[0], argv, envp))
        if pid < 0:
            raise OSError(-pid, f"cannot start the keeper twin: {os.strerror(-pid)}")
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    def reap(self) -> None:
        """The twin died (its pidfd is readable): collect it."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)
        os.close(self.pidfd)
        self.pidfd = -1

    def close(self) -> None:
        """Stop the twin (a clean stop: every process it could have kept has ended)."""
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            os.close(self.pidfd)
            self.pidfd = -1
        if self._self_pidfd >= 0:
            os.close(self._self_pidfd)
            self._self_pidfd = -1
