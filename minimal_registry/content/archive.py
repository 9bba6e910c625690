"""Unpack a tar archive (plain or compressed) into a staging directory, safely, in one pass.

The archive is read as a stream, so a multi-gigabyte `.tar.zst` is never seeked or read
twice: each regular file is written and hashed on the way, and its digest is remembered so
it can later be renamed into the tree without reading it again.

Nothing in an archive may write outside the staging directory: absolute names and `..` are
refused; links are not created on disk but remembered as aliases, resolved inside the
archive only; devices and FIFOs are skipped.
"""

import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

from minimal_registry.content import decompress, hashing
from minimal_registry.content.progress import Progress
from minimal_registry.fatal import Fatal

MAX_LINK_HOPS = 16


@dataclass(frozen=True)
class Entry:
    """One regular file: where it is on disk, its size, and its digest when already known."""

    path: Path
    size: int
    digest: Optional[str] = None  # `sha256:<hex>` when hashed while unpacking
    owned: bool = False  # a staged copy the importer may rename away


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
          already_have: Optional[Callable[[str, int], bool]] = None) -> StagedArchive:
    """Unpack `archive` into the (new, empty) directory `staging`.

    `already_have(name, size)`: members it says yes to are read past, not written (content
    the tree already holds: re-importing a big archive then writes nothing).
    """
    staged = StagedArchive(staging)
    progress = Progress(f"unpack {archive.name}", archive.stat().st_size, enabled=not quiet)
    try:
        with decompress.open_stream(archive, on_bytes=progress.add) as raw:
            with tarfile.open(fileobj=_ReadGuard(raw), mode="r|") as tar:
                for member in tar:
                    if member.isreg() and already_have is not None and already_have(member.name, member.size):
                        continue
                    _unpack_member(tar, member, staged, archive)
                    progress.tick()
        progress.done = progress.total  # the tar's end padding is never read
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
            raise _ReadProblem(f"{member.name} ends after {size} of {member.size} bytes")
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
