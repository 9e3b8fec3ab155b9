"""Two checkouts of uffdd measured in the same run: a benchmark alternated between them.

Run::

    .venv/bin/python bench/versus.py OTHER_CHECKOUT [--rounds 3] [--out DIR] -- \\
        bench/run.py --quick

Why: absolute times on a shared VM drift by 2-3x between consecutive runs, so "the same
figures as before" can only be judged against the previous version measured beside
this one. Each round runs the benchmark command once in each checkout (each with its
own ``.venv`` and its own build of the references), the order alternating between
rounds so neither side always runs first; every output is kept in ``--out``, and the
Markdown tables are printed row by row, the two checkouts' rounds one under the other.
Each benchmark still carries its own in-run reference (C handler, plain read...), so a
row's ratio column is comparable across the two sides even when the machine drifts.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
_NUMBER = re.compile(r"^[<>=~]*\s*-?[\d.]+")
_LABEL = re.compile(r"^([^\d(]*?)\s{2,}(\d.*)$")
"""An indented figures line: a label, two spaces or more, then figures."""


def run(checkout: Path, command: list[str], log: Path) -> str:
    """The benchmark's output in ``checkout`` (its own venv), kept in ``log``."""
    python = checkout / ".venv" / "bin" / "python"
    started = time.monotonic()
    done = subprocess.run(
        [str(python), *command], cwd=checkout, capture_output=True, text=True, check=False
    )
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{checkout}: {' '.join(command)} failed ({done.returncode}); see {log}")
    print(f"  {checkout}: {time.monotonic() - started:.0f} s", flush=True)
    return done.stdout


def tables(output: str) -> dict[str, dict[str, list[str]]]:
    """Every table of ``output`` under its heading: row key -> cells.

    Two shapes: Markdown tables under ``## heading`` (``run.py``), whose row key is its
    leading cells up to the first number (e.g. "same CPU | p50 us"), at least the first,
    and whose cells are the rest (a row without a number is a header); and indented
    ``label  figures`` lines under a ``[heading]`` line (``bench_page_server.py``), keyed
    by the label."""
    found: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in output.splitlines():
        if line.startswith("## ") or (line.startswith("[") and line.endswith("]")):
            heading = line[3:].split(" (")[0] if line.startswith("## ") else line[1:-1]
            found.setdefault(heading, {})
        elif line.startswith("  ") and heading and not line.startswith("  <"):
            label = _LABEL.match(line.strip())
            if label and label.group(2):
                found.setdefault(heading, {})[label.group(1).strip()] = [label.group(2)]
        elif line.startswith("|") and not set(line) <= set("|- "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            numbers = [i for i, c in enumerate(cells) if _NUMBER.match(c)]
            if not numbers:
                continue  # a header row
            first = max(numbers[0], 1)  # a row keyed by a number (N = 8) keeps it as key
            found.setdefault(heading, {})[" | ".join(cells[:first])] = cells[first:]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (with its own .venv)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "bench" / "build" / "versus")
    parser.add_argument(
        "--again", action="store_true", help="print the outputs kept in --out, run nothing"
    )
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("give the benchmark command after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    sides = {"other": args.other.resolve(), "this": HERE}
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, dict[str, list[str]]]]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        print(f"round {round_ + 1}: {' then '.join(order)}", flush=True)
        for name in order:
            log = args.out / f"{name}-{round_ + 1}.txt"
            output = log.read_text() if args.again else run(sides[name], command, log)
            results[name].append(tables(output))
    print(f"\nother = {sides['other']}, this = {sides['this']}; outputs in {args.out}")
    for heading, rows in results["this"][0].items():
        print(f"\n## {heading}")
        for key in rows:
            print(f"{key}")
            for round_ in range(args.rounds):
                for name in sides:
                    cells = results[name][round_].get(heading, {}).get(key)
                    shown = " | ".join(cells) if cells is not None else "(missing)"
                    print(f"    {name:5} #{round_ + 1}: {shown}")


if __name__ == "__main__":
    main()
