"""Which blobs the tree already holds intact, so that an import keeps those and replaces the rest.

A blob in the tree is kept only when it is a regular file (not a link, FIFO or device) of
the size its descriptor gives whose bytes hash to its name. A copy damaged in place (same
size, same mtime: what a failing disk leaves) is therefore found, replaced from the sources
and reported as repaired, so re-running an import repairs the tree. Hashing costs little
next to copying, and each blob is hashed at most once per run.
"""

import os
import stat
from pathlib import Path
from typing import Dict, Set, Tuple

from minimal_registry import layout
from minimal_registry.content import files, hashing


class TreeBlobs:
    def __init__(self, tree: Path):
        self.tree = tree
        self._verdicts: Dict[Tuple[str, int], bool] = {}
        self.damaged: Set[str] = set()  # present in the tree but not the content its name says

    def holds(self, digest: str, size: int) -> bool:
        """Whether the tree's copy of `digest` is whole and right."""
        key = (digest, size)
        if key not in self._verdicts:
            self._verdicts[key] = self._check(layout.shared_blob_path(self.tree, digest), digest, size)
        return self._verdicts[key]

    def placed(self, digest: str, size: int) -> None:
        """The import has just written `digest` itself (after checking its hash)."""
        self._verdicts[(digest, size)] = True

    def _check(self, path: Path, digest: str, size: int) -> bool:
        try:
            status = os.lstat(path)
        except OSError:
            return False  # absent (or unreachable): nothing to call damaged
        if stat.S_ISREG(status.st_mode) and status.st_size == size:
            try:
                with files.open_regular(path, follow_links=False) as reader:
                    actual, read = hashing.hash_open_file(reader)
                if actual == digest and read == size:
                    return True
            except (OSError, files.NotRegular):
                pass  # replaced by something else meanwhile, or unreadable: replace it
        self.damaged.add(digest)
        return False
