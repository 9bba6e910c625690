"""Put content into the tree: blobs, manifests, tags and `blobs` links, each atomically.

Order matters for a reader running at the same time and for an import cut short: blobs
first, then manifests (children before the index that lists them), then tags, so a tag
never names a manifest whose content is not all there. Each file is checked against its
digest before it gets its final name, and nothing that is already right is touched, so
running the same import twice changes nothing; a blob whose copy in the tree is damaged is
not right, and is replaced (`intact`).
"""

import errno
import os
from pathlib import Path
from typing import Optional, Set, Union

from minimal_registry import layout
from minimal_registry.manifest import MAX_MANIFEST_SIZE, sha256_digest
from minimal_registry.content import atomic, files, hashing
from minimal_registry.content.entry import Entry
from minimal_registry.content.intact import TreeBlobs
from minimal_registry.fatal import Fatal


KEPT, NEW, REPAIRED = "kept", "new", "repaired"


class Placer:
    def __init__(self, tree: Path, tree_blobs: Optional[TreeBlobs] = None):
        self.tree = tree
        self.tree_blobs = tree_blobs or TreeBlobs(tree)
        self.touched_dirs: Set[Path] = set()

    # ----- blobs -----------------------------------------------------------------------

    def blob(self, digest: str, source: Union[Entry, bytes, None], size: int, where: str) -> str:
        """Place one blob: KEPT (the tree's copy is intact), NEW, or REPAIRED (it was damaged)."""
        final = layout.shared_blob_path(self.tree, digest)
        if self.tree_blobs.holds(digest, size):
            return KEPT
        if source is None:
            raise Fatal(f"blob {digest} vanished from the tree during the import", "run the import again")
        self._real_directory(final.parent)
        if isinstance(source, bytes):
            _check(digest, sha256_digest(source), where)
            atomic.write_bytes(final, source)
        elif source.owned and source.digest is not None and source.path.exists():
            _check(digest, source.digest, where)
            atomic.fsync_file(source.path)
            try:
                os.replace(source.path, final)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                self._copy(source, final, digest, where)
        else:
            self._copy(source, final, digest, where)
        self.touched_dirs.add(final.parent)
        self.tree_blobs.placed(digest, size)
        return REPAIRED if digest in self.tree_blobs.damaged else NEW

    def _copy(self, source: Entry, final: Path, digest: str, where: str) -> None:
        temporary = atomic.temp_path(final)
        try:
            try:
                reader = files.open_regular(source.path)
                with reader as opened, open(temporary, "xb") as out:
                    # One byte past the expected size is enough to know a file that grew is wrong.
                    actual, _ = hashing.copy_hashed(opened, out, limit=source.size + 1)
                    out.flush()
                    os.fsync(out.fileno())
            except files.NotRegular as problem:
                raise Fatal(f"{where}: {source.path} is now {problem}, not a regular file",
                            "something changed the source during the import; run it again") from None
            _check(digest, actual, f"{where} ({source.path})")
            os.replace(temporary, final)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise

    # ----- repositories, manifests, tags -----------------------------------------------

    def repository(self, name: str, namespace: Optional[str]) -> Path:
        """Make `[<ns>/]<name>/manifests` and a `blobs -> ../blobs` link at every level."""
        manifests = layout.manifests_dir(self.tree, name, namespace)
        self._real_directory(manifests)
        level = self.tree
        relative = layout.repository_dir(self.tree, name, namespace).relative_to(self.tree)
        for part in relative.parts:
            level = level / part
            link = level / layout.BLOBS
            if not os.path.lexists(link):
                atomic.symlink(link, f"../{layout.BLOBS}")
                self.touched_dirs.add(level)
        return manifests

    def manifest(self, manifests: Path, digest: str, body: bytes) -> bool:
        final = manifests / digest
        if _regular_file_bytes(final, len(body)) == body:
            return False
        _check(digest, sha256_digest(body), str(final))
        atomic.write_bytes(final, body)
        self.touched_dirs.add(manifests)
        return True

    def tag(self, manifests: Path, tag: str, digest: str) -> str:
        """`same`, `new` or `moved` (it named another manifest before)."""
        final = manifests / tag
        state = "new"
        if os.path.islink(final):
            if layout.tag_target_digest(final) == digest and (manifests / digest).exists():
                return "same"
            state = "moved"
        elif os.path.lexists(final):
            copy = _regular_file_bytes(final, MAX_MANIFEST_SIZE)
            if copy is not None and sha256_digest(copy) == digest:
                return "same"  # a plain copy of the right manifest (older trees) is fine
            state = "moved"
        atomic.symlink(final, digest)
        self.touched_dirs.add(manifests)
        return state

    def _real_directory(self, directory: Path) -> None:
        """Make `directory` (inside the tree) a directory, refusing any symlink on the way.

        The import writes only through real directories below the tree's root: a
        `manifests` or repository directory linking elsewhere would have it write there.
        (The tree's root itself may be a link; the `blobs -> ../blobs` links are never
        written through.)
        """
        level = self.tree
        for part in directory.relative_to(self.tree).parts:
            level = level / part
            try:
                os.mkdir(level)
                self.touched_dirs.add(level.parent)
                continue
            except FileExistsError:
                pass
            if os.path.islink(level) or not os.path.isdir(level):
                what = "a symlink" if os.path.islink(level) else "not a directory"
                raise Fatal(f"{level.relative_to(self.tree)} in the tree {self.tree} is {what}: "
                            "the import writes only into real directories of the tree",
                            "move it away (its content is not what the tree should hold) and import again")

    def sync(self) -> None:
        atomic.fsync_dirs(self.touched_dirs)
        self.touched_dirs.clear()


def _regular_file_bytes(path: Path, limit: int) -> Optional[bytes]:
    """The bytes of `path` if it is a regular file (not a link, FIFO or device) of at most
    `limit` bytes; None otherwise: then it is replaced, never waited on or read without end."""
    try:
        with files.open_regular(path, follow_links=False) as reader:
            data = reader.read(limit + 1)
    except (OSError, files.NotRegular):
        return None
    return data if len(data) <= limit else None


def _check(expected: str, actual: str, where: str) -> None:
    if expected != actual:
        raise Fatal(f"{where}: content of {expected} hashes to {actual}",
                    "the source is damaged; pull or copy it again")
