"""The daemon end to end: real page server, real daemon, real restored processes.

Each test runs the services as separate processes through the CLI and restores the demo
workload, which checks every byte it reads against the snapshot's pattern. Scenarios:
a full restore with forks, mremap, madvise and munmap; many restores at once; a process
exiting mid-transfer; hostile peers while another restore is served; the page server
dying (the restored process is killed, never left reading zeros); SIGTERM with and
without enough grace.
"""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.lazy_restore import daemon, make_demo_image, page_server, services, start_restored

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.handover import Error, ErrorCode, HandoverRegion, HandoverRequest
from uffdd.demo.pattern import demo_layout
from uffdd.wire.handover import decode_reply, encode_request

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_demo_image(root, "demo")
    return root


def _thread_slices(pid: int) -> dict[str, int]:
    """EEVDF slice (ns) of a process's main thread ("main") and of its uffdd-* threads."""
    slices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
        if name == "main" or name.startswith("uffdd-"):
            line = next(x for x in (task / "sched").read_text().splitlines() if "se.slice" in x)
            slices[name] = int(line.split(":")[1])
    return slices


def _events(running_log: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [e for e in running_log if e.get("event") == name]


@pytest.mark.parametrize("install_thread", [True, False], ids=["install-thread", "loop-only"])
def test_restore_with_fork_remap_remove_unmap_verifies_every_byte(
    images: Path, tmp_path: Path, install_thread: bool
) -> None:
    # A capped bulk lane keeps the transfer going while the workload forks, remaps and
    # drops memory, so all of it happens mid-transfer (demand faults are not capped),
    # while the installer thread (or the loop) puts background chunks in.
    knob = f"install_thread={'on' if install_thread else 'off'}"
    with services(
        tmp_path, images, server_args=("--bulk-rate-limit", "6M"), daemon_args=("--engine", knob)
    ) as running:
        restored = start_restored(running.handover, "demo")
        assert restored.finish() == 0, restored.events
        # The loop's thread has the short slice, and so has the demand thread (it
        # answers faults; there is none without the installer's fence); the installer
        # thread and the bulk lane's reader and writer the default one.
        slices = _thread_slices(running.daemon.pid)
        assert slices.pop("main") == 100_000
        assert slices.pop("uffdd-demand", None) == (100_000 if install_thread else None)
        lane = ["uffdd-bulk-recv", "uffdd-bulk-send"]
        expected = [*lane, "uffdd-install"] if install_thread else lane
        assert sorted(slices) == expected
        assert all(value > 100_000 for value in slices.values())
    done = restored.last("done")
    assert done["ok"] is True
    assert done["mismatches"] == 0
    phases = [e for e in restored.events if e["event"] == "phase"]
    assert [p["name"] for p in phases] == [
        "random reads (heap, first half)",
        "madvise(DONTNEED) reads zeros",
        "fork tree, 3 levels, untouched memory",
        "mremap to a new address",
        "mremap shrink then grow: the tail reads zeros",
        "munmap mid-transfer",
        "every byte, all regions",
        "every byte again, fully resident",
    ]
    assert all(p["mismatches"] == 0 for p in phases)
    resident = restored.last("resident")
    assert resident["faults"] > 0
    # The daemon's log tells the same story: one tree, four processes, one summary.
    log = running.daemon_events()
    (final,) = _events(log, "fully resident")
    assert final["processes"] == 4
    assert len(_events(log, "following fork")) == 3
    thread_installs = final["thread_installs"]
    assert isinstance(thread_installs, int)
    assert (thread_installs > 0) is install_thread


def test_many_restores_at_once(images: Path, tmp_path: Path) -> None:
    with services(tmp_path, images) as running:
        restores = [
            start_restored(running.handover, "demo", mode="exercise" if i % 2 else "idle")
            for i in range(8)
        ]
        codes = [r.finish() for r in restores]
    assert codes == [0] * 8, [r.events[-1:] for r in restores]
    assert all(r.last("done")["mismatches"] == 0 for r in restores)
    assert len(_events(running.daemon_events(), "fully resident")) == 8


def test_exit_mid_transfer_then_the_next_restore_is_served(images: Path, tmp_path: Path) -> None:
    # A slow bulk lane keeps the transfer in flight when the process leaves.
    with services(tmp_path, images, server_args=("--bulk-rate-limit", "8M")) as running:
        leaver = start_restored(running.handover, "demo", mode="exit-early")
        assert leaver.finish() == 0
        follower = start_restored(running.handover, "demo", mode="idle")
        assert follower.finish() == 0, follower.events
        assert follower.last("done")["ok"] is True
    log = running.daemon_events()
    assert _events(log, "process exited"), "the daemon did not notice the exit"
    assert len(_events(log, "restore ended: the process exited before it was fully resident")) == 1
    assert len(_events(log, "fully resident")) == 1
    assert _events(log, "restore failed") == []


def _hostile(handover: Path, payload: bytes, fds: list[int] | None = None) -> Error:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(handover))
        if fds:
            rights = array.array("i", fds).tobytes()
            sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        else:
            sock.send(payload)
        reply = decode_reply(sock.recv(65536))
    assert isinstance(reply, Error), reply
    return reply


def test_hostile_peers_are_refused_while_another_restore_is_served(
    images: Path, tmp_path: Path
) -> None:
    heap = demo_layout(32)[0]
    request = HandoverRequest(
        image_id="demo",
        regions=(HandoverRegion(RunAddr(heap.start), ImageAddr(heap.start), heap.length),),
    )
    with services(tmp_path, images, server_args=("--bulk-rate-limit", "16M")) as running:
        restored = start_restored(running.handover, "demo", mode="idle")
        assert restored.read_until("first_access") is not None
        assert _hostile(running.handover, b"\xff garbage \x00").code is ErrorCode.MALFORMED
        assert _hostile(running.handover, encode_request(request)).code is ErrorCode.BAD_FD
        read_end, write_end = os.pipe()
        try:
            refused = _hostile(running.handover, encode_request(request), [read_end])
        finally:
            os.close(read_end)
            os.close(write_end)
        assert refused.code is ErrorCode.BAD_FD
        nobody = subprocess.run(
            [sys.executable, "-c", _NOBODY, str(running.handover)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert nobody.stdout.strip() in ("refused", "EACCES"), nobody.stderr
        assert restored.finish() == 0, restored.events
        assert restored.last("done")["ok"] is True


# A peer with another uid: the socket's mode (0600) or SO_PEERCRED must stop it.
_NOBODY = r"""
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.send(b"x")
print("refused" if s.recv(65536) else "accepted")
"""


def test_page_server_death_kills_the_restored_process(images: Path, tmp_path: Path) -> None:
    with services(
        tmp_path,
        images,
        server_args=("--bulk-rate-limit", "4M"),
        daemon_args=("--fetch-deadline", "3"),
    ) as running:
        restored = start_restored(running.handover, "demo", mode="idle")
        assert restored.read_until("first_access") is not None
        running.page_server.kill()
        running.page_server.wait()
        # Never left reading zeros: the daemon kills the process it cannot serve.
        assert restored.finish(timeout=60) == -signal.SIGKILL
        # ... and keeps serving others, from another page server.
        with page_server(tmp_path, images, name="second") as (_, target):
            other = start_restored(running.handover, "demo", mode="idle", page_server=target)
            assert other.finish() == 0, other.events
    log = running.daemon_events()
    (failure,) = _events(log, "restore failed")
    assert (
        "page server" in str(failure["reason"]).lower()
        or "unavailable" in str(failure["reason"]).lower()
    ), failure


def test_sigterm_lets_restores_in_progress_finish(images: Path, tmp_path: Path) -> None:
    with services(tmp_path, images, server_args=("--bulk-rate-limit", "16M")) as running:
        restored = start_restored(running.handover, "demo", mode="idle")
        assert restored.read_until("first_access") is not None
        running.daemon.send_signal(signal.SIGTERM)
        assert restored.finish() == 0, restored.events
        assert running.daemon.wait(60) == 0
    assert restored.last("done")["ok"] is True
    assert _events(running.daemon_events(), "stopped")


def test_sigterm_kills_what_is_not_resident_after_the_grace(images: Path, tmp_path: Path) -> None:
    with services(
        tmp_path,
        images,
        server_args=("--bulk-rate-limit", "1M"),
        daemon_args=("--grace", "1"),
    ) as running:
        restored = start_restored(running.handover, "demo", mode="idle")
        assert restored.read_until("first_access") is not None
        running.daemon.send_signal(signal.SIGTERM)
        assert restored.finish(timeout=60) == -signal.SIGKILL
        assert running.daemon.wait(60) == 0
    (failure,) = _events(running.daemon_events(), "restore failed")
    assert "grace" in str(failure["reason"])


def test_corrupt_image_data_kills_the_process_instead_of_serving_it(
    images: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt-images"
    shutil.copytree(images, corrupt)
    pages = corrupt / "demo" / "pages.bin"
    with pages.open("r+b") as data:
        data.seek(pages.stat().st_size // 2)
        byte = data.read(1)
        data.seek(-1, os.SEEK_CUR)
        data.write(bytes([byte[0] ^ 0xFF]))
    with services(tmp_path, corrupt) as running:
        restored = start_restored(running.handover, "demo", mode="idle")
        # The sweep reaches the bad chunk: the page server refuses to serve it
        # (DATA_LOSS), and the daemon kills the process rather than install it.
        assert restored.finish(timeout=60) == -signal.SIGKILL
    (failure,) = _events(running.daemon_events(), "restore failed")
    assert "checksum" in str(failure["reason"]).lower(), failure


def test_local_images_without_a_page_server(images: Path, tmp_path: Path) -> None:
    # `uffdd daemon --images ROOT`: the handover names no page server, pages come
    # from the local image, served in place from its mmap.
    with daemon(tmp_path, "", "--images", str(images)):
        restored = start_restored(tmp_path / "handover.sock", "demo")
        assert restored.finish() == 0, restored.events
    assert restored.last("done")["ok"] is True
