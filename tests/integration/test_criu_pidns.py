"""The CRIU dialect across pid namespaces: uffdd acts on the task that sent its uffd.

CRIU sends each task's pid as the restored tree's own namespace numbers it (1 for the
tree's init); the same numbers name other processes in uffdd's namespace. A tree in a
pid namespace of its own, failed mid-restore, must be killed alone: the test runs as
the init of a throwaway pid namespace (``support/criu_pidns.py``) where 1 and 2 are
the test itself and a sentinel, so a kill by pstree pid would reach them and nothing
else on the machine. And a sender that uffdd's namespace cannot see (no pid in its
credentials) is refused: the restore fails rather than act on a guess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.criu_restorer import TIMEOUT, LazyPages, Restorer, Tree, task_spec, write_dump

pytestmark = pytest.mark.timeout(180)

HARNESS = Path(__file__).resolve().parent.parent / "support" / "criu_pidns.py"
NEW_PID_NAMESPACE = ("unshare", "--pid", "--fork", "--mount-proc")


def test_a_tree_in_its_own_pid_namespace_is_killed_alone(tmp_path: Path) -> None:
    run = subprocess.run(
        [*NEW_PID_NAMESPACE, sys.executable, str(HARNESS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout)
    log = facts.pop("log")
    # the pstree pids are the numbers of the test (1) and its sentinel (2) out here
    assert facts["init"] == 1
    assert facts["sentinel"] == 2
    assert facts["pstree_pids"] == [1, 2]
    real = facts["real_pids"]
    assert not {1, 2} & set(real)
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    served = {e["proc"]: e["pid"] for e in events if e.get("event") == "serving"}
    assert served == {"criu-1": real[0], "criu-2": real[1]}
    # the page server died mid-restore: the tree is killed, and nothing else is
    assert facts["lazy_pages_exit"] == 1, log
    assert "page server" in log.splitlines()[-1]
    assert facts["tree_status"] == -9
    assert facts["tasks_alive"] == [False, False]
    assert facts["sentinel_alive"]


def test_a_sender_outside_uffdds_pid_namespace_is_refused(tmp_path: Path) -> None:
    """uffdd in a pid namespace below the restorer's sees no pid in the credentials."""
    specs = [task_spec(0, None), task_spec(1, 0)]
    with Tree.start(specs, tmp_path / "spec.json") as tree:
        write_dump(tmp_path / "images", tree)
        work = tmp_path / "work"
        lazy = LazyPages.start(tmp_path / "images", work, prefix=NEW_PID_NAMESPACE)
        try:
            restorer = Restorer(lazy.connect(work))
            restorer.send_task(tree.pids[0], tree.uffds[0], tree.real_pids[0])
            assert lazy.wait() == 1, lazy.text()
            assert "without the sender's credentials" in lazy.text()
            assert f"task {tree.pids[0]}" in lazy.text()
            restorer.sock.close()
            # nothing was taken over, so nothing was killed: the tasks end as they like
            assert tree.proc.poll() is None
            assert tree.close() == 0
        finally:
            lazy.close()
        assert tree.proc.wait(TIMEOUT) == 0
