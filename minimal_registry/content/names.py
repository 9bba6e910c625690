"""Image references as sources write them, and where the tree files them.

Sources name images in several dialects: containerd's `io.containerd.image.name`
(`docker.io/rancher/mirrored-pause:3.6`), the OCI `org.opencontainers.image.ref.name`
(often a bare tag, `3.6`), crane's `index.docker.io/...`, and docker's `RepoTags`
(`busybox:latest`). They are all read the way docker and containerd read them: no domain
means `docker.io`, a one-level Docker Hub name means `library/<name>`.

By default the tree drops the domain (`rancher/mirrored-pause`, as the original tool did, for
`--system-default-registry`); `--keep-domain` files it under `<domain>/` for `?ns=` lookups.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from minimal_registry import layout, reference
from minimal_registry.fatal import Fatal

DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
# A repository path component with one of these names would collide with the tree's own
# `manifests/` directories and `blobs` links.
RESERVED_COMPONENTS = (layout.BLOBS, layout.MANIFESTS)


@dataclass(frozen=True)
class ImageName:
    domain: Optional[str]  # "docker.io", "127.0.0.1:5000"; None when given without one
    path: str  # "rancher/mirrored-pause"
    tag: Optional[str]

    def __str__(self) -> str:
        base = f"{self.domain}/{self.path}" if self.domain else self.path
        return f"{base}:{self.tag}" if self.tag else base

    def placement(self, keep_domain: bool) -> Tuple[Optional[str], str]:
        """(namespace directory or None, repository name) in the tree."""
        return (self.domain if keep_domain else None), self.path


def parse(text: str, familiar: bool = True) -> ImageName:
    """Parse `[domain/]path[:tag][@digest]`; raise ValueError saying what is wrong.

    `familiar`: complete a name without a domain the docker way (`busybox` ->
    `docker.io/library/busybox`). Off for a name the operator typed with `--name`.
    """
    text = text.strip()
    rest = text.split("@", 1)[0]
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = None
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not reference.is_tag(tag):
            raise ValueError(f"{tag!r} is not a valid tag")
    domain, path = reference.split_domain(rest)
    if domain is not None and not reference.is_host(domain):
        raise ValueError(f"{domain!r} is not a valid registry host")
    if domain is not None and domain.lower() in _HUB_ALIASES:
        domain = DOCKER_HUB
    if domain is None and familiar:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    check_path(path)
    return ImageName(domain, path, tag)


def describe(text: str) -> str:
    """`DOMAIN PATH TAG`: the reference as docker and containerd read it, for shell scripts.

    The scripts (download-system-images.sh) ask this instead of parsing references themselves,
    so a list is read one way everywhere: `busybox` is `docker.io library/busybox latest`, as
    `import` files a docker-save archive's `busybox:latest`. The tag is `latest` when none is
    written, also beside a digest (`x@sha256:...`): the importer files every image under a tag.
    The fields hold no spaces (the grammars allow none). Raises ValueError saying what is wrong.
    """
    if not text.strip():
        raise ValueError("an empty reference")
    image = parse(text)
    return f"{image.domain} {image.path} {image.tag or 'latest'}"


def run(references: List[str]) -> int:
    """`minimal-registry normalize REF...`: one `describe` line per reference; none if one is bad."""
    lines = []
    for text in references:
        try:
            lines.append(describe(text))
        except ValueError as problem:
            raise Fatal(f"{text!r} is not an image reference: {problem}",
                        "write [host[:port]/]path[:tag][@sha256:...], e.g. docker.io/rancher/mirrored-pause:3.6") from None
    for line in lines:
        print(line)
    return 0


def check_path(path: str) -> None:
    if not reference.is_name(path):
        raise ValueError(f"{path!r} is not a valid repository name (lower-case a-z, 0-9, . _ - and /)")
    for component in path.split("/"):
        if component in RESERVED_COMPONENTS:
            raise ValueError(f"{path!r} has a component named {component!r}, which the tree uses itself")


def from_annotations(annotations: dict) -> Tuple[Optional[ImageName], Optional[str]]:
    """(full name, or None; bare tag, or None) from an OCI index entry's annotations."""
    full = annotations.get("io.containerd.image.name")
    ref = annotations.get("org.opencontainers.image.ref.name")
    if isinstance(full, str) and full:
        return parse(full), None
    if isinstance(ref, str) and ref:
        if reference.is_tag(ref):
            return None, ref  # the OCI spec's usual meaning: just the tag
        return parse(ref), None
    return None, None
