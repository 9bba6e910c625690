"""The content tree as the server reads it: find manifests and blobs, safely and cheaply.

Paths are built (from `layout`'s names) only from names, tags and digests that `reference` accepted,
and a file is served only if its real path lies inside the real path of the tree, or of the
tree's top-level `blobs` directory (which an operator may keep on another disk). A symlink
planted in the tree that points elsewhere is refused.

Manifest metadata is cached keyed on the file's (device, inode, size, mtime): a tag
re-pointed or a file replaced by rename is seen at once, and a repeated request costs a
stat, no read, no hash, no JSON parse. Blobs are never read or hashed here.
"""

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from minimal_registry import errors, layout, manifest, reference
from minimal_registry.manifest import Manifest, NotAManifest

log = logging.getLogger("minimal_registry")

# Enough for every manifest of a large tree; past it the cache starts over (cheap to refill).
MANIFEST_CACHE_ENTRIES = 16384
# Links to a name in the same directory followed in a row (tag -> sha256:...) before giving up.
MAX_LOCAL_LINKS = 8


@dataclass(frozen=True)
class BlobFile:
    path: str  # real path, inside the tree
    size: int
    digest: str


StatKey = Tuple[int, int, int, int]


class ManifestCache:
    """Parsed manifests (or why a file is not one), keyed on the file's identity."""

    def __init__(self, capacity: int = MANIFEST_CACHE_ENTRIES):
        self.capacity = capacity
        self._entries: Dict[StatKey, Union[Manifest, NotAManifest]] = {}
        self.loads = 0  # files read and parsed: a test reads it to prove the cache works

    def get(self, path: str, st: os.stat_result) -> Manifest:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._load(path, st)
            if len(self._entries) >= self.capacity:
                self._entries.clear()
            self._entries[key] = entry
        if isinstance(entry, NotAManifest):
            raise entry
        return entry

    def _load(self, path: str, st: os.stat_result) -> Union[Manifest, NotAManifest]:
        self.loads += 1
        if st.st_size > manifest.MAX_MANIFEST_SIZE:
            failure = NotAManifest(f"{st.st_size} bytes is over containerd's 4 MiB manifest limit")
        else:
            try:
                with open(path, "rb") as file:
                    return manifest.parse(file.read(manifest.MAX_MANIFEST_SIZE + 1))
            except NotAManifest as error:
                failure = error
            except OSError as error:
                failure = NotAManifest(f"unreadable ({error.strerror})")
        log.error("refusing %s: not a manifest: %s", path, failure)
        return failure


class ContentTree:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.real_root = os.path.realpath(self.root)
        self.manifests = ManifestCache()
        self._reported_corrupt = set()

    # --- repositories ---------------------------------------------------------------------

    def _repositories(self, name: str, namespace: Optional[str]) -> List[str]:
        """The existing repository directories for `name` (relative to ROOT), namespaced first."""
        if not reference.is_name(name):
            raise errors.name_invalid(name)
        found = [relative for relative in layout.repository_relpaths(name, namespace)
                 if os.path.isdir(f"{self.real_root}/{relative}/{layout.MANIFESTS}")]
        if not found:
            raise errors.name_unknown(name)
        return found

    def tags(self, name: str, namespace: Optional[str] = None) -> List[str]:
        return sorted({tag for relative in self._repositories(name, namespace)
                       for tag in layout.tags(Path(self.real_root, relative, layout.MANIFESTS))})

    def repository_names(self) -> List[str]:
        return sorted(n for n in set(layout.repositories(self.root)) if reference.is_name(n))

    # --- manifests ------------------------------------------------------------------------

    def manifest(self, name: str, ref: str, namespace: Optional[str] = None) -> Manifest:
        """The manifest `ref` (a tag or a digest) names, verified against its digest."""
        if ":" in ref:
            if not reference.looks_like_digest(ref) or (ref.startswith("sha256:") and not reference.is_digest(ref)):
                raise errors.digest_invalid(ref)
            if not reference.is_digest(ref):
                raise errors.manifest_unknown(ref, "only sha256 digests are stored")
        elif not reference.is_tag(ref):
            # The conformance suite wants 404, not 400, for a tag outside the grammar.
            raise errors.manifest_unknown(ref, "invalid tag")

        for repository in self._repositories(name, namespace):
            relative = f"{repository}/{layout.MANIFESTS}/{ref}"
            found = self._find(relative)
            if found is None:
                continue
            real, st = found
            try:
                stored = self.manifests.get(real, st)
            except NotAManifest as error:
                raise errors.manifest_unknown(ref, f"stored file is not a manifest: {error}") from None
            expected = ref if reference.is_digest(ref) else layout.tag_target_digest(Path(self.real_root, relative))
            if expected and stored.digest != expected:
                self._report_corrupt(real, expected, stored.digest)
                raise errors.manifest_unknown(ref, "stored manifest is corrupt: its sha256 differs from its name")
            return stored
        raise errors.manifest_unknown(ref)

    def referrers(self, name: str, digest: str, namespace: Optional[str] = None) -> List[Manifest]:
        if not reference.is_digest(digest):
            raise errors.digest_invalid(digest)
        found = {}
        for repository in self._repositories(name, namespace):
            manifests = f"{repository}/{layout.MANIFESTS}"
            for candidate in layout.manifest_digests(Path(self.real_root, manifests)):
                located = self._find(f"{manifests}/{candidate}")
                if located is None or candidate in found:
                    continue
                try:
                    stored = self.manifests.get(*located)
                except NotAManifest:
                    continue
                if stored.subject == digest and stored.digest == candidate:
                    found[candidate] = stored
        return [found[d] for d in sorted(found)]

    # --- blobs ----------------------------------------------------------------------------

    def blob(self, name: str, digest: str, namespace: Optional[str] = None) -> BlobFile:
        """A blob of repository `name`: `ROOT/blobs/<digest>`, else `<repo>/blobs/<digest>`.

        The shared directory is tried first: it is where blobs live (the repository links
        point there) and the cheapest to reach. A blob is named by its digest, so either
        place holds the same bytes.
        """
        if not reference.is_digest(digest):
            if reference.looks_like_digest(digest) and not digest.startswith("sha256:"):
                raise errors.blob_unknown(digest)
            raise errors.digest_invalid(digest)
        repositories = self._repositories(name, namespace)
        for relative in [f"{layout.BLOBS}/{digest}"] + [f"{r}/{layout.BLOBS}/{digest}" for r in repositories]:
            found = self._find(relative)
            if found is not None:
                real, st = found
                return BlobFile(real, st.st_size, digest)
        raise errors.blob_unknown(digest)

    # --- safety ---------------------------------------------------------------------------

    def _find(self, relative: str) -> Optional[Tuple[str, os.stat_result]]:
        """(real path, stat) of the regular file at ROOT/`relative`, if it lies inside the tree.

        Walks from the tree's real path one component at a time, so the common case costs
        one lstat per component below ROOT (realpath would lstat every component from /).
        A symlink to a name in its own directory (a tag -> sha256:...) is followed in place;
        any other symlink (blobs -> ../blobs, or anything planted) is resolved in full and
        then checked against the tree.
        """
        current = self.real_root
        parts = relative.split("/")
        for index, part in enumerate(parts):
            candidate = f"{current}/{part}"
            try:
                st = os.lstat(candidate)
                for _hop in range(MAX_LOCAL_LINKS):
                    if not stat.S_ISLNK(st.st_mode):
                        break
                    target = os.readlink(candidate)
                    if "/" in target or target in (".", ".."):
                        return self._resolve_in_full("/".join([candidate] + parts[index + 1:]))
                    candidate = f"{current}/{target}"
                    st = os.lstat(candidate)
                else:
                    return None
            except (OSError, ValueError):
                return None
            current = candidate
        return (current, st) if stat.S_ISREG(st.st_mode) else None

    def _resolve_in_full(self, path: str) -> Optional[Tuple[str, os.stat_result]]:
        try:
            real = os.path.realpath(path, strict=True)
            st = os.stat(real)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if _within(real, self.real_root) or _within(real, os.path.realpath(f"{self.real_root}/{layout.BLOBS}")):
            return real, st
        log.warning("refusing %s: it resolves to %s, outside the content tree", path, real)
        return None

    def _report_corrupt(self, path: str, expected: str, actual: str) -> None:
        if (path, actual) not in self._reported_corrupt:
            self._reported_corrupt.add((path, actual))
            log.error("refusing %s: stored as %s but its sha256 is %s", path, expected, actual)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
