"""A source's files by their relative name: a directory on disk, or a staged archive.

The readers (`ocilayout`, `dockerarchive`, `sources`) only ever ask "the file called X",
so they work the same on a directory the operator gave and on an archive unpacked for them.
A name a source gives (a docker `manifest.json` lists file names) never reaches outside the
source: `..`, absolute names and, in a directory, symlinks leading out are refused, so a
crafted source cannot have `/etc/shadow` imported as a layer. Only regular files are read.
"""

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from minimal_registry.content.archive import StagedArchive
from minimal_registry.content.entry import Entry
from minimal_registry.fatal import Fatal

MAX_JSON = 64 * 1024 * 1024  # index.json / manifest.json of even a huge archive is far smaller


class NotRegular(Exception):
    """The path is a FIFO, a device, a directory or a socket: str() says which."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


def printable(text: str) -> str:
    """`text` with control characters escaped: a name from a source never breaks a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


@contextmanager
def open_regular(path: Path, follow_links: bool = True) -> Iterator[BinaryIO]:
    """Open `path` for reading only if it is a regular file, decided on the open descriptor.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, so a
    FIFO or device put in place of a file is refused, never read (a device without end).
    Without `follow_links`, a symlink fails with ELOOP.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        raise NotRegular(kind_of(os.stat(path).st_mode)) from None  # a socket cannot be opened
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(kind_of(mode))
        os.set_blocking(fd, True)
        reader = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with reader:
        yield reader


class SourceFiles:
    def __init__(self, label: str, directory: Optional[Path] = None, staged: Optional[StagedArchive] = None):
        self.label = label
        self._directory = directory
        self._staged = staged

    def lookup(self, name: str) -> Optional[Entry]:
        if name.startswith("/") or ".." in name.split("/"):
            raise Fatal(f"{self.label} names {name!r}, outside the source",
                        "refusing a source that points at files outside itself")
        if self._staged is not None:
            return self._staged.lookup(name)
        path = self._directory / name
        try:
            if not path.is_file():
                return None
            real, inside = os.path.realpath(path), os.path.realpath(self._directory)
            if os.path.commonpath([real, inside]) != inside:
                raise Fatal(f"{self.label}: {printable(name)} is a link to {real}, outside the source",
                            "refusing a source that points at files outside itself")
            return Entry(path, path.stat().st_size)
        except OSError:
            return None

    def exists(self, name: str) -> bool:
        return self.lookup(name) is not None

    def read_bytes(self, name: str, limit: int = MAX_JSON) -> bytes:
        entry = self.lookup(name)
        if entry is None:
            raise Fatal(f"{self.label}: {printable(name)} is missing", "the source is incomplete")
        if entry.size > limit:
            raise Fatal(f"{self.label}: {printable(name)} is {entry.size} bytes, too big to be what it claims",
                        "check the source")
        try:
            with open_regular(entry.path) as reader:
                data = reader.read(limit + 1)
        except NotRegular as problem:
            raise Fatal(f"{self.label}: {printable(name)} is {problem}, not a regular file", "check the source") from None
        if len(data) > limit:
            raise Fatal(f"{self.label}: {printable(name)} grew past {limit} bytes while it was read", "check the source")
        return data
