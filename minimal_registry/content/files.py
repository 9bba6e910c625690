"""A source's files by their relative name: a directory on disk, or a staged archive.

The readers (`ocilayout`, `dockerarchive`, `sources`) only ever ask "the file called X",
so they work the same on a directory the operator gave and on an archive unpacked for them.
"""

import json
from pathlib import Path
from typing import Optional

from minimal_registry.content.archive import Entry, StagedArchive
from minimal_registry.fatal import Fatal

MAX_JSON = 64 * 1024 * 1024  # index.json / manifest.json of even a huge archive is far smaller


class SourceFiles:
    def __init__(self, label: str, directory: Optional[Path] = None, staged: Optional[StagedArchive] = None):
        self.label = label
        self._directory = directory
        self._staged = staged

    def lookup(self, name: str) -> Optional[Entry]:
        if self._staged is not None:
            return self._staged.lookup(name)
        if name.startswith("/") or ".." in name.split("/"):
            return None
        path = self._directory / name
        try:
            if not path.is_file():
                return None
            return Entry(path, path.stat().st_size)
        except OSError:
            return None

    def exists(self, name: str) -> bool:
        return self.lookup(name) is not None

    def read_bytes(self, name: str, limit: int = MAX_JSON) -> bytes:
        entry = self.lookup(name)
        if entry is None:
            raise Fatal(f"{self.label}: {name} is missing", "the source is incomplete")
        if entry.size > limit:
            raise Fatal(f"{self.label}: {name} is {entry.size} bytes, too big to be what it claims",
                        "check the source")
        return entry.path.read_bytes()

    def read_json(self, name: str):
        try:
            return json.loads(self.read_bytes(name))
        except RecursionError:
            raise Fatal(f"{self.label}: {name} is JSON nested too deeply to be what it claims",
                        "the source is damaged") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise Fatal(f"{self.label}: {name} is not JSON ({error})", "the source is damaged") from None
