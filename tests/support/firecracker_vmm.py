"""A stand-in for Firecracker's side of the UFFD memory backend, written from the protocol.

Why a script of its own: the VMM is another process (a Python thread that faults on
registered memory while holding the GIL would deadlock a Python handler in the same
process), and it must do exactly what Firecracker does (shared/PROTOCOLS.md section 3):
map each guest region MAP_PRIVATE|MAP_ANONYMOUS (MAP_HUGETLB for 2 MiB pages) at an
address the kernel chooses, create a userfaultfd non-blocking and close-on-exec with
EVENT_REMOVE only, register every region in MISSING mode, connect to the handler's
SOCK_STREAM socket and send ONE sendmsg: the JSON region list and the uffd as
SCM_RIGHTS. It keeps its own uffd. Then it plays guest: drops pages like a balloon
(madvise DONTNEED), reads all guest memory and checks every byte against the snapshot
memory file (dropped pages must read zeros).

Run as ``python firecracker_vmm.py CONFIG_JSON``; it prints one JSON line per step.
Config keys: socket, memfile, sets (a list of region sets, each a list of
{"offset", "size", "page_size"}; each set gets its own uffd and sendmsg on the same
 connection), probe (a list of [set, region, offset, length] read and checked first),
send ("together" | "late_fd" | "no_fd"), payload (raw text sent instead of
the region list), legacy (name the page size ``page_size_kib``), balloon (a list of
[set, region, offset, length] dropped right after the handover), resident_balloon
(dropped after the handler let go of the memory), touch (read memory after sending,
default true), hold (then wait until stdin closes, drop final_balloon and check all
again), remove_events
(false: a uffd without EVENT_REMOVE), not_a_uffd (pass /dev/null instead).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import mmap
import os
import socket
import struct
import sys
import termios
import time
from typing import Any

from uffdd.kernel.uffd import Feature, RegisterMode, Uffd

MAP_HUGETLB = 0x40000
MADV_DONTNEED = 4
HUGE = 2 << 20
WAIT = 60.0
"""Seconds the handler may take for a step this process can only watch for: a hang guard."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def map_region(size: int, page_size: int) -> int:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_HUGETLB if page_size == HUGE else 0)
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {size} bytes failed")
    return int(address)


def drop(address: int, length: int) -> None:
    if _libc.madvise(address, length, MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")


def wait_read_by_peer(conn: socket.socket) -> None:
    """Until the peer has read everything sent on ``conn`` (SIOCOUTQ: what is queued
    and unread at the other end). The kernel announces this to nobody, so look."""
    deadline = time.monotonic() + WAIT
    while struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, bytes(4)))[0]:
        if time.monotonic() > deadline:
            raise TimeoutError("the handler never read the region list")
        time.sleep(0.001)


def registered(address: int) -> bool:
    """Whether the mapping at ``address`` is still registered with a uffd (VmFlags um)."""
    with open("/proc/self/smaps") as smaps:
        current = False
        for line in smaps:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(part, 16) for part in head.split("-"))
                current = lo <= address < hi
            elif current and line.startswith("VmFlags:"):
                return "um" in line.split()
    raise LookupError(f"{address:#x} is not mapped")


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["memfile"], "rb") as f:
        snapshot = f.read()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.connect(config["socket"])
    mapped: list[list[tuple[int, dict[str, int]]]] = []
    uffds: list[Uffd] = []
    for regions in config["sets"]:
        uffd = Uffd.create(nonblocking=True)
        uffd.api(Feature.EVENT_REMOVE if config.get("remove_events", True) else Feature(0))
        maps = []
        for region in regions:
            address = map_region(region["size"], region["page_size"])
            uffd.register(address, region["size"], RegisterMode.MISSING)
            maps.append((address, region))
        mapped.append(maps)
        uffds.append(uffd)  # Firecracker keeps its copy for the VM's life
        size_key = "page_size_kib" if config.get("legacy") else "page_size"
        payload = config.get("payload")
        if payload is None:
            payload = json.dumps(
                [
                    {
                        "base_host_virt_addr": address,
                        "size": region["size"],
                        "offset": region["offset"],
                        size_key: region["page_size"],
                    }
                    for address, region in maps
                ]
            )
        passed = os.open("/dev/null", os.O_RDONLY) if config.get("not_a_uffd") else uffd.fd
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed]))]
        send = config.get("send", "together")
        if send == "together":
            conn.sendmsg([payload.encode()], rights)
        elif send == "late_fd":
            conn.sendmsg([payload.encode()])
            wait_read_by_peer(conn)  # the handler has the payload and no fd yet
            conn.sendmsg([b"\0"], rights)  # SCM_RIGHTS needs at least one data byte
        else:
            conn.sendmsg([payload.encode()])
        say(step="sent", regions=[[a, r["size"]] for a, r in maps])
    if not config.get("touch", True):
        sys.stdin.read()
        return
    for set_index, region_index, offset, length in config.get("probe", []):
        address, region = mapped[set_index][region_index]
        start = region["offset"] + offset
        if ctypes.string_at(address + offset, length) != snapshot[start : start + length]:
            say(step="mismatch", address=address + offset, offset=start)
            sys.exit(3)
    say(step="probed")
    dropped: list[tuple[int, int]] = []
    for set_index, region_index, offset, length in config.get("balloon", []):
        address = mapped[set_index][region_index][0] + offset
        drop(address, length)  # blocks until the handler reads the REMOVE event
        dropped.append((address, length))
    for address, length in dropped:  # faults the handler must answer with zeros now
        if ctypes.string_at(address, length) != bytes(length):
            say(step="mismatch", address=address, offset=-1)
            sys.exit(3)
    say(step="ballooned", ranges=len(dropped))
    verify(mapped, dropped, snapshot)
    if config.get("resident_balloon") is not None:
        # Firecracker's protocol has no reply: that the handler let go (unregistered
        # the memory once it is resident) is seen only in this process's own mappings.
        deadline = time.monotonic() + WAIT
        for maps in mapped:
            for address, _ in maps:
                while registered(address):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the handler never let go of the memory")
                    time.sleep(0.02)
        say(step="unregistered")
        for set_index, region_index, offset, length in config["resident_balloon"]:
            address = mapped[set_index][region_index][0] + offset
            drop(address, length)
            dropped.append((address, length))
        verify(mapped, dropped, snapshot)
    if config.get("hold"):
        sys.stdin.read()
        for set_index, region_index, offset, length in config.get("final_balloon", []):
            address = mapped[set_index][region_index][0] + offset
            drop(address, length)
            dropped.append((address, length))
        verify(mapped, dropped, snapshot)
    conn.close()


def verify(
    mapped: list[list[tuple[int, dict[str, int]]]],
    dropped: list[tuple[int, int]],
    snapshot: bytes,
) -> None:
    """Every byte of guest memory: the snapshot's, or zeros where dropped."""
    checked = 0
    for maps in mapped:
        for address, region in maps:
            size, offset = region["size"], region["offset"]
            expected = bytearray(snapshot[offset : offset + size])
            for lo, length in dropped:
                start, end = max(lo, address), min(lo + length, address + size)
                if start < end:
                    expected[start - address : end - address] = bytes(end - start)
            actual = ctypes.string_at(address, size)
            if actual != expected:
                bad = next(i for i in range(size) if actual[i] != expected[i])
                say(step="mismatch", address=address + bad, offset=offset + bad)
                sys.exit(3)
            checked += size
    say(step="verified", bytes=checked)


if __name__ == "__main__":
    main()
