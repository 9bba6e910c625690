"""Writing files so that nothing is ever half-written under its final name.

Every file goes to a temporary name in the directory it ends up in (a name starting with a
dot, which no digest or tag can), is flushed to disk, and is renamed over the final name:
rename is atomic within a filesystem, so a reader sees the old file or the new one, never a
part. The directory itself is synced afterwards so the rename survives a power cut.
"""

import os
import secrets
from pathlib import Path
from typing import Iterable

TEMP_PREFIX = ".tmp-"


def temp_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name[:80]}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def write_bytes(final: Path, data: bytes) -> None:
    temporary = temp_path(final)
    try:
        with open(temporary, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except BaseException:
        _discard(temporary)
        raise


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def symlink(final: Path, target: str) -> None:
    """Make `final` a symlink to `target`, replacing whatever was there in one step."""
    temporary = temp_path(final)
    try:
        os.symlink(target, temporary)
        os.replace(temporary, final)
    except BaseException:
        _discard(temporary)
        raise


def fsync_dirs(directories: Iterable[Path]) -> None:
    for directory in sorted(set(directories)):
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems cannot sync a directory; the rename is still atomic
        finally:
            os.close(fd)


def _discard(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
