"""The repository list `_catalog` answers: walked once, kept fresh off the request path.

A walk of a large tree (5,000 repositories, 25,000 directories) takes a fifth of a second,
and the server has one event loop: walking on every `_catalog` call would stall every other
client that long. So the walk's result is kept with the mtime of every directory it read (a
directory's mtime changes whenever an entry is added, removed or renamed in it). At most
every REFRESH_SECONDS a `_catalog` call has those mtimes checked: by the request itself when
the tree is small (a few thousand stats), else by a background thread, the answer meanwhile
coming from the last walk. Only a changed mtime causes a new walk. The walk is bounded
(`layout.MAX_WALKED_DIRECTORIES`).
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from minimal_registry import layout, reference

log = logging.getLogger("minimal_registry")

REFRESH_SECONDS = 1.0
# Up to this many directories, checking (and re-walking) is cheap enough to do in the
# request: the answer is then exact. Larger trees are checked in the background.
CHECK_IN_REQUEST = 1000
MAX_DIRECTORIES = layout.MAX_WALKED_DIRECTORIES


@dataclass
class Snapshot:
    names: List[str]
    directories: Dict[str, int] = field(default_factory=dict)  # path -> mtime_ns when read
    checked: float = 0.0  # time.monotonic() of the last check


class Catalog:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.walks = 0  # full walks done: a test reads it to prove the result is reused
        self._snapshot: Optional[Snapshot] = None
        self._lock = threading.Lock()
        self._refresher: Optional[threading.Thread] = None
        self._truncation_logged = False

    def names(self) -> List[str]:
        """Every repository name, sorted, as of the last walk (at most a check or two old)."""
        snapshot = self._snapshot
        if snapshot is None:
            self._snapshot = snapshot = self._walk()
        elif time.monotonic() - snapshot.checked >= REFRESH_SECONDS:
            if len(snapshot.directories) <= CHECK_IN_REQUEST:
                self._check()
                snapshot = self._snapshot
            else:
                self._check_in_background()
        return snapshot.names

    def wait_until_fresh(self, timeout: float) -> bool:
        """Check now (in the background) and wait for it: True once the result is current."""
        thread = self._check_in_background(force=True)
        thread.join(timeout)
        return not thread.is_alive()

    def _check_in_background(self, force: bool = False) -> threading.Thread:
        with self._lock:
            if self._refresher is None or not self._refresher.is_alive():
                if force and self._snapshot is not None:
                    self._snapshot.checked = 0.0
                self._refresher = threading.Thread(target=self._check, name="catalog-refresh", daemon=True)
                self._refresher.start()
            return self._refresher

    def _check(self) -> None:
        snapshot = self._snapshot
        if snapshot is not None and not _changed(snapshot.directories):
            snapshot.checked = time.monotonic()
            return
        self._snapshot = self._walk()

    def _walk(self) -> Snapshot:
        self.walks += 1
        directories: Dict[str, int] = {}
        found = []
        try:
            for name in layout.repositories(self.root, directories, limit=MAX_DIRECTORIES):
                found.append(name)
        except layout.WalkTruncated as truncated:
            if not self._truncation_logged:
                self._truncation_logged = True
                log.warning("_catalog: stopped walking %s after %s: the list is incomplete", self.root, truncated)
        names = sorted({name for name in found if reference.is_name(name)})
        return Snapshot(names, directories, time.monotonic())


def _changed(directories: Dict[str, int]) -> bool:
    for path, mtime in directories.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False
