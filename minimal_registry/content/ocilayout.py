"""Read an OCI image layout: `oci-layout`, `index.json` and `blobs/<algorithm>/<hex>`.

What `crane pull --format=oci`, `skopeo copy ... oci:DIR`, `ctr images export` and recent
`docker save` write. Each `index.json` entry is a root; its name comes from its annotations.
Everything else is reached by walking the manifests' JSON later, never by guessing from blob
contents.
"""

from typing import Optional

from minimal_registry import reference
from minimal_registry.content import jsonread, names
from minimal_registry.content.entry import Entry
from minimal_registry.content.files import SourceFiles
from minimal_registry.content.pool import Pool, Root
from minimal_registry.fatal import Fatal

INDEX = "index.json"
LAYOUT_MARKER = "oci-layout"


def is_layout(files: SourceFiles) -> bool:
    return files.exists(INDEX)


def read(files: SourceFiles, pool: Pool) -> None:
    index = jsonread.read_json(files, INDEX)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise Fatal(f"{files.label}: {INDEX} has no `manifests` list", "this is not an OCI image layout")

    def store(digest: str) -> Optional[Entry]:
        if not reference.is_digest(digest):
            return None
        return files.lookup(f"blobs/sha256/{digest[len('sha256:'):]}")

    pool.add_store(store)
    for position, descriptor in enumerate(index["manifests"]):
        where = f"{files.label}: {INDEX} entry {position}"
        if not isinstance(descriptor, dict) or not reference.is_digest(str(descriptor.get("digest", ""))):
            raise Fatal(f"{where} has no sha256 digest", "this is not an OCI image layout")
        annotations = descriptor.get("annotations") if isinstance(descriptor.get("annotations"), dict) else {}
        try:
            full, bare_tag = names.from_annotations(annotations)
        except ValueError as problem:
            raise Fatal(f"{where} names an image badly: {problem}", "give --name NAME --tag TAG") from None
        size = descriptor.get("size")
        pool.add_root(Root(
            digest=descriptor["digest"],
            source=files.label,
            names=[full] if full else [],
            bare_tags=[bare_tag] if bare_tag else [],
            size=size if isinstance(size, int) else None,
        ))
