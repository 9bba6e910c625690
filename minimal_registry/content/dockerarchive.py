"""Turn a `docker save` archive (`manifest.json`, config JSON, layer tars) into schema2 images.

A Docker-only archive keeps no registry manifest, so one is made: a Docker schema2 manifest
whose config is the archive's config file and whose layers are the archive's layer files, as
they are (uncompressed tars, usually), each typed by its first bytes. The digests therefore
differ from the registry the image came from, but the layer contents and the image config
(and so the image ID and every `diff_id`) are the same. Archives that also hold an OCI
`index.json` never come here: that side keeps the upstream digests.
"""

import json
from typing import Dict, List

from minimal_registry import manifest as manifests
from minimal_registry.content import hashing, jsonread, names
from minimal_registry.content.entry import Entry
from minimal_registry.content.files import NotRegular, SourceFiles, open_regular, printable
from minimal_registry.content.pool import Pool, Root
from minimal_registry.fatal import Fatal

MANIFEST_JSON = "manifest.json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MAX_CONFIG = 16 * 1024 * 1024


def is_docker_archive(files: SourceFiles) -> bool:
    """A `manifest.json` (a skopeo `dir:` one is recognised before this is asked): a broken
    one is then reported for what it is, not as "no known layout"."""
    return files.exists(MANIFEST_JSON)


def read(files: SourceFiles, pool: Pool) -> None:
    entries = jsonread.read_json(files, MANIFEST_JSON)
    if not isinstance(entries, list) or not entries:
        raise Fatal(f"{files.label}: {MANIFEST_JSON} lists no images", "this is not a docker-save archive")
    layer_files: Dict[str, Entry] = {}
    pool.add_store(layer_files.get)
    described: Dict[str, dict] = {}  # layer file name -> its descriptor: each file hashed once
    for position, entry in enumerate(entries):
        where = f"{files.label}: {MANIFEST_JSON} entry {position}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                or not isinstance(entry.get("Layers"), list):
            raise Fatal(f"{where} has no Config and Layers", "this is not a docker-save archive")
        config = files.read_bytes(entry["Config"], limit=MAX_CONFIG)
        config_where = f"{files.label}: {printable(entry['Config'])}"
        if not isinstance(jsonread.loads(config, config_where), dict):
            raise Fatal(f"{config_where} is not a JSON object, so not an image config",
                        "this is not a docker-save archive, or it is damaged")
        config_digest = pool.add_bytes(config)
        layers = []
        for name in entry["Layers"]:
            if not isinstance(name, str):
                raise Fatal(f"{where} lists a layer that is not a file name", "this is not a docker-save archive")
            if name not in described:  # images share layers, and a list may repeat one
                described[name] = _layer(files, layer_files, name, where)
            layers.append(described[name])
        document = {
            "schemaVersion": 2,
            "mediaType": manifests.DOCKER_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": config_digest},
            "layers": layers,
        }
        body = json.dumps(document, indent=3).encode()
        digest = pool.add_bytes(body)
        image_names: List[names.ImageName] = []
        repo_tags = entry.get("RepoTags") or ()
        if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
            raise Fatal(f"{where} has RepoTags that are not a list of names", "give --name NAME --tag TAG")
        for repo_tag in repo_tags:
            try:
                image_names.append(names.parse(repo_tag))
            except ValueError as problem:
                raise Fatal(f"{where} has a bad RepoTag {repo_tag!r}: {problem}",
                            "give --name NAME --tag TAG") from None
        pool.add_root(Root(digest=digest, source=files.label, names=image_names, size=len(body)))


def _layer(files: SourceFiles, layer_files: Dict[str, Entry], name: str, where: str) -> dict:
    entry = files.lookup(name)
    if entry is None:
        raise Fatal(f"{where}: layer {printable(name)} is missing from the archive", "the archive is incomplete")
    try:
        with open_regular(entry.path) as reader:
            magic = reader.read(4)
            reader.seek(0)
            digest, size = entry.digest, entry.size
            if digest is None:  # a directory source: hash it now, the copy checks it again
                digest, size = hashing.hash_open_file(reader)
    except NotRegular as problem:
        raise Fatal(f"{where}: layer {printable(name)} is {problem}, not a regular file", "check the source") from None
    layer_files[digest] = Entry(entry.path, size, digest, entry.owned)
    return {"mediaType": _layer_type(magic), "size": size, "digest": digest}


def _layer_type(magic: bytes) -> str:
    if magic.startswith(b"\x1f\x8b"):
        return LAYER_GZIP
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return LAYER_ZSTD
    return LAYER_TAR
