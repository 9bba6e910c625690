"""The sample tree the README serves: `examples/sample-registry`, a few KB, committed.

Regenerate it (the builder is deterministic, so the bytes only change when this file does):

    python3 tests/sample_tree.py examples/sample-registry
"""

import os
import shutil
import sys
from pathlib import Path

from imagetree import TreeBuilder

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "sample-registry"
README = b"""Hello from minimal-registry.

This image was served from a directory, read-only, by minimal-registry.
"""


def build_sample_tree(root: Path):
    """library/hello:latest (and :1.0), an OCI index for linux/amd64 and linux/arm64."""
    builder = TreeBuilder(root)
    children = tuple(
        builder.image("library/hello", platform=platform, files={"hello.txt": README, "etc/hello-platform": platform.encode() + b"\n"})
        for platform in ("linux/amd64", "linux/arm64/v8")
    )
    index = builder.index("library/hello", "latest", children)
    os.symlink(index.digest, builder.repository_dir("library/hello", None) / "manifests" / "1.0")
    return index


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_DIR
    shutil.rmtree(target, ignore_errors=True)
    print(build_sample_tree(target).digest)
