"""Reading a content tree for `verify` and `ls`: its repositories, tags and blobs, by `layout`."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from minimal_registry import layout, reference


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
    for full_name in sorted(layout.repositories(tree)):
        if full_name.split("/", 1)[0].startswith("."):
            continue  # an import's staging directory, never a repository
        namespace, name = reference.split_domain(full_name)
        if namespace is not None and "/" not in full_name:
            namespace, name = None, full_name
        found.append(Repository(full_name, namespace, name, tree / full_name))
    return found


def blob_path(tree: Path, repository: Repository, digest: str) -> Optional[Path]:
    """Where the server finds `digest` for `repository`: its `blobs/` (link), else ROOT/blobs."""
    shared = layout.shared_blob_path(tree, digest)
    own = repository.directory / layout.BLOBS / digest
    if own.is_file():
        try:
            if os.path.samefile(own, shared):
                return shared  # through the `blobs -> ../blobs` links: name it where it really is
        except OSError:
            pass
        return own
    return shared if shared.is_file() else None


def inside(path: Path, tree_real: str) -> bool:
    real = os.path.realpath(path)
    return real == tree_real or real.startswith(tree_real.rstrip(os.sep) + os.sep)
