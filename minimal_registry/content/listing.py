"""`minimal-registry ls`: what the tree serves, for a person or (`--json`) for a program.

One row per tag: repository, tag, digest, media type, platforms (those of an index that are
in the tree, and how many it lists), and the image's size (its manifests and the blobs they
reference, each counted once). The totals count every file under `blobs/` once.
"""

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from minimal_registry import layout, reference
from minimal_registry import manifest as manifests
from minimal_registry.content import treewalk
from minimal_registry.content.formatting import counted, human_bytes, short_media_type
from minimal_registry.treesafety import Refused, TreeBounds


def run(tree: Path, as_json: bool = False) -> int:
    document = describe(tree)
    text = json.dumps(document, indent=2) if as_json else render(document)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `ls | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def describe(tree: Path) -> dict:
    bounds = TreeBounds(tree)
    repositories = []
    for repository in treewalk.repositories(tree):
        tags = [_describe_tag(tree, bounds, repository, tag) for tag in layout.tags(repository.manifests)]
        repositories.append({
            "repository": repository.full_name,
            "namespace": repository.namespace,
            "name": repository.name,
            "tags": tags,
            "manifests": len(layout.manifest_digests(repository.manifests)),
        })
    blob_count, blob_bytes = _blob_totals(tree, bounds)
    return {
        "root": str(tree),
        "repositories": repositories,
        "totals": {
            "repositories": len(repositories),
            "tags": sum(len(r["tags"]) for r in repositories),
            "blobs": blob_count,
            "size": blob_bytes + _manifest_bytes(tree, repositories),
        },
    }


def _describe_tag(tree: Path, bounds: TreeBounds, repository: treewalk.Repository, tag: str) -> dict:
    path = repository.manifests / tag
    result = {"tag": tag, "digest": layout.tag_target_digest(path), "mediaType": None,
              "platforms": [], "absentPlatforms": [], "size": None, "error": None}
    top, why = _load(bounds, path)
    if top is None:
        result["error"] = why
        return result
    result["digest"] = result["digest"] or top.digest
    result["mediaType"] = top.media_type
    seen_blobs: Dict[str, int] = {}
    size = top.size
    images = [top]
    if top.is_index:
        images = []
        for child in top.children:
            loaded, _why = _load(bounds, repository.manifests / child.digest)
            if loaded is None:
                if child.platform:
                    result["absentPlatforms"].append(child.platform)
                continue
            if child.platform:
                result["platforms"].append(child.platform)
            size += loaded.size
            images.append(loaded)
    for image in images:
        for blob in image.referenced_blobs():
            if treewalk.blob_path(tree, repository, blob.digest, bounds) is not None:
                seen_blobs[blob.digest] = blob.size
    result["size"] = size + sum(seen_blobs.values())
    return result


def _load(bounds: TreeBounds, path: Path) -> Tuple[Optional[manifests.Manifest], Optional[str]]:
    """(manifest, None), or (None, why not): read only as the server reads (`treesafety`)."""
    try:
        with bounds.open_regular(path) as opened:
            if opened.stat.st_size > manifests.MAX_MANIFEST_SIZE:
                return None, "over containerd's 4 MiB manifest limit"
            return manifests.parse(opened.read(manifests.MAX_MANIFEST_SIZE + 1)), None
    except Refused as refusal:
        return None, str(refusal)
    except OSError as error:
        return None, f"cannot read: {error.strerror}"
    except manifests.NotAManifest as problem:
        return None, f"not a manifest: {problem}"


def _blob_totals(tree: Path, bounds: TreeBounds):
    count = total = 0
    try:
        entries = list(os.scandir(layout.shared_blobs_dir(tree)))
    except OSError:
        return count, total
    for entry in entries:
        if reference.is_digest(entry.name):
            try:
                total += bounds.check_regular(entry.path).st_size
                count += 1
            except (OSError, Refused):
                pass
    return count, total


def _manifest_bytes(tree: Path, repositories: List[dict]) -> int:
    total = 0
    for repository in repositories:
        directory = tree / repository["repository"] / layout.MANIFESTS
        for digest in layout.manifest_digests(directory):
            try:
                total += (directory / digest).stat().st_size
            except OSError:
                pass
    return total


def render(document: dict) -> str:
    header = ("REPOSITORY", "TAG", "DIGEST", "TYPE", "PLATFORMS", "SIZE")
    rows = []
    for repository in document["repositories"]:
        for tag in repository["tags"]:
            platforms = ", ".join(tag["platforms"])
            if tag["absentPlatforms"]:
                listed = len(tag["platforms"]) + len(tag["absentPlatforms"])
                platforms += f" ({len(tag['platforms'])} of {listed})"
            rows.append((
                repository["repository"],
                tag["tag"],
                (tag["digest"] or "?")[:19],
                short_media_type(tag["mediaType"]) if tag["mediaType"] else "BROKEN",
                platforms or "-",
                human_bytes(tag["size"]) if tag["size"] is not None else "-",
            ))
    if not rows:
        return f"no images in {document['root']}"
    broken = [f"{repository['repository']}:{tag['tag']}: {tag['error']}"
              for repository in document["repositories"] for tag in repository["tags"] if tag["error"]]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header] + rows]
    totals = document["totals"]
    if broken:
        lines += [""] + broken
    lines.append("")
    lines.append(f"{counted(totals['repositories'], 'repository', 'repositories')}, {counted(totals['tags'], 'tag')}, "
                 f"{counted(totals['blobs'], 'blob')}, "
                 f"{human_bytes(totals['size'])} in {document['root']}")
    return "\n".join(lines)
