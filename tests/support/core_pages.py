"""A small lazy region in both address spaces, for unit tests of the pure core.

Why shared: the core's rule tests (test_process.py, test_fast_path_core.py) speak of
"page 3 at run time" and "page 3 of the image"; one definition keeps their numbers
meaning the same thing.
"""

from __future__ import annotations

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.events import ProcId
from uffdd.core.policy import Policy

P = 4096
R = ProcId("r")
RUN = 0x10000
IMG = 0x100000
POLICY = Policy(fault_around=4 * P, bulk_min=4 * P, bulk_max=16 * P, max_in_flight=32 * P)
"""Small sizes, so a test can name every page: 4-page fault-around, 4-16 page bulk."""


def run(page: int) -> RunAddr:
    """Run-time address of page ``page`` of the region."""
    return RunAddr(RUN + page * P)


def img(page: int) -> ImageAddr:
    """Image address of page ``page`` of the region."""
    return ImageAddr(IMG + page * P)
