"""The machine's state, printed before every run: numbers mean nothing without it.

Why: the benchmark machines are shared VMs; CPUs, load average and kernel are what a
reader needs to judge whether a figure is noise.
"""

from __future__ import annotations

import os
import platform
import sys


def describe() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), {mem_gib:.1f} GiB, "
        f"kernel {platform.release()}, Python {sys.version.split()[0]}, load average {load}"
    )


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
