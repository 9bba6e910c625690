"""sha256 of files at disk speed: large reads into one reused buffer, every core busy.

`hashlib` releases the GIL while it hashes a buffer of more than 2 KiB, and `readinto`
releases it while the kernel copies, so plain threads hash several files truly in parallel.
"""

import hashlib
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterable, Optional, Tuple

CHUNK = 4 * 1024 * 1024

ProgressCallback = Callable[[int], None]


def hash_file(path: Path, on_bytes: Optional[ProgressCallback] = None) -> Tuple[str, int]:
    """(`sha256:<hex>`, size in bytes) of the file at `path`."""
    with open(path, "rb", buffering=0) as source:
        return hash_open_file(source, on_bytes)


def hash_open_file(source: BinaryIO, on_bytes: Optional[ProgressCallback] = None) -> Tuple[str, int]:
    """(`sha256:<hex>`, bytes read) of an open file, from where it stands to its end."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    _advise_sequential(source)
    while True:
        count = source.readinto(buffer)
        if not count:
            break
        hasher.update(view[:count])
        total += count
        if on_bytes:
            on_bytes(count)
    return "sha256:" + hasher.hexdigest(), total


def copy_hashed(source: BinaryIO, destination: BinaryIO, limit: Optional[int] = None) -> Tuple[str, int]:
    """Copy `source` to `destination` (at most `limit` bytes), hashing on the way."""
    hasher = hashlib.sha256()
    total = 0
    while limit is None or total < limit:
        want = CHUNK if limit is None else min(CHUNK, limit - total)
        chunk = source.read(want)
        if not chunk:
            break
        hasher.update(chunk)
        destination.write(chunk)
        total += len(chunk)
    return "sha256:" + hasher.hexdigest(), total


def hash_files(paths: Iterable[Path], workers: Optional[int] = None,
               on_bytes: Optional[ProgressCallback] = None,
               on_tick: Optional[Callable[[], None]] = None,
               tick_seconds: float = 0.2) -> Dict[Path, object]:
    """Hash every path on `workers` threads (default: one per core); path -> (digest, size) or OSError.

    Biggest files start first so that the last one to finish is a small one. `on_bytes` is
    called from the worker threads; `on_tick` from the calling thread, a few times a second.
    """
    ordered = sorted(set(paths), key=_size_or_zero, reverse=True)
    results: Dict[Path, object] = {}
    lock = threading.Lock()

    def counted(count: int) -> None:
        if on_bytes:
            with lock:
                on_bytes(count)

    def one(path: Path):
        try:
            return hash_file(path, counted)
        except OSError as error:
            return error

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        pending = {pool.submit(one, path): path for path in ordered}
        while pending:
            done, _ = wait(pending, timeout=tick_seconds, return_when=FIRST_COMPLETED)
            for future in done:
                results[pending.pop(future)] = future.result()
            if on_tick:
                on_tick()
    return results


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _advise_sequential(source) -> None:
    try:
        os.posix_fadvise(source.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
