"""uffdd's benchmark suite: every scenario with its reference measured in the same run.

Run::

    .venv/bin/python bench/run.py [--quick] [--scenario local,remote,residency,many,restart]
                                  [--engine NAME=VALUE ...]

Why one command: the figures in bench/README.md must be reproducible as they are.
Each scenario prints a Markdown table (measured | reference | ratio | target) and
power-of-two microsecond latency histograms. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import local, machine, many, profile, remote, residency, restart, services
from suite.build import BUILD_DIR, Built, build

from uffdd.config import Engine, build_engine, engine_pairs
from uffdd.core.errors import ConfigError

Scenario = Callable[[Built, Path, Path, bool], str]
SCENARIOS: dict[str, Scenario] = {
    "local": local.run,
    "remote": remote.run,
    "residency": residency.run,
    "many": many.run,
    "restart": restart.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description="uffdd benchmark suite")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument(
        "--images", type=Path, default=BUILD_DIR / "images", help="image cache directory"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy record every daemon into this directory"
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        metavar="MIB",
        help="experiment: the daemon's max_inflight_bytes (default: uffdd's, 64 MiB)",
    )
    parser.add_argument(
        "--fault-around",
        type=int,
        metavar="KIB",
        help="experiment: the daemon's fault_around (default: uffdd's, 64 KiB)",
    )
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="experiment: an engine knob for every daemon and page server (uffdd.config."
        "Engine, e.g. demand_lane=off, install_thread=off, urgent_thread=off); repeatable. "
        "$UFFDD_ENGINE reaches them too.",
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.scenario.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        choices = ", ".join(SCENARIOS)
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {choices}")
    if os.geteuid() != 0:
        print("note: userfaultfd with EVENT_FORK needs root or CAP_SYS_PTRACE", file=sys.stderr)
    if args.max_inflight:
        services.DAEMON_ARGS += ["--max-inflight", str(args.max_inflight << 20)]
        print(f"experiment: daemon max_inflight_bytes = {args.max_inflight} MiB")
    if args.fault_around:
        services.DAEMON_ARGS += ["--fault-around", str(args.fault_around << 10)]
        print(f"experiment: daemon fault_around = {args.fault_around} KiB")
    try:
        engine = build_engine(None, engine_pairs(os.environ, args.engine))
    except ConfigError as exc:
        parser.error(str(exc))
    for knob in args.engine:
        services.DAEMON_ARGS += ["--engine", knob]
        services.PAGE_SERVER_ARGS += ["--engine", knob]
    if engine != Engine():
        print(f"experiment: engine {engine}")
    if args.profile is not None:
        if not (shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists()):
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
        services.PROFILE["dir"] = args.profile.resolve()
    built = build()
    print(machine.describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-") as work:
        for name in names:
            started = time.monotonic()
            output = SCENARIOS[name](built, Path(work), args.images, args.quick)
            print(f"\n{output}", flush=True)
            print(
                f"\n({name}: {time.monotonic() - started:.0f} s; load average now "
                f"{machine.load_average()})",
                flush=True,
            )
    if args.profile is not None:
        for recorded in sorted(args.profile.glob("*.txt")):
            print(f"\n{profile.summarize(recorded)}", flush=True)
            cpu = recorded.with_suffix(".cpu")
            if cpu.exists():
                print(f"CPU seconds by thread: {cpu.read_text().strip()}", flush=True)


if __name__ == "__main__":
    main()
