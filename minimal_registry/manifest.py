"""Reading a stored manifest: its media type, digest and the descriptors it references.

A manifest is served as its exact bytes; this module only reads them, for the headers
(`Content-Type`, `Docker-Content-Digest`), for `referrers`, and for `verify`.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

# RFC 6838 section 4.2: type "/" subtype, each a restricted-name (no parameters: P7).
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE_RE = re.compile(rf"{_RESTRICTED_NAME}/{_RESTRICTED_NAME}")

# containerd refuses manifests larger than this (remotes/docker: MaxManifestSize).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
TOO_DEEP = "JSON nested too deeply to be a manifest"


class NotAManifest(ValueError):
    """The bytes are not a manifest a client could use."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Optional[str] = None  # "linux/arm64/v8" for index entries that name one
    artifact_type: Optional[str] = None
    annotations: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    size: int
    body: bytes
    children: Tuple[Descriptor, ...] = ()  # index entries
    config: Optional[Descriptor] = None
    layers: Tuple[Descriptor, ...] = ()
    subject: Optional[str] = None  # digest of the manifest this one refers to
    artifact_type: Optional[str] = None
    annotations: dict = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def referenced_blobs(self) -> Tuple[Descriptor, ...]:
        return ((self.config,) if self.config else ()) + self.layers


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse(body: bytes) -> Manifest:
    """Parse stored manifest bytes; raise NotAManifest with a reason a person can act on."""
    if len(body) > MAX_MANIFEST_SIZE:
        raise NotAManifest(f"{len(body)} bytes is over containerd's 4 MiB manifest limit")
    try:
        document = json.loads(body)
    except RecursionError:
        # Valid JSON nested past Python's recursion limit: no manifest is built like that.
        raise NotAManifest(TOO_DEEP) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise NotAManifest(f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise NotAManifest("not a JSON object")
    media_type = media_type_of(document)
    try:
        children = tuple(_descriptor(d) for d in document.get("manifests") or ())
        config = _descriptor(document["config"]) if isinstance(document.get("config"), dict) else None
        layers = tuple(_descriptor(d) for d in document.get("layers") or ())
        subject = document.get("subject")
        subject_digest = subject.get("digest") if isinstance(subject, dict) else None
    except (TypeError, KeyError, ValueError, AttributeError, RecursionError) as error:
        raise NotAManifest(f"malformed descriptor ({type(error).__name__}: {ascii(str(error))[1:-1][:200]})") from None
    return Manifest(
        media_type=media_type,
        digest=sha256_digest(body),
        size=len(body),
        body=body,
        children=children,
        config=config,
        layers=layers,
        subject=subject_digest if isinstance(subject_digest, str) else None,
        artifact_type=document.get("artifactType") if isinstance(document.get("artifactType"), str) else None,
        annotations=_annotations(document),
    )


def media_type_of(document: dict) -> str:
    """The declared `mediaType`, or (it is optional in OCI) the type the document's shape implies."""
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        # It becomes the Content-Type header as it is: it must be a media type (RFC 6838),
        # which also keeps out CR, LF and anything that is not latin-1.
        if not MEDIA_TYPE_RE.fullmatch(declared):
            raise NotAManifest(f"mediaType {ascii(declared)[:100]} is not a media type (type/subtype)")
        return declared
    if document.get("schemaVersion") == 1:
        return DOCKER_V1_SIGNED
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if isinstance(document.get("config"), dict) and isinstance(document.get("layers"), list):
        return OCI_MANIFEST
    raise NotAManifest("no mediaType, and neither a `manifests` list nor `config` and `layers`")


def _descriptor(raw: dict) -> Descriptor:
    if not isinstance(raw, dict):
        raise TypeError("descriptor is not an object")
    digest, size = raw["digest"], raw["size"]
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
        raise ValueError("descriptor needs a string digest and a non-negative size")
    platform = raw.get("platform")
    platform_text = None
    if isinstance(platform, dict) and platform.get("os") and platform.get("architecture"):
        platform_text = "/".join(
            p for p in (platform["os"], platform["architecture"], platform.get("variant")) if isinstance(p, str) and p
        )
    return Descriptor(
        media_type=raw.get("mediaType") if isinstance(raw.get("mediaType"), str) else "",
        digest=digest,
        size=size,
        platform=platform_text,
        artifact_type=raw.get("artifactType") if isinstance(raw.get("artifactType"), str) else None,
        annotations=_annotations(raw),
    )


def _annotations(document: dict) -> dict:
    """String annotations only (OCI: map of string to string); anything else is dropped, so a
    value nested thousands deep can never reach a JSON answer."""
    annotations = document.get("annotations")
    if not isinstance(annotations, dict):
        return {}
    return {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}
