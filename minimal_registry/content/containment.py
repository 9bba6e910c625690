"""What `prune`, `rm` and a tree given to `import` may touch: the server's containment rule
(`minimal_registry.treesafety`, used here, never re-written), and where deleting is allowed.

Reads go through `TreeBounds.open_regular`, so a symlink, a FIFO or a device in a tree can
neither lead outside it nor hang or flood a tool.
"""

import os
import stat
from typing import Optional

from minimal_registry.treesafety import Refused, TreeBounds


def is_within_tree(tree_real: str, path: str) -> bool:
    """Whether `path`, every symlink in it resolved, lies where the server would read it:
    inside the tree `tree_real`, or inside its top-level `blobs`."""
    return TreeBounds(tree_real).contains(os.path.realpath(path))


def is_plain_directory(tree: str, relative: str) -> bool:
    """Whether `tree/relative` is a directory reached through no symlink below `tree`: what
    `prune` and `rm` delete entries in.

    Deleting through a linked directory could delete another repository's files (or, for a
    link out of the tree, files that are not ours at all). The tree itself may be a link.
    """
    current = tree
    for part in [p for p in relative.split("/") if p]:
        if part in (".", ".."):
            return False
        current = os.path.join(current, part)
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return False
        except OSError:
            return False
    return True


def read_regular(path: str, limit: int) -> Optional[bytes]:
    """The bytes of `path` when it is a regular file (not a link) of at most `limit` bytes.

    None when it is anything else or cannot be opened; OSError only for a failing read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = os.pread(fd, limit + 1, 0)
        return data if len(data) <= limit else None
    finally:
        os.close(fd)


def read_regular_inside(tree_real: str, path: str, limit: int) -> Optional[bytes]:
    """The bytes of `path` if the server would read it (a regular file inside the tree, links
    resolved) and it holds at most `limit` bytes; None if the rule refuses it."""
    try:
        opened = TreeBounds(tree_real).open_regular(path)
    except Refused:
        return None
    with opened:
        if opened.stat.st_size > limit:
            return None
        data = opened.read(limit + 1)
    return data if len(data) <= limit else None
