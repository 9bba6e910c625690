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

    zstandard's stream_reader hands out at most what is asked for (a decompressobj hands out
    everything a chunk expands to: a few KB of zeros become gigabytes in memory), but reports
    a file cut inside a frame as a clean end: the frame walker beside it tells the two apart.
    """

    def __init__(self, raw):
        import zstandard

        self._frames = _FrameWalker()
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            _Walked(raw, self._frames), read_size=READ_SIZE, read_across_frames=True, closefd=False)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_SIZE), b""))
        data = self._reader.read(size)
        if not data and size and not self._frames.between_frames:
            raise EOFError("the zstd data ends in the middle of a frame: the file is truncated")
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._reader.close()


class _Walked:
    """The compressed bytes, shown to the frame walker on their way to the decompressor."""

    def __init__(self, raw, frames: "_FrameWalker"):
        self._raw = raw
        self._frames = frames

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._frames.feed(data)
        return data


ZSTD_SKIPPABLE_TAIL = b"\x2a\x4d\x18"  # skippable frames: magic 0x184D2A50..5F, little-endian


class _FrameWalker:
    """Follows zstd frame and block headers (RFC 8878, section 3.1) in the compressed bytes,
    passing over block contents unread, to know whether the data so far ends between frames."""

    def __init__(self):
        self._state = "magic"
        self._need = 4  # header bytes the current state reads
        self._header = bytearray()
        self._skip = 0  # block or skippable-frame content still to pass over
        self._checksum = False

    @property
    def between_frames(self) -> bool:
        return self._state == "magic" and not self._header and not self._skip

    def feed(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            if self._skip:
                passed = min(self._skip, len(data) - position)
                self._skip -= passed
                position += passed
                continue
            taken = min(self._need - len(self._header), len(data) - position)
            self._header += data[position:position + taken]
            position += taken
            if len(self._header) == self._need:
                header = bytes(self._header)
                self._header.clear()
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        if self._state == "magic":
            if header == ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif header[1:] == ZSTD_SKIPPABLE_TAIL and header[0] & 0xF0 == 0x50:
                self._state, self._need = "skippable size", 4
            else:
                raise ValueError("not a zstd frame where one should start")
        elif self._state == "skippable size":
            self._skip = int.from_bytes(header, "little")
            self._state, self._need = "magic", 4
        elif self._state == "descriptor":
            descriptor = header[0]
            single_segment = bool(descriptor & 0x20)
            self._checksum = bool(descriptor & 0x04)
            content_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03] + content_size
            self._state, self._need = ("frame header", rest) if rest else ("block", 3)
        elif self._state == "frame header":
            self._state, self._need = "block", 3
        elif self._state == "block":
            value = int.from_bytes(header, "little")
            block_type, block_size = (value >> 1) & 0x03, value >> 3
            if block_type == 3:
                raise ValueError("a reserved zstd block type")
            self._skip = 1 if block_type == 1 else block_size  # an RLE block holds one byte
            if value & 0x01:  # the frame's last block
                self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
        else:  # checksum
            self._state, self._need = "magic", 4


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
