"""A CRIU images directory as the page server's image store: ``criu-<pid>`` per task.

Why: ``uffdd page-server --images DIR`` pointed at a CRIU dump serves each task's lazy
memory under the id a ``uffdd lazy-pages --page-server`` on the restore side asks for,
with the same lookups (and the same refusals) as uffdd's own images.
"""

from __future__ import annotations

import threading
from pathlib import Path

from uffdd.image.criu.images import read_pstree
from uffdd.image.criu.reader import CriuImageReader, image_id_for, pid_of
from uffdd.image.format import ImageNotFound


class CriuImages:
    """Readers for the tasks of ``pstree.img``, opened on first use and cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._open: dict[str, CriuImageReader] = {}

    def _pids(self) -> list[int]:
        return [t.pid for t in read_pstree(self.root) if (self.root / f"mm-{t.pid}.img").is_file()]

    def list(self) -> list[str]:
        return sorted(image_id_for(pid) for pid in self._pids())

    def open(self, image_id: str) -> CriuImageReader:
        """The reader for ``criu-<pid>``; ImageNotFound for any other id."""
        with self._lock:
            reader = self._open.get(image_id)
            if reader is not None:
                return reader
            pid = pid_of(image_id)
            if pid is None or pid not in self._pids():
                raise ImageNotFound(f"no task image {image_id!r} in {self.root}")
            reader = CriuImageReader.open_task(self.root, pid)
            self._open[image_id] = reader
            return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._open.values():
                reader.close()
            self._open.clear()
