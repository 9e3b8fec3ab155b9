"""A live process's memory through /proc: its mappings, which pages exist, their bytes.

Why /proc and not ptrace: a dump needs only to read, and /proc/PID/maps,
/proc/PID/pagemap and /proc/PID/mem do that for a stopped process without attaching
(no tracer left behind if the dumper dies). pagemap's present/swapped bits (bits 63
and 62) tell which pages were ever populated, without root (root additionally sees
PFNs, which we do not need); everything else reads as zeros and is not read at all.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

PAGEMAP_PRESENT = 1 << 63
PAGEMAP_SWAPPED = 1 << 62
_POPULATED = PAGEMAP_PRESENT | PAGEMAP_SWAPPED
_PAGEMAP_WINDOW = 64 * 1024  # entries per pagemap read (512 KiB)

KERNEL_MAPPINGS = frozenset({"[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]", "[uprobes]"})
"""Mappings the kernel provides to every process: never process state, never dumped."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps (plus the kernel page size from smaps)."""

    start: int
    end: int
    perms: str  # "rw-p"
    offset: int
    inode: int
    name: str  # path, "[heap]", "[stack]", "[anon:...]", or "" for anonymous
    page_size: int = 4096

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and not self.name.startswith("/")

    @property
    def display_name(self) -> str:
        return self.name or "[anon]"


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of /proc/PID/maps."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        low, high = parts[0].split("-")
        mappings.append(
            Mapping(
                start=int(low, 16),
                end=int(high, 16),
                perms=parts[1],
                offset=int(parts[2], 16),
                inode=int(parts[4]),
                name=parts[5].strip() if len(parts) > 5 else "",
            )
        )
    return mappings


def read_mappings(pid: int) -> list[Mapping]:
    """The mappings of ``pid``, each with its kernel page size (hugetlb > 4 KiB)."""
    with open(f"/proc/{pid}/maps") as maps:
        mappings = parse_maps(maps.read())
    sizes = _kernel_page_sizes(pid)
    return [
        Mapping(m.start, m.end, m.perms, m.offset, m.inode, m.name, sizes.get(m.start, 4096))
        for m in mappings
    ]


def _kernel_page_sizes(pid: int) -> dict[int, int]:
    sizes: dict[int, int] = {}
    start = 0
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                if line[0] in "0123456789abcdef" and "-" in line.split(maxsplit=1)[0]:
                    start = int(line.split("-", 1)[0], 16)
                elif line.startswith("KernelPageSize:"):
                    sizes[start] = int(line.split()[1]) * 1024
    except OSError:
        pass  # smaps is optional: without it every mapping counts as 4 KiB pages
    return sizes


def select_mappings(
    mappings: list[Mapping],
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> list[Mapping]:
    """The mappings a dump captures: the process's own private memory.

    By default: readable, private (MAP_PRIVATE) mappings that are writable or anonymous
    (heap, stacks, anonymous mmaps, the written .data/.bss of binaries and libraries);
    not shared mappings (their contents live in a file or shm, not in the process),
    not read-only file mappings (code and constants: the file has them), not kernel
    mappings ([vvar], [vdso], [vsyscall]). ``include`` glob patterns on the mapping
    name (``[anon]`` for unnamed) add readable mappings; ``exclude`` patterns remove
    any. Kernel mappings are never captured. (Of a private file mapping, every page
    is read: an unpopulated one holds the file's bytes, not zeros.)
    """
    chosen: list[Mapping] = []
    for mapping in mappings:
        name = mapping.display_name
        if mapping.name in KERNEL_MAPPINGS or mapping.perms[0] != "r":
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        default = mapping.private and (mapping.perms[1] == "w" or mapping.anonymous)
        if default or any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
            chosen.append(mapping)
    return chosen


def populated_runs(pagemap_fd: int, mapping: Mapping) -> Iterator[tuple[int, int]]:
    """(start, length) runs of ``mapping``'s pages that are present or swapped.

    A run is in units of the mapping's page size (a huge page counts as populated if
    any of its base pages is).
    """
    base = 4096
    ratio = mapping.page_size // base
    run_start: int | None = None
    first = mapping.start // base
    count = mapping.length // base
    done = 0
    while done < count:
        take = min(_PAGEMAP_WINDOW, count - done)
        raw = os.pread(pagemap_fd, take * 8, (first + done) * 8)
        if len(raw) != take * 8:
            raise OSError(f"short read of pagemap at page {first + done:#x}")
        window_start = mapping.start + done * base
        if raw.count(0) == len(raw):  # nothing populated in this window: fast path
            if run_start is not None:
                yield run_start, window_start - run_start
                run_start = None
            done += take
            continue
        entries = memoryview(raw).cast("Q")
        for index in range(0, take, ratio):
            populated = any(entries[index + k] & _POPULATED for k in range(ratio))
            address = window_start + index * base
            if populated and run_start is None:
                run_start = address
            elif not populated and run_start is not None:
                yield run_start, address - run_start
                run_start = None
        done += take
    if run_start is not None:
        yield run_start, mapping.end - run_start


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc/PID/stat ('R', 'S', 'T', 'Z', ...)."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    return text[text.rindex(")") + 2]


def _task_states(pid: int) -> list[str]:
    states: list[str] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except FileNotFoundError:
            continue  # the thread exited
        states.append(text[text.rindex(")") + 2])
    return states


class ProcessStopError(Exception):
    """The process could not be stopped in time (it keeps running)."""


def stop_process(pid: int, timeout: float = 5.0) -> bool:
    """SIGSTOP ``pid`` and wait until every thread is stopped.

    Returns whether it was running before (and so must be resumed with SIGCONT).
    """
    if process_state(pid) in "Tt":
        return False
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = _task_states(pid)
        if all(state in "TtZX" for state in states):
            return True
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGCONT)
            raise ProcessStopError(
                f"process {pid} did not stop within {timeout:g} s (thread states {states})"
            )
        time.sleep(0.002)


def resume_process(pid: int) -> None:
    """SIGCONT ``pid`` (a process that exited meanwhile is not an error)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def read_cmdline(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except OSError:
        return ()
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)
