"""JSON and manifests a source holds, read with a bound on size and on nesting.

Every document a source offers (a raw manifest, `index.json`, a docker `manifest.json`, a
manifest blob) is at most 4 MiB, containerd's manifest limit: nothing a real source writes
comes near it, and a reader that loads a file whole must not be handed gigabytes. Nesting
deeper than Python's parser can follow is said in one line, like any other malformed input.
A manifest's own rules (nesting, its mediaType) are `manifest.parse`'s, the server's.
"""

import json
from pathlib import Path

from minimal_registry import manifest as manifests
from minimal_registry.content import files as source_files
from minimal_registry.fatal import Fatal

MAX_DOCUMENT = manifests.MAX_MANIFEST_SIZE
LIMIT_TEXT = "4 MiB"
TOO_DEEP = manifests.TOO_DEEP


def loads(body: bytes, what: str):
    """The parsed JSON of `body`; Fatal naming `what` when it is not (readable) JSON."""
    try:
        return json.loads(body)
    except RecursionError:
        raise Fatal(f"{what} is {TOO_DEEP}", "the source is damaged or hostile; check where it came from") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise Fatal(f"{what} is not JSON ({error})", "the source is damaged") from None


def read_document(path: Path, what: str) -> bytes:
    """A file's bytes, when it is a regular file of at most 4 MiB (checked on the open file)."""
    try:
        with source_files.open_regular(path) as reader:
            data = reader.read(MAX_DOCUMENT + 1)
    except source_files.NotRegular as problem:
        raise Fatal(f"{what} is {problem}, not a regular file", "check the source") from None
    if len(data) > MAX_DOCUMENT:
        raise Fatal(f"{what} is over the {LIMIT_TEXT} limit of a manifest or index",
                    "no real image source holds one that big; check the source")
    return data


def read_json(files: "source_files.SourceFiles", name: str):
    entry = files.lookup(name)
    if entry is None:
        raise Fatal(f"{files.label}: {name} is missing", "the source is incomplete")
    where = f"{files.label}: {name}"
    if entry.size > MAX_DOCUMENT:
        raise Fatal(f"{where} is {entry.size} bytes, over the {LIMIT_TEXT} limit of a manifest or index",
                    "no real image source holds one that big; check the source")
    return loads(read_document(entry.path, where), where)
