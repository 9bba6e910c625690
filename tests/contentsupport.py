"""Helpers for the content-tool tests (no tests here): OCI layouts, docker-save archives and
tars built from `imagetree` images, and the command line run in-process or as a process."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import imagetree
from serverproc import command_env, registry_command

from minimal_registry import cli


@dataclass
class Result:
    code: int
    out: str
    err: str


def mr(capsys, *argv: str) -> Result:
    """`minimal-registry ARGV` in this process (fast); output captured."""
    capsys.readouterr()
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def mr_process(*argv: str, env: Optional[dict] = None, timeout: float = 120) -> Result:
    """`minimal-registry ARGV` as a separate process: real exit code, real stderr."""
    done = subprocess.run(registry_command() + list(argv), capture_output=True, text=True,
                          env=command_env(env), timeout=timeout, stdin=subprocess.DEVNULL)
    return Result(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.code != 0, result
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one error line, got:\n{result.err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# ----- sources made from images in a tree ---------------------------------------------------

def _manifest_bytes(tree: Path, item) -> bytes:
    return item.data


def _blob_bytes(tree: Path, digest: str) -> bytes:
    return (tree / "blobs" / digest).read_bytes()


def oci_layout(tree: Path, destination: Path, items: Sequence, annotations: Sequence[Optional[dict]],
               skip: Iterable[str] = ()) -> Path:
    """An OCI image layout holding `items` (imagetree Images/Indexes), one index.json entry each.

    `skip`: digests to leave out (a platform image, a layer) to make an incomplete layout.
    """
    skip = set(skip)
    blobs = destination / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (destination / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(digest: str, data: bytes) -> None:
        if digest not in skip:
            (blobs / digest.split(":", 1)[1]).write_bytes(data)

    def add(item) -> None:
        put(item.digest, item.data)
        if isinstance(item, imagetree.Index):
            for child in item.children:
                if child.digest not in skip:
                    add(child)
        else:
            for blob in item.blobs:
                put(blob.digest, _blob_bytes(tree, blob.digest))

    entries = []
    for item, annotation in zip(items, annotations):
        add(item)
        entry = {"mediaType": item.media_type, "digest": item.digest, "size": item.size}
        if annotation:
            entry["annotations"] = annotation
        entries.append(entry)
    (destination / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return destination


def containerd_name(reference: str) -> dict:
    return {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": reference.rsplit(":", 1)[1]}


def docker_save_dir(tree: Path, destination: Path, images: Sequence, repo_tags: Sequence[List[str]],
                    layer_tars: Dict[str, bytes]) -> Path:
    """A `docker save` layout: manifest.json, <config hex>.json, <n>/layer.tar (uncompressed).

    `layer_tars` maps each image's layer digest to its uncompressed tar (what docker stores).
    """
    destination.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, (image, tags) in enumerate(zip(images, repo_tags)):
        config_name = image.config.digest.split(":", 1)[1] + ".json"
        (destination / config_name).write_bytes(_blob_bytes(tree, image.config.digest))
        layers = []
        for index, layer in enumerate(image.layers):
            name = f"{number}-{index}/layer.tar"
            (destination / name).parent.mkdir(exist_ok=True)
            (destination / name).write_bytes(layer_tars[layer.digest])
            layers.append(name)
        entries.append({"Config": config_name, "RepoTags": tags, "Layers": layers})
    (destination / "manifest.json").write_text(json.dumps(entries))
    return destination


def tar_directory(source: Path, archive: Path, compression: str = "") -> Path:
    """Tar `source`'s contents (names relative to it); compression '', 'gz' or 'zst'."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
    data = buffer.getvalue()
    if compression == "gz":
        import gzip
        data = gzip.compress(data, mtime=0)
    elif compression == "zst":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    archive.write_bytes(data)
    return archive


def snapshot(tree: Path) -> Dict[str, tuple]:
    """Every entry under `tree`: (kind, inode, mtime_ns, size, link target) by relative path."""
    state = {}
    for directory, subdirs, files in os.walk(tree):
        for name in subdirs + files:
            path = Path(directory) / name
            st = os.lstat(path)
            target = os.readlink(path) if path.is_symlink() else None
            state[str(path.relative_to(tree))] = (st.st_mode >> 12, st.st_ino, st.st_mtime_ns, st.st_size, target)
    return state


def copy_tree(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, symlinks=True)
    return destination


PYTHON = sys.executable
