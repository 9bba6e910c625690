"""Unpack a tar archive (plain or compressed) into a staging directory, safely, in one pass.

The archive is read as a stream, so a multi-gigabyte `.tar.zst` is never seeked or read
twice: each regular file is written and hashed on the way, and its digest is remembered so
it can later be renamed into the tree without reading it again.

Nothing in an archive may write outside the staging directory: absolute names and `..` are
refused; links are not created on disk but remembered as aliases, resolved inside the
archive only; devices and FIFOs are skipped.

Nor may an archive take more than it has a right to: a tar header that asks for more than
MAX_METADATA of pax or long-name text (read into memory whole) is refused before it is read,
a member bigger than the free space of the tree's filesystem before it is written, and a
member the readers load whole (`index.json`) as soon as its header says it is over its limit.
"""

import errno
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from minimal_registry.content import decompress, hashing
from minimal_registry.content.entry import Entry
from minimal_registry.content.formatting import human_bytes
from minimal_registry.content.progress import Progress
from minimal_registry.fatal import Fatal

MAX_LINK_HOPS = 16
# An OCI layout nests 3 levels, a docker save 2; the K3s airgap archive holds a few hundred
# members. Far more is an archive built to exhaust inodes, memory or the stack.
MAX_NAME_DEPTH = 32
MAX_MEMBERS = 100_000
# pax headers and GNU long names hold a path and a few attributes: a few KB at most.
MAX_METADATA = 1024 * 1024
_METADATA_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                   tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# A member that cannot be written for one of these reasons is a fault of the archive's names
# (a file where a directory was, a name too long), not of the disk.
_NAME_CLASHES = (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG)


@dataclass
class StagedArchive:
    root: Path
    files: Dict[str, Entry] = field(default_factory=dict)  # normalised member name -> entry
    links: Dict[str, str] = field(default_factory=dict)  # member name -> member name it names

    def lookup(self, name: str) -> Optional[Entry]:
        name = _normalise(name)
        for _ in range(MAX_LINK_HOPS):
            if name is None:
                return None
            if name in self.files:
                return self.files[name]
            if name not in self.links:
                return None
            name = self.links[name]
        return None


def is_tar(path: Path) -> bool:
    """Whether `path` is compressed (then only unpacking can tell) or starts with a tar header."""
    if decompress.sniff(path) != "plain":
        return True
    try:
        with decompress.open_stream(path) as stream:
            header = stream.read(512)
    except Fatal:
        return True  # zstd we cannot read here: let stage() say so
    except Exception:  # each decompressor raises its own error for bytes it cannot read
        return False
    return len(header) == 512 and header[257:262] == b"ustar" or _v7_checksum_ok(header)


def stage(archive: Path, staging: Path, quiet: bool = False,
          already_have: Optional[Callable[[str, int], bool]] = None,
          size_limits: Optional[Mapping[str, int]] = None) -> StagedArchive:
    """Unpack `archive` into the (new, empty) directory `staging`.

    `already_have(name, size)`: members it says yes to are read past, not written (content
    the tree already holds: re-importing a big archive then writes nothing).
    `size_limits`: member name -> the most bytes that member may have.
    """
    staged = StagedArchive(staging)
    progress = Progress(f"unpack {archive.name}", archive.stat().st_size, enabled=not quiet)
    try:
        with decompress.open_stream(archive, on_bytes=progress.add) as raw:
            with tarfile.open(fileobj=_ReadGuard(raw), mode="r|", tarinfo=_BoundedTarInfo) as tar:
                for count, member in enumerate(tar, start=1):
                    if count > MAX_MEMBERS:
                        raise Fatal(f"{archive} holds more than {MAX_MEMBERS} members",
                                    "no image archive comes near that; check the archive")
                    if member.isreg() and already_have is not None and already_have(member.name, member.size):
                        continue
                    if member.isreg():
                        _check_room(archive, staging, member, size_limits or {})
                    _unpack_member(tar, member, staged, archive)
                    progress.tick()
        progress.done = progress.total  # the tar's end padding is never read
    except _MetadataTooBig as header:
        raise Fatal(f"{archive}: a tar header asks for {header.size} bytes of metadata "
                    f"(a real archive needs a few KB)", "the archive is damaged or hostile; copy it again") from None
    except _ReadProblem as problem:
        raise Fatal(f"{archive} is damaged or truncated ({problem})", "copy the archive again") from None
    except tarfile.TarError as error:
        raise Fatal(f"{archive} is damaged or truncated, or not a tar archive ({error})",
                    "give an OCI layout directory, an OCI or docker-save tar (plain, .gz or .zst)") from None
    except OSError as error:
        raise Fatal(f"cannot unpack {archive} into {staging}: {error.strerror or error}",
                    "check the free space and permissions of the content tree") from None
    finally:
        progress.finish()
    return staged


class _MetadataTooBig(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a pax header or GNU long name over MAX_METADATA before
    tarfile reads it into memory whole (a few KB of zstd can ask for gigabytes)."""

    def _proc_member(self, tarfile_):  # tarfile's documented hook for subclasses
        if self.type in _METADATA_TYPES and self.size > MAX_METADATA:
            raise _MetadataTooBig(self.size)
        return super()._proc_member(tarfile_)


def _check_room(archive: Path, staging: Path, member: tarfile.TarInfo, size_limits: Mapping[str, int]) -> None:
    name = _normalise(member.name)
    limit = size_limits.get(name) if name is not None else None
    if limit is not None and member.size > limit:
        raise Fatal(f"{archive}: member {name!r} is {member.size} bytes, over its {_limit_text(limit)} limit",
                    "no real image archive holds one that big; check the archive")
    if member.size > 0:
        usage = os.statvfs(staging)
        free = usage.f_bavail * usage.f_frsize
        if member.size > free:
            raise Fatal(f"{archive}: member {member.name!r} needs {human_bytes(member.size)}, "
                        f"the tree's filesystem has {human_bytes(free)} free",
                        "free space where the content tree is, or check the archive")


def _limit_text(limit: int) -> str:
    mib = 1024 * 1024
    return f"{limit // mib} MiB" if limit % mib == 0 else human_bytes(limit)


class _ReadProblem(Exception):
    """Reading or decompressing the archive failed (as opposed to writing the staged copy)."""


class _ReadGuard:
    """Turns every error of the decompressing stream into a _ReadProblem."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except Exception as error:  # gzip, lzma, bz2 and zstandard each raise their own
            raise _ReadProblem(str(error) or type(error).__name__) from None


def _unpack_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staged: StagedArchive, archive: Path) -> None:
    name = _normalise(member.name)
    if name is None:
        raise Fatal(f"{archive} holds an unsafe path {member.name!r}",
                    "refusing to unpack an archive that writes outside its own directory")
    if name == "":
        return
    if name.count("/") >= MAX_NAME_DEPTH:
        raise Fatal(f"{archive}: member {member.name[:80]!r}... nests {name.count('/')} directories deep",
                    "no image archive nests more than a few levels; check the archive")
    try:
        _write_member(tar, member, name, staged)
    except OSError as error:
        if error.errno not in _NAME_CLASHES:
            raise
        raise Fatal(f"{archive}: member {member.name!r} cannot be unpacked ({error.strerror})",
                    "its name clashes with another member's or is too long: the archive is damaged") from None


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, staged: StagedArchive) -> None:
    if member.isdir():
        (staged.root / name).mkdir(parents=True, exist_ok=True)
    elif member.isreg():
        target = staged.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.links.pop(name, None)
        source = tar.extractfile(member)
        with open(target, "wb") as out:
            digest, size = hashing.copy_hashed(source, out)
        if size != member.size:
            raise _ReadProblem(f"{member.name!r} ends after {size} of {member.size} bytes")
        staged.files[name] = Entry(target, size, digest, owned=True)
    elif member.issym():
        link = member.linkname
        joined = link if link.startswith("/") else posixpath.join(posixpath.dirname(name), link)
        resolved = _normalise(joined.lstrip("/")) if not link.startswith("/") else None
        if resolved is not None:
            staged.files.pop(name, None)
            staged.links[name] = resolved
    elif member.islnk():
        resolved = _normalise(member.linkname)
        if resolved is not None:
            staged.files.pop(name, None)
            staged.links[name] = resolved
    # Devices, FIFOs and the like have no place in an image archive: skipped.


def _normalise(name: str) -> Optional[str]:
    """`./blobs//sha256/x` -> `blobs/sha256/x`; None for absolute paths or any `..`."""
    if name.startswith("/"):
        return None
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            return None
        parts.append(part)
    return "/".join(parts)


def _v7_checksum_ok(header: bytes) -> bool:
    """An old-style (pre-POSIX) tar header: its checksum field adds up."""
    if len(header) < 512 or not header[:100].strip(b"\0"):
        return False
    try:
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:512])
    return stored == computed
