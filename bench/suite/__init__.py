"""uffdd's benchmark suite (issue 5): scenarios that print their reference beside them.

Why a package: the scenarios share how C references are built, how processes are
placed on CPUs and reaped, and how latencies are summarised; ``bench/run.py`` is the
one command that runs them.
"""
