"""Reading a content tree for `verify` and `ls`: its repositories, tags and blobs, by `layout`."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from minimal_registry import layout, reference, treesafety


@dataclass(frozen=True)
class Repository:
    full_name: str  # as under ROOT: `docker.io/library/busybox`, `rancher/mirrored-pause`
    namespace: Optional[str]  # `docker.io` for a namespaced copy
    name: str  # `library/busybox`
    directory: Path

    @property
    def manifests(self) -> Path:
        return self.directory / layout.MANIFESTS


def repositories(tree: Path) -> List[Repository]:
    found = []
    # The offline tools read the whole tree, however large (the server's walk is bounded).
    for full_name in sorted(layout.repositories(tree, limit=None)):
        namespace, name = reference.split_domain(full_name)
        if namespace is not None and "/" not in full_name:
            namespace, name = None, full_name
        found.append(Repository(full_name, namespace, name, tree / full_name))
    return found


def blob_path(tree: Path, repository: Repository, digest: str,
              bounds: Optional[treesafety.TreeBounds] = None) -> Optional[Path]:
    """Where the server finds `digest` for `repository`, by its rule: ROOT/blobs first, then
    the repository's `blobs/`; only a regular file inside the tree (`treesafety`) counts."""
    bounds = bounds or treesafety.TreeBounds(tree)
    for path in (layout.shared_blob_path(tree, digest), repository.directory / layout.BLOBS / digest):
        try:
            bounds.check_regular(path)
            return path
        except (OSError, treesafety.Refused):
            continue
    return None
