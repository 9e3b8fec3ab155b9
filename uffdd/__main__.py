"""``python -m uffdd ...``: the ``uffdd`` command, for when no console script is installed.

Why: tests, benchmarks and the demo start uffdd's own commands with the interpreter
that runs them (``sys.executable -m uffdd page-server ...``), whatever is on PATH.
"""

from uffdd.cli import main

main(prog_name="uffdd")
