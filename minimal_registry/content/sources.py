"""What a SOURCE given to `import` is, and how its content gets into the pool.

    OCI image layout directory    oci-layout, index.json, blobs/sha256/<hex>   (crane, skopeo oci:)
    skopeo `dir:` directory       version, manifest.json, <hex>, <hex>.manifest.json
    docker-save directory         manifest.json (a list), config JSON, layer tars
    content tree (our layout)     blobs/sha256:<hex>, <name>/manifests/...     (treesource.py)
    raw manifest file             one manifest or index as JSON (`crane manifest`,
                                  `skopeo inspect --raw`): a root whose content other
                                  sources (or the tree) hold
    tar archive of any of the first four, plain or gzip/zstd/bzip2/xz compressed
                                  (`skopeo copy ... oci-archive:`/`docker-archive:`,
                                  `docker save`, K3s `k3s-airgap-images-<arch>.tar.zst`)

An archive holding both an OCI `index.json` and a Docker `manifest.json` (K3s airgap
tarballs written by `ctr images export`, docker 25+) is read as OCI: that side keeps the
upstream digests. Archives are unpacked into a staging directory inside the tree (so blobs
can be renamed into place, never copied twice) which is removed afterwards.
"""

import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from minimal_registry import manifest as manifests
from minimal_registry import layout, reference
from minimal_registry.content import archive, dockerarchive, jsonread, ocilayout, treesource
from minimal_registry.content import files as source_files
from minimal_registry.content.entry import Entry
from minimal_registry.content.files import SourceFiles
from minimal_registry.content.intact import TreeBlobs
from minimal_registry.content.pool import Pool, Root
from minimal_registry.fatal import Fatal

STALE_STAGING_SECONDS = 3600
SKOPEO_DIR_VERSION = "version"
SKOPEO_DIR_MANIFEST = "manifest.json"
KINDS_HINT = ("give an OCI layout directory, an OCI or docker-save archive (plain, .gz or .zst), "
              "a skopeo dir: directory or a manifest JSON file")


@contextmanager
def read_sources(paths: List[Path], tree: Path, pool: Pool, quiet: bool = False,
                 tree_blobs: Optional[TreeBlobs] = None) -> Iterator[None]:
    """Read every source into `pool`; staged archives live until the block ends."""
    staging_dirs: List[Path] = []
    tree_blobs = tree_blobs or TreeBlobs(tree)
    remove_stale_staging(tree)
    try:
        for path in paths:
            read_one(path, tree, pool, staging_dirs, quiet, tree_blobs)
        yield
    finally:
        for staging in staging_dirs:
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(tree: Path) -> None:
    """Remove the staging directories of imports that were killed (SIGKILL, power cut):
    `.import-<pid>-<random>` whose process no longer runs and that nothing changed for an
    hour (an import in another pid namespace, a container, has a pid we cannot see). A live
    pid's is left alone, even if the pid now belongs to another program: removing too
    little is harmless."""
    try:
        entries = [entry for entry in os.scandir(tree) if entry.name.startswith(layout.STAGING_PREFIX)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(layout.STAGING_PREFIX):].split("-", 1)[0]
        if not pid.isascii() or not pid.isdigit() or _running(int(pid)):
            continue
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_STAGING_SECONDS:
                continue
        except OSError:
            continue
        shutil.rmtree(tree / entry.name, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists but not ours, or not a pid at all: leave it
    return True


def read_one(path: Path, tree: Path, pool: Pool, staging_dirs: List[Path], quiet: bool,
             tree_blobs: TreeBlobs) -> None:
    label = str(path)
    if path.is_dir():
        if treesource.is_tree_directory(path):
            treesource.read_directory(path, pool)
            return
        read_files(SourceFiles(label, directory=path), pool)
        return
    try:
        with source_files.open_regular(path) as head:
            start = head.read(64).lstrip()
    except source_files.NotRegular as problem:
        raise Fatal(f"{path} is {problem}, not a regular file", KINDS_HINT) from None
    except FileNotFoundError:
        raise Fatal(f"{path} does not exist", KINDS_HINT) from None
    except OSError as error:
        raise Fatal(f"cannot read {path}: {error.strerror}", "check its permissions") from None
    if start.startswith(b"{"):
        read_raw_manifest(path, pool)
        return
    if not archive.is_tar(path):
        raise Fatal(f"{path} is neither a directory, a tar archive nor a manifest", KINDS_HINT)
    staging = tree / f"{layout.STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    staging_dirs.append(staging)
    staged = archive.stage(path, staging, quiet=quiet, already_have=_in_tree(tree_blobs),
                           size_limits={ocilayout.INDEX: jsonread.MAX_DOCUMENT,
                                        dockerarchive.MANIFEST_JSON: jsonread.MAX_DOCUMENT})
    tree_prefix = treesource.staged_tree_prefix(staged)
    if tree_prefix is not None:
        treesource.read_staged(staged, tree_prefix, label, pool)
        return
    read_files(SourceFiles(label, staged=staged), pool)


def _in_tree(tree_blobs: TreeBlobs):
    """Whether an archive member `blobs/sha256/<hex>` is a big blob the tree already holds intact.

    Only blobs over the manifest size limit: a manifest is never skipped, since older trees
    (the original tool's `awk`) may hold manifests under blobs/ too, and the import needs
    to read it from the archive.
    """

    def already_have(name: str, size: int) -> bool:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if size <= manifests.MAX_MANIFEST_SIZE or len(parts) != 3 or parts[:2] != ["blobs", "sha256"]:
            return False
        digest = "sha256:" + parts[2]
        if not reference.is_digest(digest):
            return False
        return tree_blobs.holds(digest, size)

    return already_have


def read_files(files: SourceFiles, pool: Pool) -> None:
    if ocilayout.is_layout(files):
        ocilayout.read(files, pool)
    elif files.exists(SKOPEO_DIR_VERSION) and files.exists(SKOPEO_DIR_MANIFEST):
        read_skopeo_dir(files, pool)
    elif dockerarchive.is_docker_archive(files):
        dockerarchive.read(files, pool)
    else:
        raise Fatal(f"{files.label} holds no index.json, manifest.json or skopeo dir: layout", KINDS_HINT)


def read_skopeo_dir(files: SourceFiles, pool: Pool) -> None:
    """skopeo's `dir:` transport: manifests kept byte for byte, so upstream digests survive."""
    version = files.read_bytes(SKOPEO_DIR_VERSION, limit=4096).decode(errors="replace")
    if not version.startswith("Directory Transport Version: 1."):
        raise Fatal(f"{files.label}: unknown skopeo dir: version {version.strip()!r}", KINDS_HINT)

    def store(digest: str) -> Optional[Entry]:
        if not reference.is_digest(digest):
            return None
        encoded = digest[len("sha256:"):]
        return files.lookup(encoded) or files.lookup(f"{encoded}.manifest.json")

    pool.add_store(store)
    body = files.read_bytes(SKOPEO_DIR_MANIFEST, limit=manifests.MAX_MANIFEST_SIZE)
    digest = pool.add_bytes(body)
    pool.add_root(Root(digest=digest, source=files.label, size=len(body)))


def read_raw_manifest(path: Path, pool: Pool) -> None:
    body = jsonread.read_document(path, str(path))
    try:
        manifests.parse(body)
    except manifests.NotAManifest as problem:
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            raise Fatal(f"{path} is not a manifest: {problem}", KINDS_HINT) from None
        raise Fatal(f"{path} is JSON but not a manifest: {problem}", KINDS_HINT) from None
    digest = pool.add_bytes(body)
    pool.add_root(Root(digest=digest, source=str(path), size=len(body)))
