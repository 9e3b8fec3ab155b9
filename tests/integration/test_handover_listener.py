"""The handover listener against real sockets, real fds and real restorer processes.

The listener runs in the test process's asyncio loop. Good handovers come from a child
process using ``uffdd.restorer`` (it maps, registers and hands over, and never touches
its registered memory, so nothing here has to serve a fault). Hostile peers are mostly
threads of the test process speaking raw seqpacket (a uffd they pass has nothing
registered), plus children that drop privileges. After every hostile case the
listener's process must hold exactly the fds it held before, and a good handover must
still go through.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.fds import open_fds
from support.waiting import until

from uffdd.core.addresses import PAGE_SIZE, ImageAddr, RunAddr
from uffdd.core.errors import ConfigError
from uffdd.core.handover import (
    MAX_REQUEST_BYTES,
    Error,
    ErrorCode,
    HandoverRegion,
    HandoverRejected,
    HandoverRequest,
    Reply,
    ResidentSummary,
)
from uffdd.daemon.doors.native.listener import (
    REQUIRED_FEATURES,
    Handover,
    HandoverPolicy,
    Listener,
    accept_handovers,
)
from uffdd.kernel.ownership import pidfd_alive
from uffdd.kernel.uffd import Feature, RegisterMode, Uffd
from uffdd.restorer import REQUIRED_FEATURES as RESTORER_FEATURES
from uffdd.restorer import map_anonymous, unmap
from uffdd.wire.handover import decode_reply, encode_request

pytestmark = pytest.mark.timeout(60)

P = PAGE_SIZE
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; not exported by the socket module
WAIT = 15.0
"""Seconds any single step may take: a guard against hangs, not a measurement."""

RESTORER_CHILD = r"""
import dataclasses, json, os, sys
from pathlib import Path
from uffdd.restorer import HandoverRefused, RegionSpec, RestoreFailed, Restorer

config = json.loads(sys.argv[1])

def say(**fields):
    print(json.dumps(fields), flush=True)

def uffd_count():
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]"
        except OSError:
            pass
    return count

regions = [
    RegionSpec(image_address=0x10000 * (i + 1), length=4 * 4096)
    for i in range(config.get("regions", 2))
]
restorer = Restorer(Path(config["socket"]), timeout=10, name="test-child", labels={"k": "v"})
try:
    restore = restorer.restore(config.get("image", "img"), regions, page_server="ps:1")
except HandoverRefused as exc:
    say(refused=exc.code.name, reason=exc.reason, uffds=uffd_count())
    sys.exit(0)
say(
    handover_id=restore.handover_id,
    regions=[[r.run_address, r.image_address, r.length] for r in restore.regions],
    uffds=uffd_count(),
)
if config.get("wait"):
    try:
        say(resident=dataclasses.asdict(restore.wait_resident(timeout=20)))
    except RestoreFailed as exc:
        say(failed=str(exc))
    say(uffds=uffd_count())
"""

NOBODY_CHILD = r"""
import json, os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print(json.dumps({"connect": "EACCES"}))
    sys.exit(0)
sock.send(bytes.fromhex(sys.argv[2]))
print(json.dumps({"reply": sock.recv(65536).hex()}))
"""


# -- helpers ---------------------------------------------------------------------------------


async def assert_fds(expected: set[str]) -> None:
    """This process's fds come back to ``expected`` (asyncio closes a finished child's
    pipes a few loop turns after it is reaped)."""

    def differences() -> str:
        now = open_fds()
        return f"fds open: {sorted(now - expected)}, closed: {sorted(expected - now)}"

    await until(lambda: open_fds() == expected, differences)


@dataclass
class Daemon:
    path: Path
    handovers: asyncio.Queue[Handover]

    async def next_handover(self) -> Handover:
        return await asyncio.wait_for(self.handovers.get(), WAIT)


@contextlib.asynccontextmanager
async def running(
    directory: Path,
    *,
    policy: HandoverPolicy | None = None,
    on_handover: Callable[[Handover], Awaitable[None]] | None = None,
    mode: int = 0o600,
) -> AsyncIterator[Daemon]:
    """A listener + accept loop; default callback acks and queues the handover."""
    listener = Listener.bind(directory / "handover.sock", mode=mode)
    daemon = Daemon(directory / "handover.sock", asyncio.Queue())

    async def ack_and_keep(handover: Handover) -> None:
        await handover.reply.send_ack()
        daemon.handovers.put_nowait(handover)

    task = asyncio.create_task(
        accept_handovers(listener.sock, on_handover or ack_and_keep, policy=policy)
    )
    try:
        yield daemon
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        while not daemon.handovers.empty():
            daemon.handovers.get_nowait().close()
        listener.close()


class Child:
    """A Python child process speaking JSON lines; always killed and reaped."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, script: str, *args: str, stdin: int | None = None) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            *args,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
        if not raw:
            assert self.proc.stderr is not None
            error = await asyncio.wait_for(self.proc.stderr.read(), WAIT)
            raise AssertionError(f"child said nothing; stderr: {error.decode()}")
        result: dict[str, Any] = json.loads(raw)
        return result

    async def finish(self) -> int:
        self.close_stdin()
        _, error = await asyncio.wait_for(self.proc.communicate(), WAIT)
        assert self.proc.returncode == 0, error.decode()
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        self.close_stdin()  # a grandchild waiting on it ends too
        await asyncio.wait_for(self.proc.communicate(), WAIT)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()


@contextlib.asynccontextmanager
async def child(script: str, *args: str, stdin: int | None = None) -> AsyncIterator[Child]:
    process = await Child.start(script, *args, stdin=stdin)
    try:
        yield process
    finally:
        await process.kill()


async def good_handover(daemon: Daemon) -> None:
    """A restorer child hands over; the daemon side sees the same restore, pid, regions."""
    async with child(RESTORER_CHILD, json.dumps({"socket": str(daemon.path)})) as restorer:
        said = await restorer.line()
        handover = await daemon.next_handover()
        try:
            assert said["handover_id"] == handover.handover_id
            assert handover.pid == handover.peer.pid == restorer.proc.pid
            assert said["uffds"] == 1  # the restorer keeps its copy until Resident/Failed
            assert [[r.run_address, r.image_address, r.length] for r in handover.regions] == sorted(
                said["regions"]
            )
            assert handover.image_id == "img"
            assert handover.page_server == "ps:1"
            assert handover.request.restorer == "test-child"
            assert dict(handover.request.labels) == {"k": "v"}
            assert handover.features & REQUIRED_FEATURES == REQUIRED_FEATURES
            assert handover.features & Feature.THREAD_ID
            assert not os.get_blocking(handover.uffd.fd)
            await restorer.finish()
        finally:
            handover.close()


def exchange(path: Path, payload: bytes, fds: list[int] | None = None) -> list[Reply]:
    """Send one record (with ``fds``), return every reply until the daemon hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        rights = array.array("i", fds or []).tobytes()
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else [])
        replies: list[Reply] = []
        while data := sock.recv(65536):
            replies.append(decode_reply(data))
        return replies


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory others may traverse (pytest's tmp_path is 0700 under root)."""
    directory = Path(tempfile.mkdtemp(prefix="uffdd-handover-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- hostile peers -----------------------------------------------------------------------------


@dataclass
class Peer:
    """What a hostile thread sends: resources it made are closed by :meth:`close`."""

    mapping: int
    fds: list[int]

    def region(self, offset: int = 0, length: int = 2 * P) -> HandoverRegion:
        return HandoverRegion(RunAddr(self.mapping + offset), ImageAddr(offset), length)

    def request(self, *regions: HandoverRegion, **fields: Any) -> bytes:
        values: dict[str, Any] = {"image_id": "img", "regions": regions or (self.region(),)}
        values.update(fields)
        return encode_request(HandoverRequest(**values))

    def uffd(self, features: Feature | None = REQUIRED_FEATURES, *, register: bool = False) -> int:
        """A uffd of this process; ``register``: with the mapping registered (MISSING),
        as a restorer's is (nothing here may touch it then)."""
        uffd = Uffd.create()
        if features is not None:
            uffd.api(features)
        if register:
            uffd.register(self.mapping, 4 * P, RegisterMode.MISSING)
        fd = uffd.detach()
        self.fds.append(fd)
        return fd

    def pipe(self) -> int:
        read_end, write_end = os.pipe()
        self.fds += [read_end, write_end]
        return read_end

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (free, unless reused since)."""
    probe = subprocess.Popen(["true"])
    probe.wait()
    return probe.pid


HOSTILE: dict[str, Callable[[Peer], tuple[bytes, list[int], ErrorCode, str]]] = {
    "garbage": lambda p: (b"\x08\x96\x01\xff\xfe garbage", [p.pipe()], ErrorCode.MALFORMED, ""),
    "empty record with an fd": lambda p: (b"", [p.uffd()], ErrorCode.MALFORMED, "no protocol"),
    "no fd": lambda p: (p.request(), [], ErrorCode.BAD_FD, "no fd attached"),
    "two fds": lambda p: (p.request(), [p.uffd(), p.pipe()], ErrorCode.BAD_FD, "2 fds attached"),
    "twelve fds": lambda p: (
        p.request(),
        [p.pipe() for _ in range(12)],
        ErrorCode.BAD_FD,
        "more than 8 fds",
    ),
    "a pipe": lambda p: (p.request(), [p.pipe()], ErrorCode.BAD_FD, "not a userfaultfd"),
    "a uffd without features": lambda p: (
        p.request(),
        [p.uffd(Feature(0))],
        ErrorCode.MISSING_FEATURES,
        "lacks EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP",
    ),
    "a uffd with some features": lambda p: (
        p.request(),
        [p.uffd(Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.THREAD_ID)],
        ErrorCode.MISSING_FEATURES,
        "lacks EVENT_REMOVE, EVENT_UNMAP (",
    ),
    "a uffd never negotiated": lambda p: (
        p.request(),
        [p.uffd(None)],
        ErrorCode.MISSING_FEATURES,
        "lacks EVENT_FORK",
    ),
    "wrong version": lambda p: (
        p.request(version=9),
        [p.uffd()],
        ErrorCode.UNSUPPORTED_VERSION,
        "version 9 is not supported",
    ),
    "overlapping regions": lambda p: (
        p.request(p.region(0, 2 * P), p.region(P, 2 * P)),
        [p.uffd()],
        ErrorCode.BAD_REGIONS,
        "overlap",
    ),
    "unaligned region": lambda p: (
        p.request(p.region(100, P)),
        [p.uffd()],
        ErrorCode.BAD_REGIONS,
        "not a multiple of the page size",
    ),
    "zero-length region": lambda p: (
        p.request(p.region(0, 0)),
        [p.uffd()],
        ErrorCode.BAD_REGIONS,
        "zero length",
    ),
    "region not mapped": lambda p: (
        # below vm.mmap_min_addr: never mapped
        p.request(HandoverRegion(RunAddr(P), ImageAddr(0), P)),
        [p.uffd()],
        ErrorCode.BAD_REGIONS,
        "is not mapped in pid",
    ),
    "someone else's pid": lambda p: (
        p.request(pid=1),
        [p.uffd()],
        ErrorCode.BAD_PID,
        "pid 1 is neither the connecting process",
    ),
    "our parent's pid": lambda p: (
        p.request(pid=os.getppid()),
        [p.uffd()],
        ErrorCode.BAD_PID,
        "nor a descendant",
    ),
    "a dead pid": lambda p: (
        p.request(pid=_dead_pid()),
        [p.uffd()],
        ErrorCode.BAD_PID,
        "does not exist",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_is_refused_without_leaks(tmp_path: Path, case: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            before = open_fds()
            peer = Peer(map_anonymous(4 * P), [])
            try:
                payload, fds, code, words = HOSTILE[case](peer)
                replies = await asyncio.to_thread(exchange, daemon.path, payload, fds)
            finally:
                peer.close()
                unmap(peer.mapping, 4 * P)
            assert len(replies) == 1, replies
            reply = replies[0]
            assert isinstance(reply, Error), reply
            assert reply.code is code, reply
            assert words in reply.message
            await assert_fds(before)
            await good_handover(daemon)
            await assert_fds(before)

    asyncio.run(scenario())


def test_hang_up_and_silence_do_not_stop_the_listener(tmp_path: Path) -> None:
    policy = HandoverPolicy(handshake_timeout=0.3)

    def hang_up(path: Path) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(path))

    def silent(path: Path) -> list[Reply]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(path))
            replies: list[Reply] = []
            while data := sock.recv(65536):
                replies.append(decode_reply(data))
            return replies

    async def scenario() -> None:
        async with running(tmp_path, policy=policy) as daemon:
            before = open_fds()
            for _ in range(5):
                await asyncio.to_thread(hang_up, daemon.path)
            replies = await asyncio.to_thread(silent, daemon.path)
            assert replies == [Error(ErrorCode.MALFORMED, "no request within 0.3 s of connecting")]
            await assert_fds(before)
            await good_handover(daemon)
            await assert_fds(before)

    asyncio.run(scenario())


def test_a_restorer_hanging_up_mid_handshake_leaks_nothing(tmp_path: Path) -> None:
    """The peer sends its request and fd, then dies before the answer."""

    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            before = open_fds()
            peer = Peer(map_anonymous(4 * P), [])
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    sock.connect(str(daemon.path))
                    rights = array.array("i", [peer.uffd(register=True)]).tobytes()
                    sock.sendmsg([peer.request()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                handover = await daemon.next_handover()  # valid: accepted, ack lost
                assert handover.reply.closed  # the ack found nobody: the channel dropped
                assert await handover.reply.send_progress(1, 2) is False
                handover.close()
            finally:
                peer.close()
                unmap(peer.mapping, 4 * P)
            await assert_fds(before)
            await good_handover(daemon)

    asyncio.run(scenario())


def test_wrong_uid_is_refused(sock_dir: Path) -> None:
    async def scenario() -> None:
        async with running(sock_dir, mode=0o666) as daemon:
            before = open_fds()
            async with child(NOBODY_CHILD, str(daemon.path), "0801") as nobody:
                said = await nobody.line()
            reply = decode_reply(bytes.fromhex(said["reply"]))
            assert reply == Error(
                ErrorCode.PERMISSION_DENIED, "uid 65534 may not hand over to this daemon"
            )
            await assert_fds(before)
            await good_handover(daemon)

    asyncio.run(scenario())


def test_default_mode_keeps_other_users_out(sock_dir: Path) -> None:
    async def scenario() -> None:
        async with running(sock_dir) as daemon:
            assert stat.S_IMODE(daemon.path.stat().st_mode) == 0o600
            async with child(NOBODY_CHILD, str(daemon.path), "00") as nobody:
                assert await nobody.line() == {"connect": "EACCES"}

    asyncio.run(scenario())


FAMILY = r"""
import json, os, socket, sys
from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.handover import HandoverRegion, HandoverRequest
from uffdd.kernel.uffd import RegisterMode, Uffd
from uffdd.restorer import REQUIRED_FEATURES, map_anonymous
from uffdd.wire.handover import decode_reply, encode_request

config = json.loads(sys.argv[1])
mode = config["mode"]
LENGTH = 4 * 4096
address = map_anonymous(LENGTH)  # mapped here, so in the child too (its own VMA)

def request(pid):
    region = HandoverRegion(RunAddr(address), ImageAddr(0), LENGTH)
    return encode_request(HandoverRequest(image_id="img", regions=(region,), pid=pid))

daemon = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
daemon.settimeout(15)
daemon.connect(config["socket"])  # SO_PEERCRED: this process, whoever sends
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
child = os.fork()
if child == 0:
    # The child makes the uffd and registers its own memory with it; it keeps its copy.
    uffd = Uffd.create(nonblocking=True)
    uffd.api(REQUIRED_FEATURES)
    uffd.register(address, LENGTH, RegisterMode.MISSING)
    if mode == "the child sends it on its parent's connection":
        socket.send_fds(daemon, [request(0)], [uffd.fd])
    else:
        socket.send_fds(theirs, [b"uffd"], [uffd.fd])
    sys.stdin.read()  # hold everything until the test lets go
    os._exit(0)
if mode != "the child sends it on its parent's connection":
    _, fds, _, _ = socket.recv_fds(ours, 16, 1)  # the parent holds the child's uffd
    claimed = child if mode == "the parent hands it over for the child" else 0
    socket.send_fds(daemon, [request(claimed)], fds)
reply = decode_reply(daemon.recv(65536))
print(json.dumps({
    "pid": os.getpid(),
    "child": child,
    "reply": type(reply).__name__,
    "code": reply.code.name if hasattr(reply, "code") else None,
    "message": getattr(reply, "message", ""),
}), flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""

REFUSED_FAMILIES = {
    # The parent never holds the uffd: its child sends it on the parent's connection.
    "the child sends it on its parent's connection": (
        ErrorCode.BAD_PID,
        "pid {pid} holds no descriptor of this userfaultfd",
    ),
    # The parent holds the child's uffd, but its own memory is not registered with it.
    "the parent hands it over for itself": (
        ErrorCode.BAD_REGIONS,
        "is not registered for missing faults in pid {pid}'s memory",
    ),
}


def _uffds_here() -> int:
    return sum(target.endswith("->anon_inode:[userfaultfd]") for target in open_fds())


def _alive(pid: int) -> bool:
    pidfd = os.pidfd_open(pid)
    try:
        return pidfd_alive(pidfd)
    finally:
        os.close(pidfd)


@pytest.mark.parametrize("mode", list(REFUSED_FAMILIES))
def test_a_uffd_of_another_process_is_refused(tmp_path: Path, mode: str) -> None:
    """A uffd made by a child (which registered its own memory and keeps its copy),
    handed over in the parent's name: refused with a clear reason, nothing tracked,
    nothing killed (both processes run on), nothing of it left open in the daemon."""

    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            before = open_fds()
            config = json.dumps({"socket": str(daemon.path), "mode": mode})
            async with child(FAMILY, config, stdin=asyncio.subprocess.PIPE) as parent:
                said = await parent.line()
                code, words = REFUSED_FAMILIES[mode]
                assert said["pid"] == parent.proc.pid
                assert (said["reply"], said["code"]) == ("Error", code.name), said
                assert words.format(pid=said["pid"]) in said["message"]
                assert daemon.handovers.empty()  # nothing reached the daemon's callback
                assert _uffds_here() == 0  # the received uffd is closed
                assert parent.proc.returncode is None
                assert _alive(said["child"])
                await parent.finish()
            await assert_fds(before)
            await good_handover(daemon)

    asyncio.run(scenario())


def test_a_descendant_holding_its_uffd_may_be_handed_over_for_and_killed_by_pidfd(
    tmp_path: Path,
) -> None:
    """The parent hands over the uffd its child made and holds, naming the child: the
    proof holds (the child holds it, its memory is registered), and the pidfd reaches
    the child, not the parent."""

    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            config = json.dumps(
                {"socket": str(daemon.path), "mode": "the parent hands it over for the child"}
            )
            async with child(FAMILY, config, stdin=asyncio.subprocess.PIPE) as parent:
                said = await parent.line()
                assert said["reply"] == "Ack", said
                handover = await daemon.next_handover()
                try:
                    assert (handover.pid, handover.peer.pid) == (said["child"], said["pid"])
                    assert _alive(said["child"])
                    assert handover.kill()
                    await until(lambda: not _alive(said["child"]), "the child killed")
                    assert parent.proc.returncode is None  # only the child
                    await parent.finish()  # the parent reaps it
                    assert not handover.kill()  # gone: the pidfd says so, no stray signal
                finally:
                    handover.close()

    asyncio.run(scenario())


def exchange_first(path: Path, payload: bytes, fds: list[int]) -> Reply:
    """Send one record, return the first reply (the connection may stay open)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        rights = array.array("i", fds).tobytes()
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        return decode_reply(sock.recv(65536))


# -- the callback ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (HandoverRejected(ErrorCode.REFUSED, "image img unknown"), "REFUSED", "image img unknown"),
        (RuntimeError("boom"), "INTERNAL", "daemon error: boom"),
    ],
)
def test_a_callback_refusing_before_the_ack(
    tmp_path: Path, raised: Exception, code: str, words: str
) -> None:
    async def refuse(handover: Handover) -> None:
        raise raised

    async def scenario() -> None:
        async with running(tmp_path, on_handover=refuse) as daemon:
            before = open_fds()
            config = json.dumps({"socket": str(daemon.path)})
            async with child(RESTORER_CHILD, config) as restorer:
                said = await restorer.line()
                await restorer.finish()
            assert said == {"refused": code, "reason": words, "uffds": 0}
            await assert_fds(before)

    asyncio.run(scenario())


def test_a_callback_failing_after_the_ack_kills_the_process(tmp_path: Path) -> None:
    """Closing an acked uffd would feed zeros: the listener kills first, then says why."""

    async def ack_then_fail(handover: Handover) -> None:
        await handover.reply.send_ack()
        raise RuntimeError("serve loop crashed")

    async def scenario() -> None:
        async with running(tmp_path, on_handover=ack_then_fail) as daemon:
            config = json.dumps({"socket": str(daemon.path), "wait": True})
            async with child(RESTORER_CHILD, config) as restorer:
                # (it may die before it can print the restore: the kill follows the ack)
                await asyncio.wait_for(restorer.proc.wait(), WAIT)
                assert restorer.proc.returncode == -signal.SIGKILL

    asyncio.run(scenario())


@pytest.mark.parametrize("outcome", ["resident", "failed", "hang-up"])
def test_the_restorer_hears_how_it_ended(tmp_path: Path, outcome: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            config = json.dumps({"socket": str(daemon.path), "wait": True, "regions": 3})
            async with child(RESTORER_CHILD, config) as restorer:
                said = await restorer.line()
                handover = await daemon.next_handover()
                assert said["handover_id"] == handover.handover_id
                assert await handover.reply.send_progress(P, 3 * 4 * P)
                if outcome == "resident":
                    summary = ResidentSummary(12, 12 * P, 5, 40.0, 300.0, 0.25)
                    assert await handover.reply.send_resident(summary)
                    expected: dict[str, Any] = {
                        "resident": {
                            "pages": 12,
                            "bytes": 12 * P,
                            "faults": 5,
                            "fault_p50_us": 40.0,
                            "fault_p99_us": 300.0,
                            "seconds_to_resident": 0.25,
                        }
                    }
                elif outcome == "failed":
                    assert await handover.reply.send_failed("page server gone")
                    expected = {"failed": f"handover {handover.handover_id}: page server gone"}
                else:
                    handover.reply.close()
                    expected = {"failed": "the daemon hung up"}
                assert handover.reply.closed
                result = await restorer.line()
                # Resident, Failed or a hang-up: the restorer let go of its copy
                assert await restorer.line() == {"uffds": 0}
                handover.close()
                await restorer.finish()
            if outcome == "hang-up":
                assert expected["failed"] in result["failed"]
            else:
                assert result == expected

    asyncio.run(scenario())


def test_busy_listener_refuses_new_connections(tmp_path: Path) -> None:
    policy = HandoverPolicy(max_pending=1, handshake_timeout=5.0)

    async def scenario() -> None:
        async with running(tmp_path, policy=policy) as daemon:
            before = open_fds()
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as squatter:
                squatter.connect(str(daemon.path))
                # accepted (its end on the listener's side is open): its handshake waits
                await until(lambda: len(open_fds()) == len(before) + 2, "the squatter accepted")
                replies = await asyncio.to_thread(exchange, daemon.path, b"", None)
            assert replies == [
                Error(ErrorCode.REFUSED, "too many handovers in progress; retry later")
            ]
            await assert_fds(before)  # the squatter's hang-up ended its handshake
            await good_handover(daemon)

    asyncio.run(scenario())


# -- the listening socket ---------------------------------------------------------------------


def test_stale_socket_is_replaced_and_close_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "run" / "handover.sock"
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(path))
    dead.close()  # the file stays: a daemon that died
    listener = Listener.bind(path, mode=0o660)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with pytest.raises(ConfigError, match="another process is listening"):
            Listener.bind(path)
    finally:
        listener.close()
    assert not path.exists()


def test_a_non_socket_file_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "handover.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        Listener.bind(path)
    assert path.read_text() == "precious"


def test_close_leaves_a_replaced_socket_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "handover.sock"
    listener = Listener.bind(path)
    path.unlink()
    other = Listener.bind(path)
    listener.close()
    assert path.exists()
    other.close()
    assert not path.exists()


def test_adopting_a_socket_activated_listener(tmp_path: Path) -> None:
    """systemd passes a bound, listening SOCK_SEQPACKET fd; close() leaves its file."""
    path = tmp_path / "activated.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bound.bind(str(path))
    bound.listen()
    listener = Listener.adopt(bound.detach())

    async def scenario() -> None:
        handovers: asyncio.Queue[Handover] = asyncio.Queue()

        async def keep(handover: Handover) -> None:
            await handover.reply.send_ack()
            handovers.put_nowait(handover)

        task = asyncio.create_task(accept_handovers(listener.sock, keep))
        try:
            await good_handover(Daemon(path, handovers))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(scenario())
    finally:
        listener.close()
    assert path.exists()


@pytest.mark.parametrize("kind", ["stream", "not listening"])
def test_adopting_the_wrong_socket_is_a_config_error(tmp_path: Path, kind: str) -> None:
    sock_type = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_SEQPACKET
    with socket.socket(socket.AF_UNIX, sock_type) as sock:
        sock.bind(str(tmp_path / "x.sock"))
        if kind == "stream":
            sock.listen()
        with pytest.raises(
            ConfigError, match="SOCK_STREAM, not" if kind == "stream" else "not listening"
        ):
            Listener.adopt(sock.fileno())
        assert sock.fileno() >= 0  # still the caller's


def test_both_sides_require_the_same_features() -> None:
    assert REQUIRED_FEATURES == RESTORER_FEATURES


def test_an_oversized_request_is_refused(tmp_path: Path) -> None:
    def send_huge(path: Path, fd: int) -> list[Reply]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)  # root only
            sock.settimeout(WAIT)
            sock.connect(str(path))
            rights = array.array("i", [fd]).tobytes()
            huge = bytes(MAX_REQUEST_BYTES + 4096)
            sock.sendmsg([huge], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            replies: list[Reply] = []
            while data := sock.recv(65536):
                replies.append(decode_reply(data))
            return replies

    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            before = open_fds()
            peer = Peer(0, [])
            try:
                replies = await asyncio.to_thread(send_huge, daemon.path, peer.uffd())
            finally:
                peer.close()
            assert replies == [
                Error(ErrorCode.LIMIT, f"request larger than {MAX_REQUEST_BYTES} bytes")
            ]
            await assert_fds(before)

    asyncio.run(scenario())


def test_cancelling_the_loop_releases_handshakes_in_flight(tmp_path: Path) -> None:
    async def never(handover: Handover) -> None:
        raise AssertionError("no handover expected")

    async def scenario() -> None:
        before = open_fds()
        listener = Listener.bind(tmp_path / "handover.sock")
        task = asyncio.create_task(accept_handovers(listener.sock, never))
        peers = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
        try:
            for peer in peers:
                peer.connect(str(tmp_path / "handover.sock"))
            # accepted (the listener, each peer and its accepted end), each waiting for
            # its request
            await until(
                lambda: len(open_fds()) >= len(before) + 1 + 2 * len(peers),
                "every peer accepted",
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for peer in peers:
                peer.settimeout(WAIT)
                assert peer.recv(100) == b""  # hung up on, without a word
        finally:
            for peer in peers:
                peer.close()
            listener.close()
        await assert_fds(before)

    asyncio.run(scenario())


def test_many_hostile_peers_at_once(tmp_path: Path) -> None:
    """Forty concurrent peers, each wrong in its own way; then a good one."""
    cases = list(HOSTILE)

    async def scenario() -> None:
        async with running(tmp_path) as daemon:
            before = open_fds()
            peer = Peer(map_anonymous(4 * P), [])
            try:
                jobs = []
                for index in range(40):
                    payload, fds, _, _ = HOSTILE[cases[index % len(cases)]](peer)
                    jobs.append(asyncio.to_thread(exchange, daemon.path, payload, fds))
                results = await asyncio.gather(*jobs)
            finally:
                peer.close()
                unmap(peer.mapping, 4 * P)
            assert all(len(r) == 1 and isinstance(r[0], Error) for r in results), results
            await assert_fds(before)
            await good_handover(daemon)

    asyncio.run(scenario())
