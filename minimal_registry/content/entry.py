"""A regular file a source offers to an import: one shape for every kind of source.

Archives (`archive`), directories (`files`) and content trees (`treesource`) all hand the
readers and the placer their files as Entries, so those need not know where a file came from.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Entry:
    """One regular file: where it is on disk, its size, and its digest when already known."""

    path: Path
    size: int
    digest: Optional[str] = None  # `sha256:<hex>` when hashed while unpacking
    owned: bool = False  # a staged copy the importer may rename away
