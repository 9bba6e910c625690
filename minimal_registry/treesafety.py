"""The containment rule: which paths of a content tree may be read, and how to open them.

One rule, shared by the server, `verify`, `ls`, every listing and `prune`:

  - a file or directory is used only if its REAL path (every symlink resolved) lies inside
    the real path of the tree, or inside the real path of the tree's top-level `blobs`
    (an operator may keep that on another disk and link it in);
  - only regular files are ever opened: a FIFO would block the reader forever, a device
    (`/dev/zero` re-created by `tar` as root) never ends. The type is checked before opening,
    the open itself is non-blocking, and what was opened is checked again (fstat, and the real
    path of the descriptor), so a file swapped between the check and the open is caught.

    bounds = TreeBounds(root)
    bounds.contains(real_path)             -> bool
    bounds.resolve(path)                   -> real path inside, or raise Refused / OSError
    bounds.open_regular(path)              -> OpenFile (fd, stat, real path), or raise Refused / OSError

`Refused` means "the tree holds something here that must not be used" (and says what);
an OSError means the path could not be looked at (ENOENT: not there; EMFILE, EIO: try again).
"""

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Union

BLOBS = "blobs"  # layout.BLOBS; repeated so this module depends on nothing
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)

PathLike = Union[str, Path]
READ_CHUNK = 64 * 1024


class Refused(ValueError):
    """The path exists but must not be used: outside the tree, or not a regular file."""


def within(path: str, directory: str) -> bool:
    """True if `path` is `directory` or below it (both real, absolute paths)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def kind_of(mode: int) -> str:
    """What a file type is called in a message: "a FIFO", "a directory", ..."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@dataclass
class OpenFile:
    """A regular file inside the tree, open for reading. Close it (or use `with`)."""

    fd: int
    stat: os.stat_result
    real_path: str

    def read(self, limit: int) -> bytes:
        """Up to `limit` bytes from the start (fewer only at the end of the file)."""
        chunks, left = [], limit
        while left > 0:
            offset = limit - left
            # Ask for what the file holds (one byte more, to see its end), never for `limit`:
            # callers pass 4 MiB for a manifest of a few KiB. A buffer that big, freed unused,
            # raises glibc's mmap threshold, and each later one comes from the heap, is cut
            # down to the file and pins the heap around it: RSS grows for minutes. Chunks stay
            # under glibc's default threshold (128 KiB) for the same reason.
            expected = self.stat.st_size - offset
            chunk = os.pread(self.fd, min(left, READ_CHUNK, expected + 1 if expected >= 0 else READ_CHUNK), offset)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def detach(self) -> int:
        """Hand the descriptor over (to a file object that will close it)."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "OpenFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TreeBounds:
    def __init__(self, root: PathLike):
        self.root = str(root)
        self.real_root = os.path.realpath(self.root)

    def real_blobs(self) -> str:
        """The real path of ROOT/blobs, looked up afresh (an operator may re-link it)."""
        return os.path.realpath(os.path.join(self.real_root, BLOBS))

    def contains(self, real_path: str) -> bool:
        if within(real_path, self.real_root):
            return True
        return within(real_path, self.real_blobs())

    def holds(self, path: PathLike) -> bool:
        """Whether `path`, every symlink in it resolved, lies inside (it need not exist)."""
        return self.contains(os.path.realpath(path))

    def resolve(self, path: PathLike) -> str:
        """The real path of `path`, which must exist and lie inside; Refused otherwise."""
        real = os.path.realpath(path, strict=True)
        if not self.contains(real):
            raise Refused(f"resolves to {real}, outside the content tree")
        return real

    def directory(self, path: PathLike) -> str:
        """The real path of a directory inside the tree (a repository, its manifests/)."""
        real = self.resolve(path)
        st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            raise Refused(f"is {kind_of(st.st_mode)}, not a directory")
        return real

    def check_regular(self, path: PathLike) -> os.stat_result:
        """stat of a regular file inside the tree, without opening it; Refused otherwise."""
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"is {kind_of(st.st_mode)}, not a regular file: never opened")
        self.resolve(path)
        return st

    def open_regular(self, path: PathLike) -> OpenFile:
        """Open `path` for reading only if it is a regular file inside the tree.

        Checked before opening (so a FIFO or device is never opened at all), opened
        non-blocking (so one swapped in meanwhile cannot block), then checked again on the
        descriptor itself: its type, and the real path the kernel actually opened.
        """
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise Refused(f"is {kind_of(before.st_mode)}, not a regular file: never opened")
        fd = os.open(path, _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"is {kind_of(st.st_mode)}, not a regular file: never opened")
            real = _real_path_of(fd, path)
            if not self.contains(real):
                raise Refused(f"resolves to {real}, outside the content tree")
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, st, real)


def _real_path_of(fd: int, path: PathLike) -> str:
    """The path the kernel opened for `fd` (Linux: /proc/self/fd), else realpath of `path`."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    if real.endswith(" (deleted)") and os.fstat(fd).st_nlink == 0:
        # Replaced (a tag rewritten by rename) or removed just after it was opened: what is
        # open is the whole file as it was a moment ago, as good an answer as one given a
        # moment earlier. Where it was is what containment judges.
        real = real[:-len(" (deleted)")]
    return real
