"""A CRIU restore whose tree lives in a pid namespace of its own, failed mid-restore.

Why a program of its own: it must run as the init of a throwaway pid namespace
(``unshare --pid --fork --mount-proc python criu_pidns.py WORK``), so that the pids
uffdd could confuse with the pstree pids (1, 2, ...) belong to processes of the test:
itself (1) and a sentinel (2), and a wrong kill reaches nothing outside the test. In
that namespace it starts the sentinel, then the restored tree in a nested pid namespace
(its tasks are 1, 2, ... there: the pstree pids), ``uffdd page-server`` and ``uffdd
lazy-pages --page-server``; it hands the tasks over as ``criu restore`` does (each task
the sender of its own messages), lets the root read some pages, fork, remap and
unmap, stops the page server, then sends the restore-finished marker: the sweep cannot
be served and uffdd must kill exactly the tree. It prints one JSON line of what it saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.criu_restorer import (
    TIMEOUT,
    LazyPages,
    Restorer,
    Tree,
    page_server,
    task_spec,
    write_dump,
)

NEW_PID_NAMESPACE = r"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x20000000):  # CLONE_NEWPID
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")
child = os.fork()  # the first process of the new namespace: its pid 1
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status = os.waitpid(child, 0)
if os.WIFSIGNALED(status):
    os.kill(os.getpid(), os.WTERMSIG(status))  # die as the tree's root died
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""``python -c NEW_PID_NAMESPACE COMMAND...``: COMMAND as pid 1 of a new pid namespace;
exits as it did (``unshare --fork`` cannot re-raise SIGKILL)."""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def main() -> None:
    work = Path(sys.argv[1])
    facts: dict[str, object] = {"init": os.getpid()}
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as sentinel:
        facts["sentinel"] = sentinel.pid
        specs = [task_spec(0, None, script="ops"), task_spec(1, 0, script="wait")]
        with Tree.start(
            specs, work / "spec.json", prefix=(sys.executable, "-c", NEW_PID_NAMESPACE)
        ) as tree:
            facts["pstree_pids"] = [tree.pids[i] for i in range(len(specs))]
            facts["real_pids"] = [tree.real_pids[i] for i in range(len(specs))]
            images = work / "images"
            write_dump(images, tree)
            restore_side = work / "restore-images"  # the layout only: pages come remote
            restore_side.mkdir()
            for image in images.iterdir():
                if not image.name.startswith("pages-"):
                    (restore_side / image.name).write_bytes(image.read_bytes())
            with page_server(images, work) as (target, server):
                lazy = LazyPages.start(
                    restore_side, work / "work", "--page-server", "--address", target,
                    "--fetch-deadline", "5",
                )  # fmt: skip
                try:
                    restorer = Restorer(lazy.connect(work / "work"))
                    restorer.hand_over(tree)
                    tree.wait_reports("ops_done", 1)  # pages were served, a child forked
                    server.kill()  # the page source fails mid-restore
                    server.wait(TIMEOUT)
                    restorer.finish()
                    facts["lazy_pages_exit"] = lazy.wait()
                    facts["tree_status"] = tree.proc.wait(TIMEOUT)
                    facts["tasks_alive"] = [_alive(p) for p in tree.real_pids.values()]
                    facts["log"] = lazy.text()
                finally:
                    lazy.close()
        facts["sentinel_alive"] = sentinel.poll() is None and _alive(sentinel.pid)
        sentinel.send_signal(signal.SIGKILL)
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
