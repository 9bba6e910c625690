"""Where things live in the content tree: the one definition of the on-disk format.

    ROOT/
      blobs/sha256:<hex>                    every blob (layers, configs), stored once
      <name>/manifests/sha256:<hex>         a manifest or index, its exact bytes
      <name>/manifests/<tag>                symlink -> sha256:<hex> (a plain copy also works)
      <name>/blobs -> ../blobs              one link per level of <name>; optional, the
                                            server falls back to ROOT/blobs
      <host>/<name>/...                     an upstream namespace (docker.io/rancher/x),
                                            chosen by containerd's ?ns=<host>

`<name>` has one or more levels (`rancher/mirrored-pause`, `a/b/c/d`). This is the layout of
the original Go tool, so trees it made keep working. The server reads it; `import` writes
it; `verify` and `ls` walk it. All of them build paths here, and only from values that
`reference` has validated.
"""

import os
from pathlib import Path
from typing import Iterator, List, Optional

from minimal_registry import reference

BLOBS = "blobs"
MANIFESTS = "manifests"
DIGEST_PREFIX = "sha256:"


def repository_dir(root: Path, name: str, namespace: Optional[str] = None) -> Path:
    return root / namespace / name if namespace else root / name


def manifests_dir(root: Path, name: str, namespace: Optional[str] = None) -> Path:
    return repository_dir(root, name, namespace) / MANIFESTS


def shared_blobs_dir(root: Path) -> Path:
    return root / BLOBS


def shared_blob_path(root: Path, digest: str) -> Path:
    return shared_blobs_dir(root) / digest


def repository_relpaths(name: str, namespace: Optional[str]) -> List[str]:
    """Repository directories to look in, relative to ROOT, in order: `<ns>/<name>` (when
    containerd's ?ns= names a valid host), then `<name>`."""
    if namespace and reference.is_host(namespace):
        return [f"{namespace}/{name}", name]
    return [name]


def tags(manifests: Path) -> List[str]:
    """Tag names in one `manifests/` directory: every entry that is not a digest."""
    try:
        entries = os.listdir(manifests)
    except OSError:
        return []
    return sorted(e for e in entries if not e.startswith(DIGEST_PREFIX) and reference.is_tag(e))


def manifest_digests(manifests: Path) -> List[str]:
    try:
        entries = os.listdir(manifests)
    except OSError:
        return []
    return sorted(e for e in entries if reference.is_digest(e))


def repositories(root: Path) -> Iterator[str]:
    """Every repository name under ROOT (namespaced ones as `<host>/<name>`), unsorted.

    Symlinks are not followed: `<name>/blobs -> ../blobs` would otherwise loop.
    """
    for directory, subdirs, _files in os.walk(root):
        if MANIFESTS in subdirs:
            name = os.path.relpath(directory, root).replace(os.sep, "/")
            if name != ".":
                yield name
        # A repository may also be the parent of deeper ones (`a/b` and `a/b/c`). Dot
        # directories are never content (an import stages its work in `.import-*`).
        subdirs[:] = [d for d in subdirs if d not in (MANIFESTS, BLOBS) and not d.startswith(".")]


def tag_target_digest(tag_path: Path) -> Optional[str]:
    """The digest a tag symlink names (`sha256:<hex>`), or None for a plain-file tag."""
    try:
        target = os.readlink(tag_path)
    except OSError:
        return None
    base = os.path.basename(target)
    return base if reference.is_digest(base) else None
