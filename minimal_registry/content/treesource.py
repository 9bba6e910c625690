"""A content tree in our own layout as an import SOURCE: a directory, or a tar of one (the
media's `registry.tar.gz` / `registry.tar.zst`, with the tree under `registry/`).

    ROOT/blobs/sha256:<hex>                         blobs
    ROOT/[<host>/]<name>/manifests/sha256:<hex>     manifests
    ROOT/[<host>/]<name>/manifests/<tag>            tags: the roots of the import

Every tag is a root, filed under exactly the repository it has in the source: a namespaced
`<host>/<name>` stays namespaced and an un-namespaced one stays so, whatever --keep-domain
says, since a tree is already placed. Manifests no tag reaches are not copied (prune would
remove them anyway). Nothing is trusted: the placer hashes every blob and manifest before it
gets its final name, as for any other source.

In a directory, only regular files are read, and nothing through a symlink that leads out of
the source tree (the `<name>/blobs -> ../blobs` links are never needed: blobs are read from
ROOT/blobs, or from a repository's own `blobs/` directory in trees that have one).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from minimal_registry import layout, reference
from minimal_registry import manifest as manifests
from minimal_registry.content import names
from minimal_registry.content.archive import StagedArchive
from minimal_registry.content.entry import Entry
from minimal_registry.content.pool import Pool, Root
from minimal_registry.content.containment import read_regular
from minimal_registry.fatal import Fatal
from minimal_registry.treesafety import TreeBounds

HINT = "check the source tree with `minimal-registry verify -d DIR`"


@dataclass(frozen=True)
class PlacedName(names.ImageName):
    """A name read from a tree: filed where the source had it, --keep-domain or not."""

    def placement(self, keep_domain: bool) -> Tuple[Optional[str], str]:
        return self.domain, self.path


# ----- detection ----------------------------------------------------------------------------

def is_tree_directory(path: Path) -> bool:
    """Our layout: a `blobs/` directory of `sha256:<hex>` files, and none of the other kinds'
    marker files (an OCI layout also has `blobs/`, but under `index.json`)."""
    if (path / "index.json").exists() or (path / "manifest.json").exists():
        return False
    return (path / layout.BLOBS).is_dir() and not (path / layout.BLOBS / "sha256").is_dir()


def staged_tree_prefix(staged: StagedArchive) -> Optional[str]:
    """Where the tree starts in a staged archive: "" at its top, "<dir>/" under one directory
    (make-airgap-media.sh packs it as `registry/`); None when the archive is no tree."""
    tops = {name.split("/", 1)[0] for name in list(staged.files) + list(staged.links)}
    if "index.json" in tops or "manifest.json" in tops:
        return None
    for prefix in [""] + [f"{top}/" for top in sorted(tops)]:
        blob_prefix = f"{prefix}{layout.BLOBS}/{layout.DIGEST_PREFIX}"
        if any(name.startswith(blob_prefix) for name in staged.files):
            return prefix
    return None


# ----- reading --------------------------------------------------------------------------------

def read_directory(path: Path, pool: Pool) -> None:
    _read(_DirectoryTree(path), str(path), pool)


def read_staged(staged: StagedArchive, prefix: str, label: str, pool: Pool) -> None:
    _read(_StagedTree(staged, prefix), label, pool)


def _read(tree: "_TreeView", label: str, pool: Pool) -> None:
    manifest_files: Dict[str, Entry] = {}
    tags: List[Tuple[str, str, str]] = []  # (repository, tag, digest)
    for repository in tree.repositories():
        for digest, entry in tree.manifests(repository):
            manifest_files.setdefault(digest, entry)
        for tag, digest in tree.tags(repository):
            tags.append((repository, tag, digest))
    if not tags:
        raise Fatal(f"{label}: the tree has no tagged image", HINT)

    def store(digest: str) -> Optional[Entry]:
        if not reference.is_digest(digest):
            return None
        return tree.blob(digest) or manifest_files.get(digest)

    pool.add_store(store)
    for repository, tag, digest in tags:
        namespace = _namespace(repository)
        path = repository[len(namespace) + 1:] if namespace else repository
        try:
            names.check_path(path)
        except ValueError as problem:
            raise Fatal(f"{label}: repository {repository}: {problem}", HINT) from None
        pool.add_root(Root(digest=digest, source=label, names=[PlacedName(namespace, path, tag)]))


def _namespace(repository: str) -> Optional[str]:
    """`docker.io` of `docker.io/library/busybox`; None for `rancher/x` (as `treewalk` reads it)."""
    namespace, _ = reference.split_domain(repository)
    if namespace is None or "/" not in repository or not reference.is_host(namespace):
        return None
    return namespace


def _tag_digest(target: Optional[str], plain: Optional[bytes]) -> Optional[str]:
    if target is not None:
        return target if reference.is_digest(target) else None
    if plain is None:
        return None
    return manifests.sha256_digest(plain)


class _TreeView:
    def repositories(self) -> Iterator[str]:
        raise NotImplementedError

    def manifests(self, repository: str) -> Iterator[Tuple[str, Entry]]:
        raise NotImplementedError

    def tags(self, repository: str) -> Iterator[Tuple[str, str]]:
        raise NotImplementedError

    def blob(self, digest: str) -> Optional[Entry]:
        raise NotImplementedError


class _DirectoryTree(_TreeView):
    def __init__(self, root: Path):
        self.root = root
        self.bounds = TreeBounds(root)  # the server's containment rule
        self._repositories = sorted(layout.repositories(root))

    def repositories(self) -> Iterator[str]:
        for repository in self._repositories:
            if self.bounds.holds(layout.manifests_dir(self.root, repository)):
                yield repository

    def _regular(self, path: Path) -> Optional[Entry]:
        if not self.bounds.holds(path):
            return None
        try:
            info = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        return Entry(path, info.st_size)

    def manifests(self, repository: str) -> Iterator[Tuple[str, Entry]]:
        directory = layout.manifests_dir(self.root, repository)
        for digest in layout.manifest_digests(directory):
            entry = self._regular(directory / digest)
            if entry is not None:
                yield digest, entry

    def tags(self, repository: str) -> Iterator[Tuple[str, str]]:
        directory = layout.manifests_dir(self.root, repository)
        for tag in layout.tags(directory):
            path = directory / tag
            if os.path.islink(path):
                digest = _tag_digest(layout.tag_target_digest(path), None)
            else:
                digest = _tag_digest(None, read_regular(str(path), manifests.MAX_MANIFEST_SIZE))
            if digest is None:
                raise Fatal(f"{path}: the tag names no manifest", HINT)
            yield tag, digest

    def blob(self, digest: str) -> Optional[Entry]:
        found = self._regular(layout.shared_blob_path(self.root, digest))
        if found is not None:
            return found
        for repository in self._repositories:  # trees with a blobs/ directory per repository
            own = self.root / repository / layout.BLOBS
            if not os.path.islink(own):
                found = self._regular(own / digest)
                if found is not None:
                    return found
        return None


class _StagedTree(_TreeView):
    def __init__(self, staged: StagedArchive, prefix: str):
        self.staged = staged
        self.prefix = prefix
        self._by_repository: Dict[str, List[str]] = {}
        marker = f"/{layout.MANIFESTS}/"
        for name in list(staged.files) + list(staged.links):
            if not name.startswith(prefix) or marker not in name:
                continue
            repository, _, entry = name[len(prefix):].rpartition(marker)
            if repository and "/" not in entry and not repository.startswith(".") \
                    and layout.MANIFESTS not in repository.split("/"):
                self._by_repository.setdefault(repository, []).append(entry)

    def repositories(self) -> Iterator[str]:
        return iter(sorted(self._by_repository))

    def _name(self, repository: str, entry: str) -> str:
        return self.prefix + layout.manifest_relpath(repository, entry)

    def manifests(self, repository: str) -> Iterator[Tuple[str, Entry]]:
        for entry in sorted(self._by_repository[repository]):
            if reference.is_digest(entry):
                found = self.staged.files.get(self._name(repository, entry))
                if found is not None:
                    yield entry, found

    def tags(self, repository: str) -> Iterator[Tuple[str, str]]:
        for entry in sorted(self._by_repository[repository]):
            if entry.startswith(layout.DIGEST_PREFIX) or not reference.is_tag(entry):
                continue
            name = self._name(repository, entry)
            if name in self.staged.links:
                digest = _tag_digest(self.staged.links[name].rsplit("/", 1)[-1], None)
            else:
                found = self.staged.files[name]
                plain = read_regular(str(found.path), manifests.MAX_MANIFEST_SIZE)
                digest = _tag_digest(None, plain)
            if digest is None:
                raise Fatal(f"{name}: the tag names no manifest", HINT)
            yield entry, digest

    def blob(self, digest: str) -> Optional[Entry]:
        return self.staged.lookup(self.prefix + layout.blob_relpath(digest))
