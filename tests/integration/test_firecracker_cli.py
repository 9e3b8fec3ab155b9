"""`uffdd firecracker` as an operator runs it: separate processes, the README's commands.

Each test starts the command (and, for the page-server flow, `uffdd image from-raw` and
`uffdd page-server`), hands guest memory over from the test VMM (``firecracker_vmm.py``,
which checks every byte, balloon pages included), refuses a bad VMM (killed), checks the
daemon holds no more fds than before, and stops it with SIGTERM (exit 0, socket gone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.firecracker_support import PAGE, VMM_SCRIPT, make_memfile

from uffdd.demo.services import service, stop, uffdd_command, wait_for_path

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
SIZE = 16 * MIB
REGIONS = [
    {"offset": 0, "size": 12 * MIB, "page_size": PAGE},
    {"offset": 12 * MIB, "size": 4 * MIB, "page_size": PAGE},
]
OVERLAPPING = json.dumps(
    [
        {"base_host_virt_addr": 1 << 40, "size": 2 * PAGE, "offset": 0, "page_size": PAGE},
        {"base_host_virt_addr": (1 << 40) + PAGE, "size": PAGE, "offset": 0, "page_size": PAGE},
    ]
)


def firecracker_command(*args: str) -> list[str]:
    return uffdd_command("firecracker", *args)


def run_vmm(**config: Any) -> tuple[int, list[dict[str, Any]]]:
    """Run the test VMM to its end: (exit code, its reports)."""
    done = subprocess.run(
        [sys.executable, str(VMM_SCRIPT), json.dumps(config)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=90,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, lines


def fds_of(pid: int) -> list[str]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return found


TWIN_PIDFDS = 2
"""The pidfds a daemon always holds: its own (its twin watches it) and its twin's."""


def settle_fds(pid: int) -> list[str]:
    """The daemon's fds once it holds no uffd and no pidfd of a VMM (bounded wait: VMMs
    exited)."""
    for _ in range(1500):
        fds = fds_of(pid)
        pidfds = sum("pidfd" in fd for fd in fds)
        if not any("userfaultfd" in fd for fd in fds) and pidfds <= TWIN_PIDFDS:
            return fds
        time.sleep(0.02)
    raise AssertionError(f"the daemon still holds {fds_of(pid)}")


@contextmanager
def firecracker(tmp_path: Path, *source: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "run" / "fc.sock"
    log = tmp_path / "firecracker.log"
    command = firecracker_command(
        "--socket", str(sock), *source, "--fd-wait", "0.5", "--log-format", "json"
    )  # fmt: skip
    with service(command, log) as process:
        wait_for_path(sock, "uffdd firecracker", process, log)
        yield process, sock


def serve_and_stop(tmp_path: Path, memfile: Path, *source: str) -> list[dict[str, Any]]:
    with firecracker(tmp_path, *source) as (process, sock):
        code, lines = run_vmm(
            socket=str(sock),
            memfile=str(memfile),
            sets=[REGIONS],
            balloon=[[0, 0, 4 * PAGE, 4 * PAGE], [0, 1, MIB, MIB]],
            resident_balloon=[[0, 0, 6 * MIB, MIB]],
        )
        assert code == 0, lines
        assert [line["step"] for line in lines][-2:] == ["unregistered", "verified"]
        baseline = sorted(settle_fds(process.pid))
        code, lines = run_vmm(
            socket=str(sock), memfile=str(memfile), sets=[REGIONS], payload=OVERLAPPING
        )
        assert code == -signal.SIGKILL, lines
        assert sorted(settle_fds(process.pid)) == baseline  # the refusal leaked nothing
        assert stop(process) == 0
        assert not sock.exists()
    log = (tmp_path / "firecracker.log").read_text().splitlines()
    return [json.loads(line) for line in log if line.startswith("{")]


def test_mem_file(tmp_path: Path) -> None:
    memfile = tmp_path / "snapshot.mem"
    make_memfile(memfile, SIZE, [(2 * MIB, MIB), (SIZE - 3 * PAGE, 3 * PAGE)])
    cache = tmp_path / "cache"
    events = serve_and_stop(
        tmp_path, memfile, "--mem-file", str(memfile), "--cache-dir", str(cache)
    )
    assert len(list(cache.iterdir())) == 1  # the image of the memory file, kept for restarts
    names = [e["event"] for e in events]
    assert "fully resident" in names
    refused = [e for e in events if e["event"] == "refused a Firecracker handover"]
    assert len(refused) == 1
    assert "overlap in the VMM" in str(refused[0]["reason"])
    assert refused[0]["killed"] is True


@pytest.mark.parametrize("where", ["image-dir", "page-server"])
def test_image_from_raw_then_served(tmp_path: Path, where: str) -> None:
    """The README's flow: `uffdd image from-raw`, then a local image or a page server."""
    memfile = tmp_path / "snapshot.mem"
    make_memfile(memfile, SIZE, [(5 * MIB, 2 * MIB)])
    images = tmp_path / "images"
    subprocess.run(
        uffdd_command("image", "from-raw", str(memfile), "-o", str(images), "--image-id", "vm1"),
        check=True,
        capture_output=True,
        timeout=60,
    )
    if where == "image-dir":
        serve_and_stop(tmp_path, memfile, "--image-dir", str(images / "vm1"))
        return
    pages = tmp_path / "pages.sock"
    ready = tmp_path / "pages.ready"
    log = tmp_path / "pages.log"
    command = uffdd_command(
        "page-server", "--images", str(images), "--listen", f"unix:{pages}",
        "--ready-file", str(ready),
    )  # fmt: skip
    with service(command, log) as server:
        wait_for_path(ready, "the page server", server, log)
        serve_and_stop(tmp_path, memfile, "--image", "vm1", "--page-server", f"unix:{pages}")


def test_bad_options_are_refused(tmp_path: Path) -> None:
    memfile = tmp_path / "snapshot.mem"
    memfile.write_bytes(bytes(PAGE * 3))
    sock = str(tmp_path / "fc.sock")
    cases = [
        (["--socket", sock], "exactly one of"),
        (["--socket", sock, "--image", "x"], "go together"),
        (["--socket", sock, "--mem-file", str(memfile), "--page-size", "2M"], "page size"),
    ]
    for args, message in cases:
        done = subprocess.run(
            firecracker_command(*args, "--cache-dir", str(tmp_path / "c")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
