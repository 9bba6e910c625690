"""`minimal-registry rm REF...`: remove tags (`NAME:TAG`) or manifests (`NAME@sha256:...`).

References are read as K3s's `k3s-images.txt` writes them (`docker.io/rancher/mirrored-pause:3.6`)
and found wherever `import` could have filed them: under the domain (a tree that keeps
domains, `docker.io/rancher/mirrored-pause`) and without it (`rancher/mirrored-pause`). So
`rm -f k3s-images.txt` removes exactly the images of that release, and `--keep FILE` spares
those another list still names (the next release often keeps an image, pause among them).

Only names go: a tag's symlink, or a manifest file and the tags naming it. The blobs and
child manifests stay until `prune` finds that nothing reaches them. Every removal is one
`unlink`, so a server running meanwhile answers with the old state or the new, and a client
already downloading keeps its bytes.

Exit codes: 0 done (references from -f that are not in the tree are listed, not errors),
1 a REF given on the command line is not in the tree, 2 unusable input (nothing removed).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from minimal_registry import layout, reference
from minimal_registry import manifest as manifests
from minimal_registry.content import names
from minimal_registry.content.containment import is_plain_directory, read_regular
from minimal_registry.fatal import Fatal

REF_HINT = "write NAME:TAG or NAME@sha256:<64 hex>, for example docker.io/rancher/mirrored-pause:3.6"
MAX_LIST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Ref:
    text: str  # as given
    repositories: Tuple[str, ...]  # where the tree may file it, most specific first
    tag: Optional[str]
    digest: Optional[str]
    from_file: bool

    @property
    def key(self) -> Tuple[str, Optional[str], Optional[str]]:
        return self.repositories[0], self.tag, self.digest


def parse_ref(text: str, from_file: bool = False) -> Ref:
    """A reference, or ValueError saying what is wrong with it."""
    text = text.strip()
    name_part, at, digest = text.partition("@")
    if at and not reference.is_digest(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    parsed = names.parse(name_part)  # docker's reading: docker.io/library/... when no domain
    if not at and parsed.tag is None:
        raise ValueError("it names no tag and no digest")
    places = [f"{parsed.domain}/{parsed.path}"] if parsed.domain else []
    places.append(parsed.path)
    literal = names.parse(name_part, familiar=False)  # a one-level name filed as given (--name hello)
    if literal.path not in places:
        places.append(literal.path)
    return Ref(text, tuple(dict.fromkeys(places)), None if at else parsed.tag, digest if at else None, from_file)


def read_list(path: Path) -> List[Tuple[int, str]]:
    """(line number, reference) of a k3s-images.txt-style file: one per line, # comments."""
    if str(path) == "-":
        import sys
        text = sys.stdin.read(MAX_LIST_BYTES)
    else:
        data = read_regular(str(path), MAX_LIST_BYTES) if path.exists() else None
        if data is None:
            raise Fatal(f"cannot read the list {path}", "give a text file of references, one per line")
        text = data.decode("utf-8", errors="replace")
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append((number, line))
    return entries


def gather(arguments: List[str], files: List[Path], keep_files: List[Path]) -> Tuple[List[Ref], Set[tuple]]:
    refs: List[Ref] = []
    for text in arguments:
        try:
            refs.append(parse_ref(text))
        except ValueError as problem:
            raise Fatal(f"{text!r} is not an image reference: {problem}", REF_HINT) from None
    for path in files:
        for number, text in read_list(path):
            try:
                refs.append(parse_ref(text, from_file=True))
            except ValueError as problem:
                raise Fatal(f"{path} line {number}: {text!r} is not an image reference: {problem}", REF_HINT) from None
    kept = set()
    for path in keep_files:
        for number, text in read_list(path):
            try:
                kept.add(parse_ref(text).key)
            except ValueError as problem:
                raise Fatal(f"{path} line {number}: {text!r} is not an image reference: {problem}", REF_HINT) from None
    if not refs:
        raise Fatal("nothing to remove", "give REF... or -f FILE")
    return refs, kept


def tag_digest(path: Path) -> Optional[str]:
    """The digest a tag names: its symlink's target, or the hash of a plain copy."""
    if os.path.islink(path):
        return layout.tag_target_digest(path)
    body = read_regular(str(path), manifests.MAX_MANIFEST_SIZE)
    return manifests.sha256_digest(body) if body is not None else None


def remove(tree: Path, ref: Ref) -> List[Dict[str, str]]:
    """Unlink what `ref` names in every repository it may be filed under; what was removed."""
    removed = []
    for repository in ref.repositories:
        relative = layout.manifests_relpath(repository)
        if not is_plain_directory(str(tree), relative):
            continue
        directory = tree / relative
        if ref.tag is not None:
            path = directory / ref.tag
            if os.path.lexists(path):
                digest = tag_digest(path)
                _unlink(path)
                removed.append({"repository": repository, "tag": ref.tag, "digest": digest or "?"})
            continue
        for tag in layout.tags(directory):
            if tag_digest(directory / tag) == ref.digest:
                _unlink(directory / tag)
                removed.append({"repository": repository, "tag": tag, "digest": ref.digest})
        if os.path.lexists(directory / ref.digest):
            _unlink(directory / ref.digest)
            removed.append({"repository": repository, "tag": None, "digest": ref.digest})
    return removed


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # gone already: that is what was asked
    except IsADirectoryError:
        raise Fatal(f"{path} is a directory, not a tag or manifest", "check the tree with `minimal-registry verify`") from None


def run(tree: Path, arguments: List[str], files: List[Path], keep_files: List[Path],
        as_json: bool = False, quiet: bool = False) -> int:
    refs, kept = gather(arguments, files, keep_files)
    report = {"tree": str(tree), "removed": [], "kept": [], "absent": []}
    missing_argument = False
    for ref in dict((r.text, r) for r in refs).values():
        if ref.key in kept:
            report["kept"].append(ref.text)
            if not as_json and not quiet:
                print(f"kept    {ref.text} (listed in --keep)", flush=True)
            continue
        try:
            removed = remove(tree, ref)
        except OSError as error:
            raise Fatal(f"cannot remove {ref.text}: {error.strerror} ({error.filename})",
                        "check the permissions of the content tree") from None
        if not removed:
            report["absent"].append(ref.text)
            missing_argument = missing_argument or not ref.from_file
            if not as_json and not quiet:
                print(f"absent  {ref.text} (not in the tree)", flush=True)
            continue
        for item in removed:
            item["reference"] = ref.text
            report["removed"].append(item)
            if not as_json and not quiet:
                what = f"{item['repository']}:{item['tag']}" if item["tag"] else f"{item['repository']}@{item['digest']}"
                print(f"removed {what} ({item['digest']})", flush=True)
    if as_json:
        print(json.dumps(report, indent=2), flush=True)
    elif not quiet:
        print(f"rm: {len(report['removed'])} removed, {len(report['absent'])} not in the tree, "
              f"{len(report['kept'])} kept; `minimal-registry prune` frees the space", flush=True)
    return 1 if missing_argument else 0
