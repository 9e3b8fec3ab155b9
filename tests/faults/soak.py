"""The soak command: ``python tests/faults/soak.py --runs 500`` kills the daemon 500 times.

Why a script beside the suite: CI runs a few scenarios per dialect
(``tests/faults/test_faults.py``); a soak runs the same runner for as many seeded runs as
asked and prints each outcome and the counts. It exits 1 if any run failed, printing
the seed and the command that replays that run alone.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support, faults

from faults.runner import DIALECTS, FAILED, Assets, Scenario, run_one, scratch, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="How many runs.")
    parser.add_argument("--seed", type=int, help="The first run's seed (default: random).")
    parser.add_argument("--dialect", choices=DIALECTS, help="Only this dialect.")
    parser.add_argument(
        "--restart",
        choices=("always", "never"),
        help="Restart the daemon in every run, or in none (default: drawn per run).",
    )
    parser.add_argument(
        "--source", choices=("page-server", "images"), help="Only this page source."
    )
    parser.add_argument("--workdir", type=Path, help="Keep assets and failed runs here.")
    args = parser.parse_args(argv)
    first = random.SystemRandom().randrange(1 << 31) if args.seed is None else args.seed
    restart = None if args.restart is None else args.restart == "always"
    print(f"uffdd fault soak: {args.runs} runs from seed {first}", flush=True)
    results = []
    with scratch(args.workdir) as base:
        assets = Assets.build(base / "assets")
        for index in range(args.runs):
            scenario = Scenario.draw(first + index, args.dialect, restart, args.source)
            result = run_one(scenario, assets, base)
            results.append(result)
            print(f"{index + 1:>5} {result.line()}", flush=True)
    counts = summary(results, sys.stdout)
    failed = [r.scenario.seed for r in results if r.outcome == FAILED]
    if failed:
        print(f"failed seeds: {failed}")
    return 1 if counts[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
