"""What `prune` and `rm` may delete in; how `rm` and a tree source read a file that must not be a link.

What may be *read* is the server's rule, `minimal_registry.treesafety.TreeBounds`, which
`prune`, `verify`, `ls` and a tree given to `import` use directly. Deleting asks more: a
directory reached through no symlink at all (`is_plain_directory`).
"""

import os
import stat
from typing import Optional


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
