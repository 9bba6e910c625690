"""Build real, small container images into a content tree, the way the original tool lays them.

    ROOT/
      blobs/sha256:<hex>                    configs and layers (real tars, gzip for normal images)
      [<ns>/]<name>/manifests/sha256:<hex>  manifests and indexes, their exact bytes
      [<ns>/]<name>/manifests/<tag>         symlink -> sha256:<hex> (or a plain copy)
      <level>/blobs -> ../blobs             at every level of [<ns>/]<name>, chaining to ROOT/blobs

Everything is deterministic (fixed mtimes, owners and modes, gzip mtime 0, sorted JSON), so a
tree built twice has the same digests and a test can name them. Stdlib only: the test suite must
not need a registry, a daemon or the network to make its fixtures.
"""

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

# 2020-09-13T12:26:40Z: any fixed instant will do; 0 makes some tools print warnings.
EPOCH = 1_600_000_000
CREATED = "2020-09-13T12:26:40Z"
BIG_LAYER_FILE = "big.bin"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    data: Optional[bytes]  # None for a blob too big to keep in memory: read it from the tree


@dataclass(frozen=True)
class Image:
    name: str
    tag: Optional[str]
    digest: str
    size: int
    media_type: str
    data: bytes
    config: Blob
    layers: Tuple[Blob, ...]
    platform: Optional[str]
    namespace: Optional[str]
    # Path inside the image -> content, what an unpacked rootfs must hold. Excluded from
    # comparison so the dataclass stays hashable.
    files: Dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def blobs(self) -> Tuple[Blob, ...]:
        return (self.config,) + self.layers

    @property
    def repository(self) -> str:
        """`<ns>/<name>`: the directory under ROOT, and the name a client asks for without ?ns=."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class Index:
    name: str
    tag: Optional[str]
    digest: str
    size: int
    media_type: str
    data: bytes
    children: Tuple[Image, ...]
    namespace: Optional[str]

    @property
    def platforms(self) -> Tuple[str, ...]:
        return tuple(child.platform for child in self.children)

    def child(self, platform: str) -> Image:
        for image in self.children:
            if image.platform == platform:
                return image
        raise KeyError(f"{self.name} has no {platform} image (has {', '.join(self.platforms)})")

    @property
    def repository(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


Manifestish = Union[Image, Index]


class Tagged(NamedTuple):
    name: str
    tag: str
    digest: str
    namespace: Optional[str]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def split_platform(platform: str) -> dict:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], not {platform!r}")
    result = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        result["variant"] = parts[2]
    return result


def layer_tar(files: Dict[str, bytes]) -> bytes:
    """A deterministic tar of `files` with their parent directories, root-owned, fixed mtime."""
    directories = set()
    for path in files:
        parts = path.strip("/").split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directories.add("/".join(parts[:depth]))
    entries: List[Tuple[str, Optional[bytes]]] = [(d, None) for d in directories]
    entries += [(p.strip("/"), content) for p, content in files.items()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in sorted(entries):
            info = tarfile.TarInfo(path)
            info.mtime = EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o755 if path.startswith("bin/") else 0o644
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class _PseudoRandomReader:
    """`read(n)` returning a fixed pseudo-random byte stream: big content that does not compress."""

    def __init__(self, seed: str, size: int):
        self._random = random.Random(seed)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._random.randbytes(n)


class TreeBuilder:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)

    # ----- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest

    def write_blob(self, data: bytes, media_type: str) -> Blob:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            _write_atomically(path, data)
        return Blob(digest, len(data), media_type, data)

    def _write_big_layer(self, size: int, seed: str) -> Tuple[Blob, str]:
        """An uncompressed tar holding one `size`-byte file, streamed to disk; (blob, diff_id)."""
        temporary = self.root / "blobs" / f".big-{os.getpid()}.tmp"
        info = tarfile.TarInfo(BIG_LAYER_FILE)
        info.size, info.mtime, info.mode = size, EPOCH, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        with open(temporary, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(info, _PseudoRandomReader(seed, size))
        hasher = hashlib.sha256()
        with open(temporary, "rb") as written:
            for chunk in iter(lambda: written.read(_CHUNK), b""):
                hasher.update(chunk)
        digest = "sha256:" + hasher.hexdigest()
        total = temporary.stat().st_size
        os.replace(temporary, self.blob_path(digest))
        # An uncompressed layer's diff_id is its own digest.
        return Blob(digest, total, OCI_LAYER_TAR, None), digest

    # ----- repositories ------------------------------------------------------------------

    def repository_dir(self, name: str, namespace: Optional[str]) -> Path:
        path = self.root / namespace / name if namespace else self.root / name
        self._link_blobs(path)
        return path

    def _link_blobs(self, repository: Path) -> None:
        """`blobs -> ../blobs` at every level below ROOT, as the original tool made them."""
        relative = repository.relative_to(self.root)
        level = self.root
        for part in relative.parts:
            level = level / part
            level.mkdir(parents=True, exist_ok=True)
            link = level / "blobs"
            if not link.is_symlink():
                os.symlink("../blobs", link)

    def _write_manifest(self, name: str, namespace: Optional[str], tag: Optional[str],
                        data: bytes, tag_as_copy: bool) -> str:
        digest = sha256_digest(data)
        manifests = self.repository_dir(name, namespace) / "manifests"
        manifests.mkdir(parents=True, exist_ok=True)
        stored = manifests / digest
        if not stored.exists():
            _write_atomically(stored, data)
        if tag is not None:
            tag_path = manifests / tag
            if tag_path.is_symlink() or tag_path.exists():
                tag_path.unlink()
            if tag_as_copy:
                _write_atomically(tag_path, data)
            else:
                os.symlink(digest, tag_path)
        return digest

    # ----- images ------------------------------------------------------------------------

    def image(self, name: str, tag: Optional[str] = None, *, platform: str = "linux/amd64",
              files: Optional[Dict[str, bytes]] = None, docker: bool = False,
              omit_media_type: bool = False, layer_bytes: Optional[int] = None,
              namespace: Optional[str] = None, tag_as_copy: bool = False) -> Image:
        """One image manifest with a config and one layer; `tag=None` for an index's child."""
        where = f"{namespace + '/' if namespace else ''}{name}:{tag or '-'}@{platform}"
        files = dict(files) if files is not None else {
            "hello.txt": f"hello from {where}\n".encode(),
        }
        if layer_bytes is not None:
            layer, diff_id = self._write_big_layer(layer_bytes, seed=where)
            if docker:
                layer = Blob(layer.digest, layer.size, DOCKER_LAYER_TAR, None)
            files = {}  # too big to keep; the layer holds BIG_LAYER_FILE
        else:
            tar = layer_tar(files)
            diff_id = sha256_digest(tar)
            layer = self.write_blob(gzip.compress(tar, compresslevel=6, mtime=0),
                                    DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP)
        config_document = {
            "architecture": split_platform(platform)["architecture"],
            "os": split_platform(platform)["os"],
            "created": CREATED,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/hello"],
                "Labels": {"minimal-registry.test": where},
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": CREATED, "created_by": f"tests/imagetree.py {where}"}],
        }
        if "variant" in split_platform(platform):
            config_document["variant"] = split_platform(platform)["variant"]
        config = self.write_blob(canonical_json(config_document), DOCKER_CONFIG if docker else OCI_CONFIG)
        manifest_document = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": _descriptor(config),
            "layers": [_descriptor(layer)],
        }
        media_type = manifest_document["mediaType"]
        if omit_media_type:
            del manifest_document["mediaType"]  # optional in OCI; the server must infer it
        data = canonical_json(manifest_document)
        digest = self._write_manifest(name, namespace, tag, data, tag_as_copy)
        return Image(name=name, tag=tag, digest=digest, size=len(data), media_type=media_type,
                     data=data, config=config, layers=(layer,), platform=platform,
                     namespace=namespace, files=files)

    def index(self, name: str, tag: Optional[str], children: Tuple[Image, ...], *,
              docker: bool = False, namespace: Optional[str] = None,
              tag_as_copy: bool = False) -> Index:
        """An OCI index (or a Docker manifest list) of `children`, built in the same repository."""
        for child in children:
            if (child.name, child.namespace) != (name, namespace):
                raise ValueError(f"child {child.repository} is not in repository {name}")
            if child.platform is None:
                raise ValueError(f"child {child.digest} has no platform")
        media_type = DOCKER_LIST if docker else OCI_INDEX
        document = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": child.media_type, "digest": child.digest, "size": child.size,
                 "platform": split_platform(child.platform)}
                for child in children
            ],
        }
        data = canonical_json(document)
        digest = self._write_manifest(name, namespace, tag, data, tag_as_copy)
        return Index(name=name, tag=tag, digest=digest, size=len(data), media_type=media_type,
                     data=data, children=tuple(children), namespace=namespace)


def _descriptor(blob: Blob) -> dict:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# ----- the standard tree ----------------------------------------------------------------

BIG_LAYER_BYTES = 65 * 1024 * 1024  # over 64 MiB: past any "small file" shortcut in a server


@dataclass(frozen=True)
class StandardTree:
    root: Path
    hello: Image                  # library/hello:latest, OCI, a few KB
    multiarch: Index              # rancher/mirrored-pause:3.6, OCI index amd64 + arm64
    docker_list: Index            # rancher/klipper-helm:v0.8.0, Docker list of schema2 manifests
    deep: Image                   # a/b/c/d:1.0
    big: Optional[Image]          # big/blob:latest, one uncompressed layer over 64 MiB
    plain_tag: Image              # plain/tag:v1, the tag a plain copy of the manifest
    no_media_type: Image          # oci/nomediatype:v1, manifest without `mediaType`
    namespaced: Image             # docker.io/library/busybox:latest, under ROOT/docker.io/
    unnamespaced_busybox: Image   # library/busybox:latest, a different image at ROOT/library/

    def all_tagged(self) -> List[Tagged]:
        """(name, tag, digest, namespace) of every tagged image and index in the tree."""
        return [Tagged(i.name, i.tag, i.digest, i.namespace) for i in self.tagged_items()]

    def tagged_items(self) -> List[Manifestish]:
        items = (getattr(self, name) for name in TAGGED_FIELDS)
        return [item for item in items if item is not None]

    def by_reference(self, name: str, tag: str, namespace: Optional[str] = None) -> Manifestish:
        for item in self.tagged_items():
            if (item.name, item.tag, item.namespace) == (name, tag, namespace):
                return item
        raise KeyError(f"{namespace + '/' if namespace else ''}{name}:{tag}")


# The StandardTree fields holding a tagged image or index: parameter names known before the
# tree exists (pytest collects before session fixtures run).
TAGGED_FIELDS = ("hello", "multiarch", "docker_list", "deep", "big", "plain_tag", "no_media_type",
                 "namespaced", "unnamespaced_busybox")


def build_standard_tree(root: Path, with_big: bool = True) -> StandardTree:
    """Every shape of tree the server must serve, in one ROOT. ~70 MiB with the big blob."""
    builder = TreeBuilder(root)
    hello = builder.image("library/hello", "latest", files={
        "hello.txt": b"hello, air gap\n",
        "etc/motd": b"served by minimal-registry\n",
        # A few KB that compress poorly, so the layer is not trivially small.
        "usr/share/hello/noise.bin": random.Random("hello").randbytes(4096),
    })
    pause = "rancher/mirrored-pause"
    multiarch = builder.index(pause, "3.6", (
        builder.image(pause, platform="linux/amd64", files={"pause": b"pause amd64\n"}),
        builder.image(pause, platform="linux/arm64/v8", files={"pause": b"pause arm64\n"}),
    ))
    helm = "rancher/klipper-helm"
    docker_list = builder.index(helm, "v0.8.0", (
        builder.image(helm, platform="linux/amd64", docker=True,
                      files={"usr/bin/entry": b"#!/bin/sh\necho amd64\n"}),
        builder.image(helm, platform="linux/arm64", docker=True,
                      files={"usr/bin/entry": b"#!/bin/sh\necho arm64\n"}),
    ), docker=True)
    deep = builder.image("a/b/c/d", "1.0", files={"deep.txt": b"four levels down\n"})
    big = builder.image("big/blob", "latest", layer_bytes=BIG_LAYER_BYTES) if with_big else None
    plain_tag = builder.image("plain/tag", "v1", tag_as_copy=True,
                              files={"plain.txt": b"tag stored as a copy\n"})
    no_media_type = builder.image("oci/nomediatype", "v1", omit_media_type=True,
                                  files={"nomediatype.txt": b"mediaType omitted\n"})
    namespaced = builder.image("library/busybox", "latest", namespace="docker.io",
                               files={"which.txt": b"namespaced docker.io copy\n"})
    unnamespaced = builder.image("library/busybox", "latest",
                                 files={"which.txt": b"un-namespaced copy\n"})
    return StandardTree(root=Path(root), hello=hello, multiarch=multiarch, docker_list=docker_list,
                        deep=deep, big=big, plain_tag=plain_tag, no_media_type=no_media_type,
                        namespaced=namespaced, unnamespaced_busybox=unnamespaced)
