"""From the roots the sources name to what the tree must gain: names, manifests, blobs.

Every decision is made here, before anything is written, so a missing layer or a bad name
stops the import with the tree untouched. The tree itself counts as a source: content it
already holds need not be in the sources, which is what lets an import of a bare index (a
manifest JSON file) succeed when the platforms it needs were imported before.

Roots: each image a source names. A nameless root that is a child of another root's index
(a platform image pulled beside its index) is part of that image, not an image of its own.

A source cannot make the walk explode: each manifest is walked once per image however many
times indexes list it (eight indexes each listing the next 100 times are 100^8 paths but nine
manifests), and sources that reference more than MAX_DESCRIPTORS distinct digests are refused.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Union

from minimal_registry import layout, reference
from minimal_registry import manifest as manifests
from minimal_registry.content import jsonread, names, platforms
from minimal_registry.content.entry import Entry
from minimal_registry.content.intact import TreeBlobs
from minimal_registry.content.pool import MissingContent, Pool, Root
from minimal_registry.fatal import Fatal

Source = Union[Entry, bytes, None]  # None: already in the tree


@dataclass
class ImagePlan:
    name: names.ImageName
    namespace: Optional[str]
    repository: str
    tag: Optional[str]
    digest: str
    media_type: str
    source: str
    manifests: Dict[str, bytes] = field(default_factory=dict)  # digest -> bytes, children first
    blobs: Dict[str, Source] = field(default_factory=dict)  # digest -> where to get it
    blob_sizes: Dict[str, int] = field(default_factory=dict)
    # Ordered sets (dict keys): an index may list the same platform thousands of times.
    present_platforms: Dict[str, None] = field(default_factory=dict)
    absent_platforms: Dict[str, None] = field(default_factory=dict)  # listed by the index, in no source
    left_out_platforms: Dict[str, None] = field(default_factory=dict)  # not asked for with --platform
    unmatched_platforms: Dict[str, None] = field(default_factory=dict)  # asked for, not in the index
    walked: Dict[str, int] = field(default_factory=dict, repr=False)  # manifest digest -> size
    referenced: Set[str] = field(default_factory=set, repr=False)  # every digest, shared by all plans
    tree_blobs: Optional[TreeBlobs] = field(default=None, repr=False)

    @property
    def reference(self) -> str:
        where = f"{self.namespace}/{self.repository}" if self.namespace else self.repository
        return f"{where}:{self.tag}" if self.tag else f"{where}@{self.digest}"


MAX_DESCRIPTORS = 100_000  # distinct manifests and blobs: the K3s airgap set has a few hundred


def make(pool: Pool, tree: Path, name: Optional[str], tag: Optional[str], keep_domain: bool,
         wanted_platforms: Optional[List[str]], tree_blobs: Optional[TreeBlobs] = None) -> List[ImagePlan]:
    if len(pool.roots) > MAX_DESCRIPTORS:
        raise _too_many(pool.roots[0].source)
    roots = _merge(_drop_children(pool, pool.roots, overriding=name is not None or tag is not None))
    if not roots:
        raise Fatal("the sources name no image", "check the sources")
    tree_blobs = tree_blobs or TreeBlobs(tree)
    referenced: Set[str] = set()
    plans = []
    for root, image_name in _named(roots, name, tag):
        namespace, repository = image_name.placement(keep_domain)
        top = _manifest(pool, tree, namespace, repository, root.digest, root.source)
        if top is None:
            raise MissingContent(f"{root.source}: manifest {root.digest} of {image_name} is missing")
        plan = ImagePlan(name=image_name, namespace=namespace, repository=repository, tag=image_name.tag,
                         digest=root.digest, media_type=top.media_type, source=root.source,
                         referenced=referenced, tree_blobs=tree_blobs)
        _count(plan, root.digest)
        _walk(pool, tree, plan, top, wanted_platforms, depth=0)
        plans.append(plan)
    return plans


def _count(plan: ImagePlan, digest: str) -> None:
    plan.referenced.add(digest)
    if len(plan.referenced) > MAX_DESCRIPTORS:
        raise _too_many(plan.source)


def _too_many(source: str) -> Fatal:
    return Fatal(f"{source}: the sources reference more than {MAX_DESCRIPTORS} distinct manifests and blobs",
                 "no real set of images comes near that; check where the source came from")


# ----- roots and names ---------------------------------------------------------------------

def _drop_children(pool: Pool, roots: List[Root], overriding: bool) -> List[Root]:
    """Roots that are not platform images of another root's index.

    A named one is kept (a layout may tag a platform image on purpose) unless --name/--tag
    say the sources are one image: then `crane pull --platform` output, which names each
    platform image after the tag it came from, joins the index it belongs to.
    """
    children = set()
    for root in roots:
        parsed = pool.manifest(root.digest, root.source)
        if parsed is not None and parsed.is_index:
            children.update(child.digest for child in parsed.children)
    return [r for r in roots if r.digest not in children or (not overriding and (r.named or r.bare_tags))]


def _merge(roots: List[Root]) -> List[Root]:
    """One root per digest, with every name any source gave it."""
    merged: Dict[str, Root] = {}
    for root in roots:
        if root.digest in merged:
            kept = merged[root.digest]
            kept.names += [n for n in root.names if n not in kept.names]
            kept.bare_tags += [t for t in root.bare_tags if t not in kept.bare_tags]
        else:
            merged[root.digest] = Root(root.digest, root.source, list(root.names), list(root.bare_tags), root.size)
    return list(merged.values())


def _named(roots: List[Root], name: Optional[str], tag: Optional[str]):
    """(root, full name with its tag) for every name every root is to be filed under."""
    if name is not None or tag is not None:
        if len(roots) != 1:
            listed = ", ".join(_describe(r) for r in roots[:5])
            raise Fatal(f"--name/--tag name one image, but the sources hold {len(roots)}: {listed}",
                        "import those sources one at a time")
        root = roots[0]
        yield from ((root, n) for n in _override(root, name, tag))
        return
    for root in roots:
        if not root.names:
            what = f"only the tag {root.bare_tags[0]!r}" if root.bare_tags else "no name"
            raise Fatal(f"{root.source}: image {root.digest} has {what}",
                        "give --name NAME (and --tag TAG) to file it")
        for image_name in root.names:
            yield root, image_name


def _override(root: Root, name: Optional[str], tag: Optional[str]) -> List[names.ImageName]:
    if name is not None:
        try:
            base = names.parse(name, familiar=False)
        except ValueError as problem:
            raise Fatal(f"--name {name!r}: {problem}", "for example --name rancher/mirrored-pause") from None
    elif root.names:
        base = root.names[0]
    else:
        raise Fatal(f"{root.source}: image {root.digest} has no name", "give --name NAME as well as --tag")
    if tag is not None:
        if not reference.is_tag(tag):
            raise Fatal(f"--tag {tag!r} is not a valid tag", "a tag is up to 128 of a-z A-Z 0-9 _ . -")
        tags = [tag]
    elif base.tag:
        tags = [base.tag]
    else:
        tags = [n.tag for n in root.names if n.tag] + list(root.bare_tags) or ["latest"]
    unique = list(dict.fromkeys(tags))
    return [names.ImageName(base.domain, base.path, t) for t in unique]


def _describe(root: Root) -> str:
    return str(root.names[0]) if root.names else f"{root.digest[:19]}…"


# ----- walking the manifests -----------------------------------------------------------------

MAX_DEPTH = 8


def _manifest(pool: Pool, tree: Path, namespace, repository, digest, where) -> Optional[manifests.Manifest]:
    found = pool.manifest(digest, where)
    if found is not None:
        return found
    stored = layout.manifests_dir(tree, repository, namespace) / digest
    try:
        body = jsonread.read_document(stored, str(stored))
        parsed = manifests.parse(body)
    except (OSError, Fatal, manifests.NotAManifest):
        return None  # absent, not a regular file, too big or not a manifest: not usable
    return parsed if parsed.digest == digest else None  # a damaged copy is replaced from the sources


def _walk(pool: Pool, tree: Path, plan: ImagePlan, current: manifests.Manifest,
          wanted: Optional[List[str]], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Fatal(f"{plan.source}: indexes nest deeper than {MAX_DEPTH} levels", "check the source")
    plan.walked[current.digest] = current.size
    if current.is_index:
        _walk_index(pool, tree, plan, current, wanted, depth)
    else:
        for blob in current.referenced_blobs():
            _add_blob(pool, tree, plan, blob, current.digest)
    plan.manifests[current.digest] = current.body


def _walk_index(pool, tree, plan: ImagePlan, index: manifests.Manifest, wanted, depth) -> None:
    taken = 0
    if wanted is not None:
        offered = [c.platform for c in index.children if c.platform]
        for missing in [w for w in wanted if not any(platforms.matches(w, o) for o in offered)]:
            _note(plan.unmatched_platforms, missing)
    for child in index.children:
        _count(plan, child.digest)
        label = child.platform or child.digest
        selected = wanted is None or child.platform is None or any(platforms.matches(w, child.platform) for w in wanted)
        if not selected:
            _note(plan.left_out_platforms, label)
            continue
        if child.digest in plan.walked:  # listed again (here or by another index): walked once
            found_size = plan.walked[child.digest]
        else:
            found = _manifest(pool, tree, plan.namespace, plan.repository, child.digest, plan.source)
            if found is None:
                if wanted is not None and child.platform is not None:
                    raise MissingContent(f"{plan.name}: the {child.platform} manifest {child.digest} is in no source")
                _note(plan.absent_platforms, label)
                continue
            found_size = found.size
        if found_size != child.size:
            raise Fatal(f"{plan.name}: manifest {child.digest} is {found_size} bytes, its index says {child.size}",
                        "the source is damaged; pull it again")
        if child.digest not in plan.walked:
            _walk(pool, tree, plan, found, wanted, depth + 1)
        taken += 1
        if child.platform:
            _note(plan.present_platforms, child.platform)
    if taken == 0:
        raise MissingContent(f"{plan.name}: none of the {len(index.children)} manifests of index "
                             f"{index.digest} is in the sources")


def _note(labels: Dict[str, None], label: str) -> None:
    labels[label] = None


def _add_blob(pool: Pool, tree: Path, plan: ImagePlan, blob: manifests.Descriptor, owner: str) -> None:
    if blob.digest in plan.blobs:
        return
    _count(plan, blob.digest)
    if not reference.is_digest(blob.digest):
        raise Fatal(f"{plan.name}: manifest {owner} references {blob.digest!r}, not a sha256 digest",
                    "only sha256 content can be imported")
    size = pool.size(blob.digest)
    if size is not None:
        if size != blob.size:
            raise Fatal(f"{plan.name}: blob {blob.digest} is {size} bytes, manifest {owner} says {blob.size}",
                        "the source is damaged; pull it again")
        plan.blobs[blob.digest] = pool.find(blob.digest)
    elif plan.tree_blobs.holds(blob.digest, blob.size):
        plan.blobs[blob.digest] = None
    else:
        raise MissingContent(f"{plan.name}: blob {blob.digest} ({blob.media_type or 'no media type'}, "
                             f"{blob.size} bytes) of manifest {owner} is in no source")
    plan.blob_sizes[blob.digest] = blob.size
