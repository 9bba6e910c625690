"""Reading a stored manifest: its media type, digest and the descriptors it references.

A manifest is served as its exact bytes; this module only reads them, for the headers
(`Content-Type`, `Docker-Content-Digest`), for `referrers`, and for `verify`.
"""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Tuple

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

# containerd refuses manifests larger than this (remotes/docker: MaxManifestSize).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


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
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise NotAManifest(f"malformed descriptor ({error!r})") from None
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
            str(p) for p in (platform["os"], platform["architecture"], platform.get("variant")) if p
        )
    return Descriptor(
        media_type=str(raw.get("mediaType", "")),
        digest=digest,
        size=size,
        platform=platform_text,
        artifact_type=raw.get("artifactType") if isinstance(raw.get("artifactType"), str) else None,
        annotations=_annotations(raw),
    )


def _annotations(document: dict) -> dict:
    annotations = document.get("annotations")
    return dict(annotations) if isinstance(annotations, dict) else {}
