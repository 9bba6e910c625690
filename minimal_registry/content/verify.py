"""`minimal-registry verify`: is the tree exactly what its names say, and complete?

Checks, each problem reported with its path:
  - every blob's sha256 matches its name (skipped with --fast) and its size matches every
    manifest that references it (a truncated blob is caught even with --fast);
  - every manifest parses and its sha256 matches its name;
  - every tag resolves to a stored manifest in its repository;
  - every blob and child manifest a manifest references exists. An index entry for a
    platform with no manifest in the tree is a note, not a problem: the index was pulled for
    fewer platforms, on purpose. An index with none of its manifests is a problem.
  - every `blobs` link resolves, and nothing resolves outside the tree (the server refuses it).
  - only regular files are opened (`treesafety`, the server's own rule): a FIFO, a device or
    anything linked out of the tree is a problem, reported as the server would refuse it.
Notes (not problems): leftovers of an interrupted import, unexpected files, blobs no
manifest references. Exit 0 clean, 1 problems, 2 unusable arguments.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from minimal_registry import layout, reference
from minimal_registry import manifest as manifests
from minimal_registry.treesafety import Refused, TreeBounds
from minimal_registry.content import atomic, hashing, treewalk
from minimal_registry.content.formatting import counted, human_bytes
from minimal_registry.content.progress import Progress

# The hashing speed is shown only when it says something about the disk: a few KiB hashed in
# a few milliseconds measure the start-up of the threads, not the reads.
RATE_MIN_BYTES = 64 * 1024 * 1024
RATE_MIN_SECONDS = 0.5


@dataclass
class Report:
    quiet: bool = False
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def problem(self, path: Path, message: str) -> None:
        line = f"PROBLEM {path}: {message}"
        self.problems.append(line)
        print(line, flush=True)

    def note(self, path: Path, message: str) -> None:
        line = f"note    {path}: {message}"
        self.notes.append(line)
        if not self.quiet:
            print(line, flush=True)


@dataclass
class Counts:
    repositories: int = 0
    tags: int = 0
    manifests: int = 0
    blobs: int = 0
    blob_bytes: int = 0


def run(tree: Path, fast: bool = False, quiet: bool = False) -> int:
    report = Report(quiet=quiet)
    counts = Counts()
    bounds = TreeBounds(tree)
    blob_files = _scan_blob_dir(tree / layout.BLOBS, bounds, report, must_exist=True)
    _scan_leftovers(tree, report)
    referenced: Dict[Path, int] = {}  # blob path -> size manifests say it has
    repositories = treewalk.repositories(tree)
    if not repositories:
        report.problem(tree, "no repositories: this is not a content tree, or it is empty")
    for repository in repositories:
        counts.repositories += 1
        _check_repository(tree, bounds, repository, report, counts, referenced, blob_files)
    _check_links(tree, bounds, report)

    all_blobs = dict(blob_files)
    counts.blobs = len(all_blobs)
    counts.blob_bytes = sum(all_blobs.values())
    referenced_real = {os.path.realpath(r) for r in referenced}
    unreferenced = [p for p in all_blobs if os.path.realpath(p) not in referenced_real]
    if unreferenced:
        report.note(tree / layout.BLOBS, f"{counted(len(unreferenced), 'blob')} "
                    f"({human_bytes(sum(all_blobs[p] for p in unreferenced))}) "
                    f"{'is' if len(unreferenced) == 1 else 'are'} referenced by no manifest")
    rate = None
    if not fast:
        rate = _hash_blobs(all_blobs, report, quiet)
    summary = (f"verify: {counted(counts.repositories, 'repository', 'repositories')}, "
               f"{counted(counts.tags, 'tag')}, {counted(counts.manifests, 'manifest')}, "
               f"{counted(counts.blobs, 'blob')} ({human_bytes(counts.blob_bytes)})"
               + (f", hashed at {human_bytes(rate)}/s" if rate else "")
               + (", hashes not checked (--fast)" if fast else "")
               + f": {len(report.problems) or 'no'} problem{'' if len(report.problems) == 1 else 's'}")
    print(summary, flush=True)
    return 1 if report.problems else 0


# ----- blobs ---------------------------------------------------------------------------------

def _scan_blob_dir(directory: Path, bounds: TreeBounds, report: Report, must_exist: bool) -> Dict[Path, int]:
    """digest-named files in one blobs directory -> size; everything else is reported."""
    found: Dict[Path, int] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        if must_exist:
            report.problem(directory, "missing: every tree keeps its blobs here")
        return found
    except OSError as error:
        report.problem(directory, f"cannot list: {error.strerror}")
        return found
    for entry in entries:
        path = Path(entry.path)
        if reference.is_digest(entry.name):
            try:
                found[path] = bounds.check_regular(path).st_size
            except Refused as refusal:
                report.problem(path, f"{refusal}; the server refuses it")
            except OSError as error:
                report.problem(path, f"cannot read: {error.strerror}")
        elif atomic.is_temp_name(entry.name):
            report.note(path, "left by an interrupted import; safe to delete")
        else:
            report.note(path, "not a blob name (sha256:<64 hex>); the server ignores it")
    return found


def _scan_leftovers(tree: Path, report: Report) -> None:
    try:
        for entry in os.scandir(tree):
            if entry.name.startswith(layout.STAGING_PREFIX):
                report.note(Path(entry.path), "staging directory left by an interrupted import; safe to delete")
    except OSError:
        pass


def _hash_blobs(blobs: Dict[Path, int], report: Report, quiet: bool) -> Optional[float]:
    progress = Progress("verify", sum(blobs.values()), enabled=not quiet)
    results = hashing.hash_files(blobs, on_bytes=progress.add, on_tick=progress.tick)
    progress.finish()
    for path in sorted(results):
        result = results[path]
        if isinstance(result, OSError):
            report.problem(path, f"cannot read: {result.strerror or result}")
            continue
        digest, size = result
        if digest != path.name:
            report.problem(path, f"content hashes to {digest}: the blob is damaged ({human_bytes(size)})")
    meaningful = progress.done >= RATE_MIN_BYTES and progress.elapsed >= RATE_MIN_SECONDS
    return progress.rate if progress.done and meaningful else None


# ----- repositories ----------------------------------------------------------------------------

def _check_repository(tree: Path, bounds: TreeBounds, repository: treewalk.Repository, report: Report,
                      counts: Counts, referenced: Dict[Path, int], blob_files: Dict[Path, int]) -> None:
    if not reference.is_name(repository.name) or (repository.namespace and not reference.is_host(repository.namespace)):
        report.note(repository.directory, "not a valid repository name: the server will not serve it")
    own_blobs = repository.directory / layout.BLOBS
    if own_blobs.is_dir() and not own_blobs.is_symlink():
        blob_files.update(_scan_blob_dir(own_blobs, bounds, report, must_exist=False))

    stored: Dict[str, manifests.Manifest] = {}
    for digest in layout.manifest_digests(repository.manifests):
        path = repository.manifests / digest
        counts.manifests += 1
        parsed = _read_manifest(path, bounds, report)
        if parsed is None:
            continue
        if parsed.digest != digest:
            report.problem(path, f"content hashes to {parsed.digest}: the manifest is damaged")
            continue
        stored[digest] = parsed
    try:
        entries = sorted(os.listdir(repository.manifests))
    except OSError as error:
        report.problem(repository.manifests, f"cannot list: {error.strerror}")
        entries = []
    for entry in entries:
        if atomic.is_temp_name(entry):
            report.note(repository.manifests / entry, "left by an interrupted import; safe to delete")
        elif not reference.is_digest(entry) and not reference.is_tag(entry):
            report.note(repository.manifests / entry, "neither a digest nor a tag; the server ignores it")

    for tag in layout.tags(repository.manifests):
        counts.tags += 1
        _check_tag(repository, tag, stored, bounds, report)

    for parsed in stored.values():
        where = repository.manifests / parsed.digest
        if parsed.is_index:
            _check_children(repository, parsed, stored, where, report)
        for blob in parsed.referenced_blobs():
            _check_blob_reference(tree, bounds, repository, blob, where, report, referenced)


def _read_manifest(path: Path, bounds: TreeBounds, report: Report) -> Optional[manifests.Manifest]:
    """The manifest at `path`, read as the server reads it; None (and a problem) otherwise."""
    try:
        with bounds.open_regular(path) as opened:
            size = opened.stat.st_size
            if size > manifests.MAX_MANIFEST_SIZE:
                report.problem(path, f"{human_bytes(size)} is over containerd's 4 MiB manifest limit")
                return None
            body = opened.read(manifests.MAX_MANIFEST_SIZE + 1)
    except Refused as refusal:
        report.problem(path, f"{refusal}; the server refuses it")
        return None
    except OSError as error:
        report.problem(path, f"cannot read: {error.strerror}")
        return None
    try:
        return manifests.parse(body)
    except manifests.NotAManifest as problem:
        report.problem(path, f"not a manifest: {problem}")
        return None


def _check_tag(repository, tag: str, stored: Dict[str, manifests.Manifest], bounds: TreeBounds, report: Report) -> None:
    path = repository.manifests / tag
    if path.is_symlink():
        target = os.readlink(path)
        digest = layout.tag_target_digest(path)
        if digest is None:
            report.problem(path, f"links to {target!r}, not to a sha256:<hex> manifest")
        elif not path.exists():
            report.problem(path, f"dangling tag: links to {target}, which does not exist")
        elif os.path.dirname(target) not in ("", "."):
            # Not the manifest stored next to it: read it as the server would (it may lead out).
            parsed = _read_manifest(path, bounds, report)
            if parsed is not None and parsed.digest != digest:
                report.problem(path, f"links to {target} whose content hashes to {parsed.digest}")
        return
    parsed = _read_manifest(path, bounds, report)
    if parsed is not None and parsed.digest not in stored:
        report.note(path, f"a plain copy of {parsed.digest}, which is not stored under its digest")


def _check_children(repository, index: manifests.Manifest, stored, where: Path, report: Report) -> None:
    present, absent = 0, []
    for child in index.children:
        path = repository.manifests / child.digest
        if child.digest in stored:
            present += 1
            if stored[child.digest].size != child.size:
                report.problem(path, f"is {stored[child.digest].size} bytes, index {index.digest} says {child.size}")
        elif path.exists():
            present += 1  # stored but unreadable or damaged: already reported
        elif child.platform and child.platform != "unknown/unknown":
            absent.append(child.platform)
        elif child.platform == "unknown/unknown":
            pass  # attestations and signatures: optional, often left out
        else:
            report.problem(path, f"missing: index {index.digest} references it")
    if absent:
        if present:
            report.note(where, f"not in the tree (pulled for fewer platforms): {', '.join(absent)}")
        else:
            report.problem(where, f"none of the index's manifests is in the tree ({', '.join(absent)})")


def _check_blob_reference(tree: Path, bounds: TreeBounds, repository, blob: manifests.Descriptor, where: Path,
                          report: Report, referenced: Dict[Path, int]) -> None:
    if not reference.is_digest(blob.digest):
        report.problem(where, f"references {blob.digest!r}, not a sha256 digest")
        return
    path = treewalk.blob_path(tree, repository, blob.digest, bounds)
    if path is None:
        shared = layout.shared_blob_path(tree, blob.digest)
        if not os.path.lexists(shared) and not os.path.lexists(repository.directory / layout.BLOBS / blob.digest):
            report.problem(shared, f"missing: {blob.media_type or 'blob'} of {where}")
        # else: present but refused, which the scan of blobs/ has reported
        return
    if path in referenced:
        return
    referenced[path] = blob.size
    size = path.stat().st_size
    if size != blob.size:
        report.problem(path, f"is {size} bytes, {where.name} says {blob.size}: truncated or damaged")


def _check_links(tree: Path, bounds: TreeBounds, report: Report) -> None:
    """Every `blobs` link resolves; no link (a repository, its manifests/) leads out of the tree."""
    for directory, subdirs, files in os.walk(tree):
        for name in subdirs + files:
            link = Path(directory) / name
            if not link.is_symlink():
                continue
            if name == layout.BLOBS and not link.is_dir():
                report.problem(link, f"dangling link to {os.readlink(link)}")
            elif link.is_dir():
                try:
                    bounds.resolve(link)
                except Refused as refusal:
                    report.problem(link, f"{refusal}; the server refuses it")
                except OSError:
                    pass
        subdirs[:] = [d for d in subdirs if d not in (layout.MANIFESTS, layout.BLOBS) and not d.startswith(".")]
