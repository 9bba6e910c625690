"""The content tree as the server reads it: find manifests and blobs, safely and cheaply.

Paths are built (from `layout`'s names) only from names, tags and digests that `reference`
accepted, and a file is used only under `treesafety`'s rule: its real path lies inside the
tree (or the tree's top-level `blobs`, which an operator may keep on another disk), and only
a regular file is ever opened. A symlink planted in the tree that points elsewhere is refused.

Manifests. A lookup (repository, namespace, tag or digest) is answered from memory while
one `stat` of the file the request names (following a tag's link) shows the same file:
(device, inode, size, mtime, ctime). ctime cannot be set from user space and changes on
every write, rename, link or re-creation, so a tag re-pointed, a file replaced by rename,
rewritten in place with the same size and mtime (`cp -p`, `rsync -t`), or deleted and
re-created on a reused inode is seen at once. A file changed within SETTLE_SECONDS before it
was read is not trusted from memory (a second write in the same clock tick would keep its
ctime): it is read again until it has settled. On a miss the tag link is read once, and the
bytes come from the file that one reading named, so an answer is wholly one manifest.

Only a verdict on bytes is remembered ("not a manifest", "corrupt"); a failure to read
(EMFILE, EIO, EACCES) is a 503 from `faults`, tried again on the next request. Blobs are
never read or hashed here.
"""

import errno
import io
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from minimal_registry import errors, layout, manifest, reference
from minimal_registry.catalog import Catalog
from minimal_registry.faults import ReadFaults, is_broken, is_missing
from minimal_registry.manifest import Manifest, NotAManifest
from minimal_registry.treesafety import OpenFile, Refused, TreeBounds, kind_of

log = logging.getLogger("minimal_registry")

# Enough for every manifest of a large tree; past either bound a cache starts over (cheap to
# refill). The byte bound keeps a tree of many big manifests (up to 4 MiB each) from
# growing the process without end.
MANIFEST_CACHE_ENTRIES = 16384
MANIFEST_CACHE_BYTES = 128 * 1024 * 1024
# Links to a name in the same directory followed in a row (tag -> sha256:...) before giving up.
MAX_LOCAL_LINKS = 8
# A file whose ctime is this close to the moment it was read is read again next time. File
# times come from the kernel's coarse clock (one tick, at most 10 ms); a second covers that
# and a network file system's clock a little off.
SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class BlobFile:
    path: str  # real path, inside the tree
    size: int
    digest: str


Identity = Tuple[int, int, int, int, int]


class BoundedCache(dict):
    """A dict that starts over when it holds too many entries or too many manifest bytes."""

    def __init__(self, entries: int = MANIFEST_CACHE_ENTRIES):
        super().__init__()
        self.max_entries, self.bytes = entries, 0
        self._sizes = {}

    def put(self, key, value, size: int) -> None:
        self.bytes -= self._sizes.pop(key, 0)  # a replaced entry gives its bytes back
        if len(self) >= self.max_entries or self.bytes + size > MANIFEST_CACHE_BYTES:
            self.clear()
            self._sizes.clear()
            self.bytes = 0
        self[key] = value
        self._sizes[key] = size
        self.bytes += size


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _settled(st_ctime_ns: int, read_started_ns: int) -> bool:
    return st_ctime_ns < read_started_ns - int(SETTLE_SECONDS * 1e9)


class ManifestCache:
    """Parsed manifests (or why a file is not one), one entry per file (its real path), valid
    while the file keeps its identity. A file rewritten a thousand times holds one entry, not
    a thousand: memory follows the tree, not its history."""

    def __init__(self, capacity: int = MANIFEST_CACHE_ENTRIES):
        self.capacity = capacity
        self._entries = BoundedCache(capacity)  # real path -> (identity, verdict, time.time_ns() read began)
        self.loads = 0  # files read and parsed: a test reads it to prove the cache works
        self._reported = set()

    def peek(self, path: str, st: os.stat_result) -> Optional[Union[Manifest, NotAManifest]]:
        """The verdict on the file at real path `path` if it is known for this identity and the
        file had settled when it was read."""
        found = self._entries.get(path)
        if found is not None and found[0] == identity(st) and _settled(st.st_ctime_ns, found[2]):
            return found[1]
        return None

    def get(self, opened: OpenFile) -> Manifest:
        """The manifest in an open file; NotAManifest if it is not one; OSError if unreadable."""
        verdict = self.peek(opened.real_path, opened.stat)
        if verdict is None:
            started = time.time_ns()
            verdict = self._load(opened)  # an OSError propagates: nothing remembered
            self._entries.put(opened.real_path, (identity(opened.stat), verdict, started),
                              verdict.size if isinstance(verdict, Manifest) else 0)
        if isinstance(verdict, NotAManifest):
            raise verdict
        return verdict

    def _load(self, opened: OpenFile) -> Union[Manifest, NotAManifest]:
        self.loads += 1
        if opened.stat.st_size > manifest.MAX_MANIFEST_SIZE:
            failure = NotAManifest(f"{opened.stat.st_size} bytes is over containerd's 4 MiB manifest limit")
        else:
            body = opened.read(manifest.MAX_MANIFEST_SIZE + 1)
            after = os.fstat(opened.fd)
            if len(body) != after.st_size or (after.st_size, after.st_mtime_ns) != (
                    opened.stat.st_size, opened.stat.st_mtime_ns):
                # Written in place while read: the bytes are no verdict on the file. A 503
                # (faults), and the next request reads it again.
                raise OSError(errno.EAGAIN, "it changed while being read", opened.real_path)
            try:
                return manifest.parse(body)
            except NotAManifest as error:
                failure = error
        if (opened.real_path, str(failure)) not in self._reported:  # a re-read says nothing new
            if len(self._reported) >= self.capacity:
                self._reported.clear()
            self._reported.add((opened.real_path, str(failure)))
            log.error("refusing %s: not a manifest: %s", opened.real_path, failure)
        return failure


@dataclass(frozen=True)
class Lookup:
    """A manifest request answered before, and what shows the answer still holds."""

    manifest: Manifest
    path: str  # what the request names: ROOT/<repository>/manifests/<ref>
    identity: Identity  # of the file read (a tag's link followed)
    read_started: int  # time.time_ns() before reading
    earlier: Tuple[str, ...]  # candidates tried first (`<ns>/<name>`), absent then


class ContentTree:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.bounds = TreeBounds(root)
        self.manifests = ManifestCache()
        self.catalog = Catalog(self.root)
        self.faults = ReadFaults()
        self._lookups = BoundedCache()  # (namespace, name, ref) -> Lookup
        self._blob_lookups = BoundedCache()  # (namespace, name, digest) -> (manifests/, BlobFile, identity)
        self._reported = set()  # (path, what) already logged: one line per refusal
        self._tree_missing = False

    @property
    def real_root(self) -> str:
        return self.bounds.real_root

    # --- repositories ---------------------------------------------------------------------

    def _repositories(self, name: str, namespace: Optional[str]) -> List[Tuple[str, str]]:
        """(path relative to ROOT, real path of its manifests/) of each repository `name`
        names, namespaced first; only directories inside the tree count."""
        if not reference.is_name(name):
            raise errors.name_invalid(name)
        found = []
        for relative in layout.repository_relpaths(name, namespace):
            located = self._find(layout.manifests_relpath(relative), directory=True)
            if located is not None:
                found.append((relative, located[0]))
        if not found:
            self._check_tree()
            raise errors.name_unknown(name)
        if self._tree_missing:
            self._check_tree()
        return found

    def tags(self, name: str, namespace: Optional[str] = None) -> List[str]:
        tags = set()
        for _relative, manifests in self._repositories(name, namespace):
            try:
                entries = os.listdir(manifests)
            except OSError as error:
                if is_missing(error):
                    continue
                raise self.faults.unavailable(error, manifests, "list") from None
            tags.update(entry for entry in entries if layout.is_tag_entry(entry))
        return sorted(tags)

    def repository_names(self) -> List[str]:
        return self.catalog.names()

    def tag_count(self, names: List[str]) -> int:
        """How many tags the repositories `names` hold (for the start-up line): a repository
        that cannot be listed just now counts none."""
        count = 0
        for name in names:
            try:
                count += len(self.tags(name))
            except errors.RegistryError:
                pass
        return count

    # --- manifests ------------------------------------------------------------------------

    def manifest(self, name: str, ref: str, namespace: Optional[str] = None) -> Manifest:
        """The manifest `ref` (a tag or a digest) names, verified against its digest."""
        # An `?ns=` that names no host changes nothing (layout.repository_relpaths): one key for
        # all of them, so a client cannot fill the cache with made-up values.
        key = (namespace if namespace and reference.is_host(namespace) else None, name, ref)
        known = self._lookups.get(key)
        if known is not None and self._still_holds(known):
            return known.manifest

        if ":" in ref:
            if not reference.looks_like_digest(ref) or (ref.startswith("sha256:") and not reference.is_digest(ref)):
                raise errors.digest_invalid(ref)
            if not reference.is_digest(ref):
                raise errors.manifest_unknown(ref, "only sha256 digests are stored")
        elif not reference.is_tag(ref):
            # The conformance suite wants 404, not 400, for a tag outside the grammar.
            raise errors.manifest_unknown(ref, "invalid tag")

        earlier = []
        for repository, _manifests in self._repositories(name, namespace):
            path = f"{self.real_root}/{layout.manifest_relpath(repository, ref)}"
            started = time.time_ns()
            try:
                opened, expected = self._open_manifest(path, ref)
            except Refused as refusal:
                self._report(path, f"refusing {path}: it {refusal}")
                earlier.append(path)
                continue
            except OSError as error:
                if is_broken(error):
                    self._report(path, f"refusing {path}: {error.strerror}")
                if is_missing(error) or is_broken(error):
                    earlier.append(path)
                    continue
                raise self.faults.unavailable(error, path) from None
            with opened:
                try:
                    stored = self.manifests.get(opened)
                except NotAManifest as error:
                    raise errors.manifest_unknown(ref, f"stored file is not a manifest: {error}") from None
                except OSError as error:
                    raise self.faults.unavailable(error, path) from None
            self.faults.cleared(path)
            if expected and stored.digest != expected:
                self._report(opened.real_path + stored.digest,
                             f"refusing {opened.real_path}: stored as {expected} but its sha256 is {stored.digest}",
                             logging.ERROR)
                raise errors.manifest_unknown(ref, "stored manifest is corrupt: its sha256 differs from its name")
            self._lookups.put(key, Lookup(stored, path, identity(opened.stat), started, tuple(earlier)), stored.size)
            return stored
        raise errors.manifest_unknown(ref)

    def _still_holds(self, known: Lookup) -> bool:
        """One stat of the named file (two when a namespaced copy could have appeared)."""
        for path in known.earlier:
            try:
                os.stat(path)
                return False
            except OSError as error:
                if not is_missing(error):
                    return False
        try:
            st = os.stat(known.path)
        except OSError:
            return False
        return identity(st) == known.identity and _settled(st.st_ctime_ns, known.read_started)

    def _open_manifest(self, path: str, ref: str) -> Tuple[OpenFile, Optional[str]]:
        """Open the file `path` names, reading a tag's link once; (file, digest it must have).

        A link to a name in the same directory (tag -> sha256:...) is followed here, the
        digest it names remembered; any other link is left to the kernel and the opened file
        checked by `treesafety`. Nothing is read twice, so a re-point in between cannot pair
        one manifest's bytes with another's name.
        """
        expected = ref if reference.is_digest(ref) else None
        target = path
        for _hop in range(MAX_LOCAL_LINKS):
            try:
                link = os.readlink(target)
            except OSError as error:
                if error.errno == errno.EINVAL:  # not a link; open the file itself
                    return self.bounds.open_regular(target), expected
                raise
            target = os.path.join(os.path.dirname(target), link)
            if reference.is_digest(os.path.basename(link)) and not reference.is_digest(ref):
                expected = os.path.basename(link)
            if "/" in link:
                return self.bounds.open_regular(target), expected
        raise Refused(f"is a chain of more than {MAX_LOCAL_LINKS} links")

    def referrers(self, name: str, digest: str, namespace: Optional[str] = None) -> List[Manifest]:
        if not reference.is_digest(digest):
            raise errors.digest_invalid(digest)
        found = {}
        for _repository, manifests in self._repositories(name, namespace):
            for candidate in layout.manifest_digests(Path(manifests)):
                if candidate in found:
                    continue
                stored = self._stored_manifest(f"{manifests}/{candidate}")
                if stored is not None and stored.subject == digest and stored.digest == candidate:
                    found[candidate] = stored
        return [found[d] for d in sorted(found)]

    def _stored_manifest(self, path: str) -> Optional[Manifest]:
        """The manifest in a digest-named file, or None if it is not one (or not usable)."""
        try:
            st = os.stat(path)
            verdict = self.manifests.peek(path, st)
            if verdict is not None:
                return verdict if isinstance(verdict, Manifest) else None
            with self.bounds.open_regular(path) as opened:
                return self.manifests.get(opened)
        except (NotAManifest, Refused):
            return None
        except OSError as error:
            if is_missing(error) or is_broken(error):
                return None
            raise self.faults.unavailable(error, path) from None

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
        if not reference.is_name(name):
            raise errors.name_invalid(name)
        key = (namespace if namespace and reference.is_host(namespace) else None, name, digest)
        known = self._blob_lookups.get(key)
        if known is not None and self._blob_still_holds(known):
            return known[1]
        # The repository must exist (else NAME_UNKNOWN), but the bytes come from ROOT/blobs,
        # checked by `_find`: a plain isdir is enough here, and the first one found ends it.
        candidates = layout.repository_relpaths(name, namespace)
        repository = next((path for path in (f"{self.real_root}/{layout.manifests_relpath(r)}" for r in candidates)
                           if os.path.isdir(path)), None)
        if repository is None:
            self._check_tree()
            raise errors.name_unknown(name)
        if self._tree_missing:
            self._check_tree()
        found = self._find(layout.blob_relpath(digest))
        if found is None:
            for relative in candidates:
                found = self._find(layout.blob_relpath(digest, relative))
                if found is not None:
                    break
        if found is None:
            raise errors.blob_unknown(digest)
        real, st = found
        blob = BlobFile(real, st.st_size, digest)
        self._blob_lookups.put(key, (repository, blob, identity(st)), 0)
        return blob

    @staticmethod
    def _blob_still_holds(known) -> bool:
        """Two stats instead of a walk: the repository is still a directory, and the file found
        is still the same one (device, inode, size, mtime, ctime). The file's type and its place
        inside the tree are checked again when it is opened (`open_blob`), whatever this says."""
        repository, blob, known_identity = known
        try:
            return stat.S_ISDIR(os.stat(repository).st_mode) and identity(os.stat(blob.path)) == known_identity
        except OSError:
            return False  # looked up in full: a missing file is a 404, a failing disk a 503 there

    def open_blob(self, blob_path: str, end: int) -> "BlobReader":
        """Open a blob found by `blob` for sending bytes up to `end`; RegistryError (404 or
        503) if it cannot be. The file says so in the log if it was cut short meanwhile."""
        try:
            opened = self.bounds.open_regular(blob_path)
        except Refused as refusal:
            self._report(blob_path, f"refusing {blob_path}: it {refusal}")
            raise errors.blob_unknown(os.path.basename(blob_path)) from None
        except OSError as error:
            if is_missing(error) or is_broken(error):
                # Removed (or broken) between the lookup and now: as if it had never been there.
                raise errors.blob_unknown(os.path.basename(blob_path)) from None
            raise self.faults.unavailable(error, blob_path, "open") from None
        self.faults.cleared(blob_path)
        return BlobReader(opened.detach(), blob_path, end)

    # --- safety ---------------------------------------------------------------------------

    def _find(self, relative: str, directory: bool = False) -> Optional[Tuple[str, os.stat_result]]:
        """(real path, stat) of the regular file (or `directory`) at ROOT/`relative`, if it
        lies inside the tree; None if it is not there or refused (and logged); 503 if it
        cannot be looked at.

        Walks from the tree's real path one component at a time, so the common case costs
        one lstat per component below ROOT (realpath would lstat every component from /).
        A symlink to a name in its own directory (a tag -> sha256:...) is followed in place;
        any other symlink (blobs -> ../blobs, or anything planted) is resolved in full and
        then checked against the tree.
        """
        current = self.real_root
        parts = relative.split("/")
        try:
            for index, part in enumerate(parts):
                candidate = f"{current}/{part}"
                st = os.lstat(candidate)
                for _hop in range(MAX_LOCAL_LINKS):
                    if not stat.S_ISLNK(st.st_mode):
                        break
                    target = os.readlink(candidate)
                    if "/" in target or target in (".", ".."):
                        return self._resolve_in_full("/".join([candidate] + parts[index + 1:]), directory)
                    candidate = f"{current}/{target}"
                    st = os.lstat(candidate)
                else:
                    return None
                if index < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                    # A file where a directory should be (`blobs`, a repository level).
                    self._report(candidate, f"refusing {candidate}: it is {kind_of(st.st_mode)}, not a directory")
                    return None
                current = candidate
        except OSError as error:
            if is_missing(error) or is_broken(error):
                return None
            raise self.faults.unavailable(error, f"{self.real_root}/{relative}", "look up") from None
        except ValueError:
            return None
        if not _is_wanted(st, directory, current, self._report):
            return None
        return current, st

    def _resolve_in_full(self, path: str, directory: bool = False) -> Optional[Tuple[str, os.stat_result]]:
        try:
            real = self.bounds.resolve(path)
            st = os.stat(real)
        except Refused as refusal:
            self._report(path, f"refusing {path}: it {refusal}")
            return None
        except OSError as error:
            if is_missing(error) or is_broken(error):
                return None
            raise self.faults.unavailable(error, path, "look up") from None
        if not _is_wanted(st, directory, real, self._report):
            return None
        return real, st

    def _check_tree(self) -> None:
        """Nothing found: if the tree itself is gone (removed, not mounted), that is a 503."""
        if os.path.isdir(self.bounds.root):
            if self._tree_missing:
                self._tree_missing = False
                log.info("content tree %s is back", self.bounds.root)
            if os.path.realpath(self.bounds.root) != self.bounds.real_root:
                self.bounds = TreeBounds(self.bounds.root)  # its path was re-linked elsewhere
            return
        if not self._tree_missing:
            self._tree_missing = True
            log.error("content tree %s is missing: answering 503 until it is back", self.bounds.root)
        raise errors.unavailable("the content tree is missing on the server")

    def _report(self, key: str, line: str, level: int = logging.WARNING) -> None:
        if key not in self._reported:
            if len(self._reported) >= MANIFEST_CACHE_ENTRIES:
                self._reported.clear()
            self._reported.add(key)
            log.log(level, "%s", line)


class BlobReader(io.FileIO):
    """An open blob as the server sends it (a real file: sendfile takes its fileno()).

    Closing it checks the file still reaches the end of what was promised: a blob truncated
    on disk while it was sent has cut the response short (the connection layer closes the
    connection), and an operator must learn which file it was.
    """

    def __init__(self, fd: int, path: str, end: int):
        super().__init__(fd, "rb", closefd=True)
        self.path, self.end = path, end

    def close(self) -> None:
        if not self.closed:
            try:
                size = os.fstat(self.fileno()).st_size
            except OSError:
                size = self.end
            if size < self.end:
                log.error("blob %s shrank to %d bytes while being sent (%d promised): the answer was cut "
                          "short; the file is damaged (run minimal-registry verify)", self.path, size, self.end)
        super().close()


def _is_wanted(st: os.stat_result, directory: bool, path: str, report) -> bool:
    if directory:
        if stat.S_ISDIR(st.st_mode):
            return True
        report(path, f"refusing {path}: it is {kind_of(st.st_mode)}, not a directory")
        return False
    if stat.S_ISREG(st.st_mode):
        return True
    report(path, f"refusing {path}: it is {kind_of(st.st_mode)}, not a regular file")
    return False
