"""One writer at a time: `import`, `rm` and `prune` hold an exclusive lock on the tree.

The lock is `flock` on the tree's directory itself (no lock file to leave behind or to pack
onto media); the kernel drops it when the process ends, however it ends. The server takes no
lock: it only reads, and every write is atomic. Without the lock, a prune could delete a blob
an import running beside it had just decided it need not copy.
"""

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minimal_registry.fatal import Fatal


@contextmanager
def exclusive(tree: Path, command: str) -> Iterator[None]:
    """Hold the tree's lock for the block; wait (saying so) while another command has it."""
    try:
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        yield  # nothing to share: `import` creates the tree, or says why it cannot
        return
    except OSError as error:
        raise Fatal(f"cannot open {tree}: {error.strerror}", "check the path and its permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"minimal-registry {command}: waiting for another import, rm or prune on {tree} to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
