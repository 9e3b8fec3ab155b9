"""`uffdd check`: can this host run uffdd, and what would it be unable to do?

Why a command of its own: userfaultfd support depends on the kernel's version and
configuration, on privileges and on sysctls, and a lazy restore that discovers a missing
feature half way through has already lost the process. An operator (or a unit's
``ExecStartPre=``) runs this first. The probe (``uffdd.kernel.probe``) tries things;
this module judges the result against what uffdd needs and prints it for a person or as
JSON. The judgement is a pure function of the probe report, so it is tested on reports
of hosts we do not have.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from typing import Any

from uffdd.core.errors import KernelSupportError
from uffdd.kernel.probe import MEMORY_KINDS, MODES, ProbeReport, probe
from uffdd.kernel.uffd import Feature, Ioctl

FOLLOW_TREE = (Feature.EVENT_FORK, Feature.EVENT_REMAP, Feature.EVENT_REMOVE, Feature.EVENT_UNMAP)
"""Without these a restored process cannot fork, mremap, madvise or munmap safely."""

SERVE_IOCTLS = Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.WAKE
"""What serving missing anonymous pages takes."""

# Features whose absence limits uffdd without stopping it: what is lost, in words.
LIMITATIONS: dict[Feature, str] = {
    Feature.THREAD_ID: "fault reports carry no thread id (per-thread blocked time unknown)",
    Feature.MISSING_SHMEM: "cannot restore shared memory (memfd, shmem, MAP_SHARED anonymous)",
    Feature.MISSING_HUGETLBFS: "cannot restore hugetlbfs memory (VMs backed by huge pages)",
    Feature.MINOR_SHMEM: "no minor-fault serving of shmem already in the page cache",
    Feature.PAGEFAULT_FLAG_WP: "no write-protect tracking (dirty-page migration, snapshots)",
    Feature.MOVE: "cannot move pages instead of copying them",
    Feature.POISON: "cannot mark unrecoverable pages as poisoned (SIGBUS on access)",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judgement: fatal problems (host unusable) and limitations (features lost)."""

    problems: tuple[str, ...]
    limitations: tuple[str, ...]

    @property
    def usable(self) -> bool:
        return not self.problems


def assess(report: ProbeReport) -> Verdict:
    """Judge a probe report against what uffdd needs."""
    problems: list[str] = []
    enabled = report.api.features
    missing_tree = [str(f.name) for f in FOLLOW_TREE if not enabled & f]
    if missing_tree:
        why = ""
        offered = report.api.available or Feature(0)
        if Feature.EVENT_FORK.name in missing_tree and offered & Feature.EVENT_FORK:
            why = " (EVENT_FORK is offered by the kernel but needs CAP_SYS_PTRACE or root)"
        problems.append(
            "cannot follow a restored process tree: missing " + ", ".join(missing_tree) + why
        )
    anon = report.ioctls("anon", MODES[0])
    if anon is None:
        problems.append("cannot register anonymous memory for missing-page faults")
    elif (anon & SERVE_IOCTLS) != SERVE_IOCTLS:
        lacking = SERVE_IOCTLS & ~anon
        problems.append(f"anonymous memory lacks {_names(Ioctl(lacking))}")
    limitations = [text for feature, text in LIMITATIONS.items() if not enabled & feature]
    if report.syscall_error is not None:
        limitations.append(f"the userfaultfd syscall is unavailable: {report.syscall_error}")
    if report.ioctls("hugetlbfs", MODES[0]) is None and enabled & Feature.MISSING_HUGETLBFS:
        limitations.append("hugetlbfs memory could not be probed (no huge pages reserved)")
    return Verdict(tuple(problems), tuple(limitations))


def report_dict(report: ProbeReport, verdict: Verdict) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints)."""
    available = report.api.available
    return {
        "host": {"kernel": platform.release(), "machine": platform.machine()},
        "api": report.api.api,
        # granted: the kernel offers it; usable: this process could enable it (EVENT_FORK
        # also needs CAP_SYS_PTRACE; the probe leaves WP_ASYNC off, as it changes WP).
        "features": {
            str(f.name): {
                "granted": bool((available or report.api.features) & f),
                "usable_here": bool(report.api.features & f) or f is Feature.WP_ASYNC,
            }
            for f in Feature
        },
        "creation": {
            "syscall": report.syscall_error or "ok",
            "device": report.device_error or "ok",
        },
        "registration": {
            memory: {
                str(reg.mode.name).lower(): (
                    {"ioctls": _names_list(reg.ioctls)}
                    if reg.ioctls is not None
                    else {"error": reg.error}
                )
                for reg in report.registrations
                if reg.memory == memory
            }
            for memory in MEMORY_KINDS
        },
        "usable": verdict.usable,
        "problems": list(verdict.problems),
        "limitations": list(verdict.limitations),
    }


def render_text(data: dict[str, Any]) -> str:
    """The report for a person."""
    lines = [f"uffdd check on Linux {data['host']['kernel']} ({data['host']['machine']})"]
    lines.append(f"  userfaultfd API        {data['api']:#x}")
    for method, state in data["creation"].items():
        lines.append(f"  create via {method:<11} {state}")
    granted = sum(state["granted"] for state in data["features"].values())
    lines.append(f"  features granted       {granted} of {len(data['features'])}")
    for name, state in data["features"].items():
        mark = "yes" if state["granted"] else "NO "
        note = "" if state["usable_here"] or not state["granted"] else "  (not with our privileges)"
        lines.append(f"    {mark}  {name}{note}")
    lines.append("  ioctls per memory kind and register mode:")
    for memory, modes in data["registration"].items():
        for mode, result in modes.items():
            text = " ".join(result["ioctls"]) if "ioctls" in result else f"- ({result['error']})"
            lines.append(f"    {memory:<9} {mode:<7} {text}")
    for limitation in data["limitations"]:
        lines.append(f"  limitation: {limitation}")
    for problem in data["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    verdict = "usable" if data["usable"] else "NOT usable"
    lines.append(f"verdict: this host is {verdict} for uffdd")
    return "\n".join(lines)


def _names_list(ioctls: Ioctl | None) -> list[str]:
    return [] if ioctls is None else [str(i.name) for i in Ioctl if ioctls & i]


def _names(ioctls: Ioctl) -> str:
    return ", ".join(_names_list(ioctls))


def run(as_json: bool) -> int:
    """``uffdd check``: probe this host, print the report (stdout) and any reason it
    cannot run uffdd (stderr); the exit status (0 usable, 1 not)."""
    try:
        report = probe()
    except KernelSupportError as exc:
        if as_json:
            print(json.dumps({"usable": False, "problems": [str(exc)]}, indent=2))
        print(f"this host cannot run uffdd: {exc}", file=sys.stderr)
        return 1
    verdict = assess(report)
    data = report_dict(report, verdict)
    print(json.dumps(data, indent=2) if as_json else render_text(data))
    if not verdict.usable:
        print("this host cannot run uffdd: " + "; ".join(verdict.problems), file=sys.stderr)
        return 1
    return 0
