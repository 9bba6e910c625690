"""Touching a content tree's files without ever leaving the tree: one containment rule, and
reads that open only regular files.

`is_within_tree` is the rule `prune`, `rm` and a tree given to `import` share, written once
here so that the server's own containment function (`minimal_registry.treesafety`, on
another branch) can replace it in one place. Reads open with O_NOFOLLOW and O_NONBLOCK and
check the file type before reading, so a symlink, a FIFO or a device in a tree can neither
lead outside it nor hang or flood a tool.
"""

import os
import stat
from typing import Optional


def is_within_tree(tree_real: str, path: str) -> bool:
    """Whether `path`, every symlink in it resolved, is `tree_real` or below it.

    `tree_real` is `os.path.realpath(tree)`. The test is on the resolved path, so a link
    anywhere in `path` (a `manifests` directory, a repository, the blob itself) that leads
    out of the tree makes it "outside".
    """
    real = os.path.realpath(path)
    return real == tree_real or real.startswith(tree_real.rstrip(os.sep) + os.sep)


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
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) <= limit else None
    finally:
        os.close(fd)


def read_regular_inside(tree_real: str, path: str, limit: int) -> Optional[bytes]:
    """`read_regular`, following a symlink only when it resolves inside the tree (the rule
    the server serves by); None for a link out of it."""
    if os.path.islink(path):
        real = os.path.realpath(path)
        if not is_within_tree(tree_real, real):
            return None
        path = real
    return read_regular(path, limit)
