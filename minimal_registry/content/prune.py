"""`minimal-registry prune`: delete the manifests no tag reaches and the blobs no kept manifest
references, and say what that freed.

    mark   every tag -> its manifest -> (an index's) child manifests -> config and layers;
           an untagged manifest whose `subject` is kept (a signature, an SBOM) is kept too
    sweep  unmarked manifests first, then unmarked blobs; empty repositories last

Safe while the server runs: a deletion is one `unlink`, so a download that has the file open
keeps reading it to the end, and nothing a tag reaches is ever deleted. Safe beside a tag
re-pointed meanwhile: the marks are taken again just before deleting and anything they now
reach is spared (and `import`, `rm` and `prune` never overlap: they share the tree's lock).
Safe to interrupt at any moment: manifests go before the blobs they name, so the tree is
always one `verify` passes. It never deletes outside the tree: it deletes only entries of
directories reached through no symlink below the tree, and reads only regular files.

A kept manifest that cannot be read or does not match its digest stops the prune before
anything is deleted (what it references cannot be known): `verify` names it.

Exit codes: 0 done (or nothing to free), 1 stopped by a damaged tree, 2 unusable arguments,
130 interrupted.
"""

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from minimal_registry import layout, reference
from minimal_registry import manifest as manifests
from minimal_registry.content.formatting import counted, human_bytes
from minimal_registry.content.remove import tag_digest
from minimal_registry.content.containment import is_plain_directory
from minimal_registry.fatal import Fatal
from minimal_registry.treesafety import Refused, TreeBounds

DAMAGED = 1


class Damaged(Fatal):
    def __init__(self, message: str):
        super().__init__(message, "run `minimal-registry verify`, then repair (import again) or `rm` what it names",
                         exit_code=DAMAGED)


@dataclass
class Marks:
    manifests: Set[Tuple[str, str]] = field(default_factory=set)  # (repository, digest)
    blobs: Set[str] = field(default_factory=set)
    bounds: Optional[TreeBounds] = None  # the server's containment rule, for this tree


@dataclass
class Candidate:
    kind: str  # "manifest" or "blob"
    path: Path
    name: str  # what to print: `repo@digest` or the blob digest
    size: int


# ----- mark -----------------------------------------------------------------------------------

def repositories(tree: Path) -> List[str]:
    bounds = TreeBounds(tree)
    return sorted(r for r in layout.repositories(tree) if bounds.holds(layout.manifests_dir(tree, r)))


def mark(tree: Path) -> Marks:
    marks = Marks(bounds=TreeBounds(tree))
    repos = repositories(tree)
    for repository in repos:
        directory = layout.manifests_dir(tree, repository)
        for tag in layout.tags(directory):
            try:
                digest = tag_digest(directory / tag)
            except OSError as error:
                raise Damaged(f"cannot read the tag {directory / tag}: {error.strerror}") from None
            if digest is not None:
                _mark_manifest(tree, repository, digest, marks)
    _mark_referrers(tree, repos, marks)
    return marks


def _mark_manifest(tree: Path, repository: str, digest: str, marks: Marks) -> None:
    pending = [digest]
    while pending:  # each (repository, digest) once: nesting depth and fan-out cost nothing
        current = pending.pop()
        if (repository, current) in marks.manifests:
            continue
        marks.manifests.add((repository, current))
        parsed = _read_manifest(layout.manifests_dir(tree, repository) / current, marks.bounds)
        if parsed is None:
            continue  # a tag or index entry naming a manifest the tree does not hold
        if parsed.is_index:
            pending.extend(child.digest for child in parsed.children if reference.is_digest(child.digest))
        for blob in parsed.referenced_blobs():
            marks.blobs.add(blob.digest)


def _read_manifest(path: Path, bounds: TreeBounds) -> Optional[manifests.Manifest]:
    if not os.path.lexists(path):
        return None
    try:
        body = _read_inside(bounds, path)
    except OSError as error:
        raise Damaged(f"cannot read the manifest {path}: {error.strerror}") from None
    if body is None:
        raise Damaged(f"{path} is not a regular file of at most 4 MiB inside the tree")
    try:
        parsed = manifests.parse(body)
    except manifests.NotAManifest as problem:
        raise Damaged(f"{path} is not a manifest: {problem}") from None
    if parsed.digest != path.name:
        raise Damaged(f"{path} does not match its digest (its bytes hash to {parsed.digest})")
    return parsed


def _read_inside(bounds: TreeBounds, path: Path) -> Optional[bytes]:
    """A manifest file's bytes if the server would read it (`treesafety`: a regular file
    inside the tree, links resolved) and it is at most 4 MiB; None otherwise."""
    try:
        opened = bounds.open_regular(path)
    except Refused:
        return None
    with opened:
        if opened.stat.st_size > manifests.MAX_MANIFEST_SIZE:
            return None
        data = opened.read(manifests.MAX_MANIFEST_SIZE + 1)
    return data if len(data) <= manifests.MAX_MANIFEST_SIZE else None


def _mark_referrers(tree: Path, repos: List[str], marks: Marks) -> None:
    """Keep untagged manifests that refer (`subject`) to a kept one, as the server lists them."""
    changed = True
    while changed:
        changed = False
        for repository in repos:
            directory = layout.manifests_dir(tree, repository)
            for digest in layout.manifest_digests(directory):
                if (repository, digest) in marks.manifests:
                    continue
                try:
                    body = _read_inside(marks.bounds, directory / digest)
                    parsed = manifests.parse(body) if body is not None else None
                except (OSError, manifests.NotAManifest):
                    continue  # unreadable and untagged: nothing reaches it
                if parsed is not None and parsed.subject and (repository, parsed.subject) in marks.manifests:
                    _mark_manifest(tree, repository, digest, marks)
                    changed = True


# ----- sweep ----------------------------------------------------------------------------------

def candidates(tree: Path, marks: Marks) -> List[Candidate]:
    found: List[Candidate] = []
    tree_text = str(tree)
    for repository in repositories(tree):
        relative = layout.manifests_relpath(repository)
        if not is_plain_directory(tree_text, relative):
            continue  # a linked manifests/ directory: never delete through it
        for digest in layout.manifest_digests(tree / relative):
            if (repository, digest) not in marks.manifests:
                _add(found, "manifest", tree / relative / digest, f"{repository}@{digest}")
    shared = layout.blobs_relpath()
    for relative in [shared] + [layout.blobs_relpath(r) for r in repositories(tree)]:
        if not is_plain_directory(tree_text, relative):
            continue  # the usual `<name>/blobs -> ../blobs` links, or a link out of the tree
        for name in sorted(os.listdir(tree / relative)):
            if reference.is_digest(name) and name not in marks.blobs:
                _add(found, "blob", tree / relative / name, name if relative == shared else f"{relative}/{name}")
    return found


def _add(found: List[Candidate], kind: str, path: Path, name: str) -> None:
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        return  # not content: left for verify to report
    found.append(Candidate(kind, path, name, info.st_size if stat.S_ISREG(info.st_mode) else 0))


def still_unreached(candidate: Candidate, marks: Marks) -> bool:
    if candidate.kind == "manifest":
        repository, digest = candidate.name.rsplit("@", 1)
        return (repository, digest) not in marks.manifests
    return candidate.path.name not in marks.blobs


def remove_empty_repositories(tree: Path) -> int:
    """Repositories left with an empty `manifests/`: the directory, its `blobs` link, and
    parents that held nothing else. Entries are removed one by one (rmdir refuses a
    directory that gained a file meanwhile)."""
    removed = 0
    tree_text = str(tree)
    for repository in sorted(repositories(tree), key=lambda r: -r.count("/")):
        relative = layout.manifests_relpath(repository)
        if not is_plain_directory(tree_text, relative) or os.listdir(tree / relative):
            continue
        try:
            os.rmdir(tree / relative)
        except OSError:
            continue
        removed += 1
        level = tree / repository
        while level != tree and is_plain_directory(tree_text, str(level.relative_to(tree))):
            entries = os.listdir(level)
            if entries == [layout.BLOBS] and os.path.islink(level / layout.BLOBS):
                os.unlink(level / layout.BLOBS)
            elif entries:
                break
            try:
                os.rmdir(level)
            except OSError:
                break
            level = level.parent
    return removed


# ----- the command ----------------------------------------------------------------------------

def run(tree: Path, dry_run: bool = False, as_json: bool = False, quiet: bool = False) -> int:
    if not (tree / layout.BLOBS).is_dir():
        raise Fatal(f"{tree} has no blobs/ directory: not a content tree", "give the content tree with -d DIR")
    first = mark(tree)
    found = candidates(tree, first)
    if not dry_run:
        again = mark(tree)  # a tag re-pointed since the first marks keeps what it now reaches
        found = [c for c in found if still_unreached(c, again)]
    freed: Dict[str, List[int]] = {"manifest": [0, 0], "blob": [0, 0]}
    verb = "would remove" if dry_run else "removed"
    # Manifests before blobs: an interrupted prune never leaves a manifest without its blobs.
    for candidate in sorted(found, key=lambda c: (c.kind != "manifest", c.name)):
        if not dry_run:
            try:
                os.unlink(candidate.path)
            except FileNotFoundError:
                continue
            except OSError as error:
                raise Fatal(f"cannot remove {candidate.path}: {error.strerror}",
                            "check the permissions of the content tree") from None
        freed[candidate.kind][0] += 1
        freed[candidate.kind][1] += candidate.size
        if not quiet and not as_json:
            print(f"{verb} {candidate.kind} {candidate.name} ({human_bytes(candidate.size)})", flush=True)
    repositories_removed = 0 if dry_run else remove_empty_repositories(tree)
    total = freed["manifest"][1] + freed["blob"][1]
    if as_json:
        print(json.dumps({
            "tree": str(tree), "dryRun": dry_run,
            "manifests": {"count": freed["manifest"][0], "bytes": freed["manifest"][1]},
            "blobs": {"count": freed["blob"][0], "bytes": freed["blob"][1]},
            "repositoriesRemoved": repositories_removed,
            "bytes": total,
        }, indent=2), flush=True)
    else:
        what = (f"{counted(freed['manifest'][0], 'manifest')} and {counted(freed['blob'][0], 'blob')}, "
                f"{human_bytes(total)}")
        if dry_run:
            print(f"prune --dry-run: {what} would be freed; nothing was deleted", flush=True)
        elif found:
            removed = counted(repositories_removed, "empty repository", "empty repositories")
            empty = f", {removed} removed" if repositories_removed else ""
            print(f"prune: {what} freed{empty}", flush=True)
        else:
            print("prune: nothing to free: every manifest and blob is reached from a tag", flush=True)
    return 0
