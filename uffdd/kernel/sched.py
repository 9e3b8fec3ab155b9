"""Scheduling hints for the threads on a demand fault's path: a short EEVDF slice.

Why: on Linux 6.6+ (EEVDF) a woken task preempts a busy one only once the busy one
has used its slice (``se.slice`` in /proc/PID/sched; milliseconds by default). The
daemon's loop and the page server's main process wake for every fault and urgent
request while the bulk work (the installer thread, the page server's bulk worker, the
bulk receive) keeps the CPUs busy, so a fault waited up to a slice per hop. A 100 us
slice (``sched_setattr`` with ``sched_runtime`` for SCHED_OTHER, honoured since 6.12)
lets them in sooner; their share of the CPU does not change. Threads and processes
inherit it, so callers set it after starting their bulk threads and workers, and those
(the installer thread, the bulk worker) take the default back at start. The measured
effect (remote faults' p99 with the sweep running) is in bench/results/.
"""

from __future__ import annotations

import ctypes
import os

_SYS_SCHED_SETATTR = 314  # x86_64
_FAIR_POLICIES = frozenset({os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE})


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr``, version 0 (48 bytes)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def short_slice(nanoseconds: int = 100_000) -> bool:
    """Give the calling thread a short slice, keeping its policy and nice value.

    False when the kernel, the architecture or the thread's policy (a real-time one)
    does not take it: the thread keeps its slice (slower to get a busy CPU, nothing
    worse).
    """
    return _set_slice(nanoseconds)


def default_slice() -> bool:
    """Give the calling thread the kernel's default slice back (for bulk work started
    by a thread that has a short one: threads and processes inherit it)."""
    return _set_slice(0)


def _set_slice(nanoseconds: int) -> bool:
    if os.uname().machine != "x86_64":
        return False
    policy = os.sched_getscheduler(0)
    if policy not in _FAIR_POLICIES:
        return False
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # per thread on Linux
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), policy, 0, nice, 0, nanoseconds, 0, 0)
    return bool(_libc.syscall(_SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0)
