"""`minimal-registry import SOURCE...`: lay images from layouts and archives into the tree.

    sources (read; archives staged) -> pool -> plan (every check) -> place (atomic writes)

Exit codes: 0 done (or nothing to do), 2 unusable input, 3 content missing (a blob or
platform manifest is in neither the sources nor the tree: the download script reads this
as "pull it"), 130 interrupted (staged files are removed; nothing is half-written).
"""

import signal
from pathlib import Path
from typing import Iterator, List, Optional

from minimal_registry.content import place, plan, platforms
from minimal_registry.content import sources as source_kinds
from minimal_registry.content.pool import Pool
from minimal_registry.content.files import printable
from minimal_registry.content.formatting import counted, human_bytes, short_media_type
from minimal_registry.content.intact import TreeBlobs
from minimal_registry.fatal import Fatal


def run(sources: List[Path], tree: Path, name: Optional[str] = None, tag: Optional[str] = None,
        keep_domain: bool = False, quiet: bool = False, platform: Optional[str] = None) -> int:
    try:
        wanted = platforms.parse_list(platform)
    except ValueError as problem:
        raise Fatal(f"--platform: {problem}", "for example --platform linux/amd64,linux/arm64") from None
    if not sources:
        raise Fatal("nothing to import", "give at least one SOURCE")
    for source in sources:  # before the tree is created: a typo must not leave an empty tree
        if not Path(source).exists():
            raise Fatal(f"{source} does not exist", source_kinds.KINDS_HINT)
    _prepare_tree(tree)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        pool = Pool()
        tree_blobs = TreeBlobs(tree)  # one hash per tree blob per run, shared by every step
        with source_kinds.read_sources(list(sources), tree, pool, quiet=quiet, tree_blobs=tree_blobs):
            plans = plan.make(pool, tree, name, tag, keep_domain, wanted, tree_blobs)
            for line in _place(tree, plans, tree_blobs):
                if not quiet:
                    print(line, flush=True)
    except OSError as error:  # reading a source or staging into the tree: say which file
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise Fatal(f"import failed: {error.strerror or error}{where}",
                    "check that the sources are readable and the tree is writable with free space") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt  # unwinds through the cleanup of staged files and temp names


def _prepare_tree(tree: Path) -> None:
    if tree.exists() and not tree.is_dir():
        raise Fatal(f"{tree} is not a directory", "give the content tree with -d DIR")
    try:
        tree.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Fatal(f"cannot create {tree}: {error.strerror}", "check the path and its permissions") from None


def _place(tree: Path, plans: List[plan.ImagePlan], tree_blobs: TreeBlobs) -> Iterator[str]:
    placer = place.Placer(tree, tree_blobs)
    try:
        written = {}
        for image in plans:
            new = repaired = 0
            for digest, source in image.blobs.items():
                if digest not in written:
                    written[digest] = placer.blob(digest, source, image.blob_sizes[digest], image.source)
                    new += written[digest] == place.NEW
                    repaired += written[digest] == place.REPAIRED
            placer.sync()  # blobs are on disk before any manifest names them
            manifests_dir = placer.repository(image.repository, image.namespace)
            new_manifests = sum(placer.manifest(manifests_dir, d, body) for d, body in image.manifests.items())
            placer.sync()
            state = placer.tag(manifests_dir, image.tag, image.digest) if image.tag else "untagged"
            placer.sync()
            yield _summary(image, state, new, repaired, new_manifests)
    except OSError as error:
        raise Fatal(f"cannot write into {tree}: {error.strerror or error} ({getattr(error, 'filename', '')})",
                    "check the free space and permissions of the content tree") from None


def _listed(labels, shown: int = 10) -> str:
    """At most `shown` of `labels`: an index may list thousands (the line stays one line)."""
    labels = [printable(label) for label in labels]
    more = f" and {len(labels) - shown} more" if len(labels) > shown else ""
    return ", ".join(labels[:shown]) + more


def _summary(image: plan.ImagePlan, state: str, new_blobs: int, repaired: int, new_manifests: int) -> str:
    changed = new_blobs or repaired or new_manifests or state in ("new", "moved")
    verb = "imported" if changed else "unchanged"
    details = [short_media_type(image.media_type)]
    if image.present_platforms or image.absent_platforms or image.left_out_platforms:
        details.append(_listed(image.present_platforms) or "no platform")
    if image.absent_platforms:
        details.append("not in the sources: " + _listed(image.absent_platforms))
    if image.left_out_platforms:
        details.append("left out: " + _listed(image.left_out_platforms))
    if image.unmatched_platforms:
        details.append("the index lists no " + _listed(image.unmatched_platforms))
    total = sum(image.blob_sizes.values())
    details.append(f"{counted(len(image.blob_sizes), 'blob')}, {human_bytes(total)}")
    if changed:
        details.append(f"{counted(new_blobs, 'new blob')}, {counted(new_manifests, 'new manifest')}")
    if repaired:
        details.append(f"repaired {counted(repaired, 'damaged blob')}")
    if state == "moved":
        details.append("tag moved")
    return f"{verb} {image.reference} {image.digest} ({'; '.join(details)})"
