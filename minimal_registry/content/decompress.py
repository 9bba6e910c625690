"""Open a possibly compressed file as one stream of plain bytes: plain, gzip, bzip2, xz or zstd.

The kind is read from the file's first bytes, not its name. zstd (K3s airgap tarballs are
`.tar.zst`) uses the `zstandard` module when it is installed (the `zstd` extra; PyInstaller
bundles it), else the `zstd` command; without either it is a clear error, not a traceback.
"""

import bz2
import gzip
import lzma
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from minimal_registry.fatal import Fatal

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"
READ_SIZE = 1024 * 1024


def sniff(path: Path) -> str:
    """`gzip`, `zstd`, `bzip2`, `xz` or `plain`."""
    with open(path, "rb") as head:
        magic = head.read(6)
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic.startswith(ZSTD_MAGIC):
        return "zstd"
    if magic.startswith(BZIP2_MAGIC):
        return "bzip2"
    if magic.startswith(XZ_MAGIC):
        return "xz"
    return "plain"


class _Counting:
    """A read-only file object that reports how many compressed bytes were read."""

    def __init__(self, raw: BinaryIO, on_bytes: Optional[Callable[[int], None]]):
        self._raw = raw
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if self._on_bytes and data:
            self._on_bytes(len(data))
        return data

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        if self._on_bytes and count:
            self._on_bytes(count)
        return count

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()


@contextmanager
def open_stream(path: Path, on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[BinaryIO]:
    """The decompressed bytes of `path`; `on_bytes` counts the bytes read from disk."""
    kind = sniff(path)
    if kind == "zstd" and not _have_zstandard():
        with _zstd_command(path) as stream:
            yield stream
        return
    with open(path, "rb") as raw_file:
        raw = _Counting(raw_file, on_bytes)
        if kind == "plain":
            yield raw
        elif kind == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        elif kind == "bzip2":
            with bz2.BZ2File(raw, mode="rb") as stream:
                yield stream
        elif kind == "xz":
            with lzma.LZMAFile(raw, mode="rb") as stream:
                yield stream
        else:
            yield _ZstdReader(raw)


class _ZstdReader:
    """zstd frames, one after another, as a stream; a file that ends inside a frame is an error.

    (`zstandard`'s own stream_reader reports such a truncated file as a clean end.)
    """

    def __init__(self, raw):
        import zstandard

        self._zstandard = zstandard
        self._raw = raw
        self._decoder = zstandard.ZstdDecompressor().decompressobj()
        self._buffer = bytearray()
        self._position = 0
        self._finished = False
        self._in_frame = False

    def read(self, size: int = -1) -> bytes:
        while not self._finished and (size < 0 or len(self._buffer) - self._position < size):
            chunk = self._raw.read(READ_SIZE)
            if not chunk:
                self._finished = True
                if self._in_frame:
                    raise EOFError("the zstd data ends in the middle of a frame: the file is truncated")
                break
            if self._position:  # drop what was read before growing the buffer, not on every read
                del self._buffer[:self._position]
                self._position = 0
            self._feed(chunk)
        end = len(self._buffer) if size < 0 else min(len(self._buffer), self._position + size)
        data = bytes(self._buffer[self._position:end])
        self._position = end
        return data

    def _feed(self, chunk: bytes) -> None:
        while chunk:
            self._in_frame = True
            self._buffer += self._decoder.decompress(chunk)
            if not self._decoder.eof:
                return
            self._in_frame = False
            chunk = self._decoder.unused_data
            self._decoder = self._zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _have_zstandard() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _zstd_command(path: Path) -> Iterator[BinaryIO]:
    command = shutil.which("zstd")
    if command is None:
        raise Fatal(
            f"{path} is zstd-compressed and this build cannot read zstd",
            "install the `zstandard` Python package (pip install 'minimal-registry[zstd]') "
            "or the `zstd` command, or unpack it first: zstd -d FILE",
        )
    process = subprocess.Popen([command, "-q", "-d", "-c", "--", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield process.stdout
        # Read to the end so a truncated file shows up as zstd's error, not as silence.
        while process.stdout.read(READ_SIZE):
            pass
    finally:
        process.stdout.close()
        _, error = process.communicate()
        if process.returncode and process.returncode > 0:  # < 0: we closed the pipe early
            raise Fatal(f"cannot decompress {path}: {error.decode(errors='replace').strip()}",
                        "the archive is damaged or incomplete; copy it again")
