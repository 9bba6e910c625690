"""The OCI distribution grammars for repository names, tags, digests and upstream hosts.

Every path component a client sends is checked here before it reaches the filesystem. The
grammars admit no `/` inside a component, no `..`, no NUL and nothing that starts with a dot,
so a path built from validated parts can only name something inside the content tree.
"""

import re

# distribution-spec "Pulling manifests": <name> and <reference>.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# Only sha256 is stored in the tree; other algorithms are answered as unknown, not as errors.
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
# containerd's `?ns=` names the upstream registry: a hostname with an optional port
# (`docker.io`, `registry.local:5000`). Stored in the tree as one directory level.
HOST_RE = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]{1,5})?")

# The distribution reference grammar caps a repository path at 255 characters.
MAX_NAME_LENGTH = 255


def is_name(value: str) -> bool:
    return len(value) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(value) is not None


def is_tag(value: str) -> bool:
    return TAG_RE.fullmatch(value) is not None


def is_digest(value: str) -> bool:
    """A sha256 digest in the canonical lower-case form the tree stores."""
    return DIGEST_RE.fullmatch(value) is not None


def looks_like_digest(value: str) -> bool:
    """Any `algorithm:encoded` string: a digest, possibly of an algorithm the tree does not hold."""
    return ":" in value and ANY_DIGEST_RE.fullmatch(value) is not None


def is_host(value: str) -> bool:
    return len(value) <= 255 and HOST_RE.fullmatch(value) is not None


def split_domain(image: str):
    """Split `docker.io/rancher/x` into (`docker.io`, `rancher/x`); (None, image) without a domain.

    The first component is a registry host when it has a `.` or a `:` or is `localhost`,
    the rule docker and containerd use.
    """
    first, sep, rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, image
