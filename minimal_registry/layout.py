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
from typing import Dict, Iterator, List, Optional

from minimal_registry import reference, treesafety

BLOBS = "blobs"
MANIFESTS = "manifests"
DIGEST_PREFIX = "sha256:"
# An import stages its work in ROOT/.import-<pid>-<random>, then renames it into place: never
# content (the walks skip every dot directory), and what an interrupted import leaves.
STAGING_PREFIX = ".import-"


def repository_dir(root: Path, name: str, namespace: Optional[str] = None) -> Path:
    return root / namespace / name if namespace else root / name


def manifests_dir(root: Path, name: str, namespace: Optional[str] = None) -> Path:
    return repository_dir(root, name, namespace) / MANIFESTS


def shared_blobs_dir(root: Path) -> Path:
    return root / BLOBS


def shared_blob_path(root: Path, digest: str) -> Path:
    return shared_blobs_dir(root) / digest


# Paths relative to ROOT, as strings: the server builds one per request, so these cost an
# f-string, not a Path object. `repository` is a relative repository directory as
# `repository_relpaths` returns it.

def manifests_relpath(repository: str) -> str:
    return f"{repository}/{MANIFESTS}"


def manifest_relpath(repository: str, ref: str) -> str:
    return f"{repository}/{MANIFESTS}/{ref}"


def blobs_relpath(repository: Optional[str] = None) -> str:
    """`blobs` (the shared store), or `<repository>/blobs` (usually a link to it)."""
    return f"{repository}/{BLOBS}" if repository else BLOBS


def blob_relpath(digest: str, repository: Optional[str] = None) -> str:
    return f"{blobs_relpath(repository)}/{digest}"


def repository_relpaths(name: str, namespace: Optional[str]) -> List[str]:
    """Repository directories to look in, relative to ROOT, in order: `<ns>/<name>` (when
    containerd's ?ns= names a valid host), then `<name>`."""
    if namespace and reference.is_host(namespace):
        return [f"{namespace}/{name}", name]
    return [name]


def is_tag_entry(entry: str) -> bool:
    """A name in `manifests/` that is a tag: not a digest, and in the tag grammar."""
    return not entry.startswith(DIGEST_PREFIX) and reference.is_tag(entry)


def tags(manifests: Path) -> List[str]:
    """Tag names in one `manifests/` directory: every entry that is not a digest."""
    try:
        entries = os.listdir(manifests)
    except OSError:
        return []
    return sorted(e for e in entries if is_tag_entry(e))


def manifest_digests(manifests: Path) -> List[str]:
    try:
        entries = os.listdir(manifests)
    except OSError:
        return []
    return sorted(e for e in entries if reference.is_digest(e))


# A walk of the tree stops after this many directories (a tree of 5,000 repositories has
# about 25,000): a tree grown past it by mistake costs a bounded time, and says so.
MAX_WALKED_DIRECTORIES = 200_000


class WalkTruncated(Exception):
    pass


def repositories(root: Path, directories: Optional[Dict[str, int]] = None,
                 limit: Optional[int] = MAX_WALKED_DIRECTORIES) -> Iterator[str]:
    """Every repository name under ROOT (namespaced ones as `<host>/<name>`), unsorted.

    A repository is a directory holding `manifests/` whose real path lies inside the tree
    (`treesafety`): a `manifests` linked to `/etc` is not one. Symlinked directories are
    not descended into (`<name>/blobs -> ../blobs` would loop, and a link may lead out).
    `directories`, if given, is filled with every directory read and its mtime (in ns), so a
    caller can tell later, by stat alone, whether the result could have changed. More than
    `limit` directories (None: no limit): WalkTruncated, after yielding what was found.
    """
    bounds = treesafety.TreeBounds(root)
    pending = [("", bounds.real_root)]
    walked = 0
    while pending:
        name, directory = pending.pop()
        walked += 1
        if limit is not None and walked > limit:
            raise WalkTruncated(f"more than {limit} directories")
        try:
            with os.scandir(directory) as scan:
                if directories is not None:
                    directories[directory] = os.stat(directory).st_mtime_ns
                entries = [(entry.name, entry.is_dir(follow_symlinks=False), entry.is_symlink()) for entry in scan]
        except OSError:
            continue
        for entry_name, is_dir, is_link in entries:
            if entry_name == MANIFESTS:
                if name and _contained_directory(bounds, f"{directory}/{entry_name}", is_dir, is_link):
                    yield name
            elif is_dir and entry_name != BLOBS and not entry_name.startswith("."):
                # A repository may also be the parent of deeper ones (`a/b` and `a/b/c`). Dot
                # directories are never content (an import stages its work in `.import-*`).
                pending.append((f"{name}/{entry_name}" if name else entry_name, f"{directory}/{entry_name}"))


def _contained_directory(bounds: "treesafety.TreeBounds", path: str, is_dir: bool, is_link: bool) -> bool:
    if is_dir:
        return True
    if not is_link:
        return False
    try:
        bounds.directory(path)
        return True
    except (OSError, treesafety.Refused):
        return False


def tag_target_digest(tag_path: Path) -> Optional[str]:
    """The digest a tag symlink names (`sha256:<hex>`), or None for a plain-file tag."""
    try:
        target = os.readlink(tag_path)
    except OSError:
        return None
    base = os.path.basename(target)
    return base if reference.is_digest(base) else None
