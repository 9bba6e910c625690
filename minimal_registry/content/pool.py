"""Everything the sources hold, by digest, and the images they name (the roots).

A source adds a *store* (a function from digest to a file on disk: `blobs/sha256/<hex>` in an
OCI layout, `<hex>` in a skopeo `dir:`), bytes it made itself (a manifest converted from a
Docker archive), and *roots*: the top-level manifests its index or `manifest.json` names.
Nothing is trusted: a blob's digest is checked when it is copied or moved into the tree, a
manifest's when it is read here.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

from minimal_registry import manifest as manifests
from minimal_registry.content import jsonread
from minimal_registry.content.entry import Entry
from minimal_registry.content.names import ImageName
from minimal_registry.fatal import Fatal

Store = Callable[[str], Optional[Entry]]
# Every manifest read is kept (parsed and as bytes) until the import ends: each is at most
# 4 MiB, and all of them together at most this. The K3s airgap set's add up to well under 1 MiB.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class MissingContent(Fatal):
    """Something a manifest references is in neither the sources nor the tree."""

    EXIT_CODE = 3

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint or "pull the image again, or give the source that holds it",
                         exit_code=self.EXIT_CODE)


@dataclass
class Root:
    digest: str
    source: str  # how to name the source in a message
    names: List[ImageName] = field(default_factory=list)
    bare_tags: List[str] = field(default_factory=list)  # a tag with no repository name
    size: Optional[int] = None  # from the descriptor that named it, when there was one

    @property
    def named(self) -> bool:
        return bool(self.names)


class Pool:
    def __init__(self):
        self._stores: List[Store] = []
        self._data: Dict[str, bytes] = {}
        self._manifests: Dict[str, manifests.Manifest] = {}
        self._manifest_bytes = 0
        self.roots: List[Root] = []

    # ----- filling ---------------------------------------------------------------------

    def add_store(self, store: Store) -> None:
        self._stores.append(store)

    def add_bytes(self, data: bytes) -> str:
        digest = manifests.sha256_digest(data)
        self._data[digest] = data
        return digest

    def add_root(self, root: Root) -> None:
        self.roots.append(root)

    # ----- reading ---------------------------------------------------------------------

    def find(self, digest: str) -> Union[Entry, bytes, None]:
        if digest in self._data:
            return self._data[digest]
        for store in self._stores:
            entry = store(digest)
            if entry is not None:
                return entry
        return None

    def size(self, digest: str) -> Optional[int]:
        found = self.find(digest)
        if found is None:
            return None
        return len(found) if isinstance(found, bytes) else found.size

    def manifest(self, digest: str, where: str) -> Optional[manifests.Manifest]:
        """The parsed manifest `digest`, or None when no source has it; Fatal when it is bad."""
        if digest in self._manifests:
            return self._manifests[digest]
        found = self.find(digest)
        if found is None:
            return None
        if isinstance(found, bytes):
            body = found
        else:
            if found.size > manifests.MAX_MANIFEST_SIZE:
                raise Fatal(f"{where}: manifest {digest} is {found.size} bytes, over containerd's 4 MiB limit",
                            "this is not an image manifest; check the source")
            body = jsonread.read_document(found.path, f"{where}: manifest {digest}")
        actual = manifests.sha256_digest(body)
        if actual != digest:
            raise Fatal(f"{where}: manifest {digest} does not match its digest (its bytes hash to {actual})",
                        "the source is damaged; pull or copy it again")
        try:
            parsed = manifests.parse(body)
        except manifests.NotAManifest as problem:
            raise Fatal(f"{where}: {digest} is not a manifest: {problem}", "check the source") from None
        self._manifest_bytes += len(body)
        if self._manifest_bytes > MAX_MANIFEST_BYTES:
            raise Fatal(f"{where}: the sources' manifests add up to more than {MAX_MANIFEST_BYTES} bytes",
                        "no real set of images comes near that; check where the source came from")
        self._manifests[digest] = parsed
        return parsed
