"""`minimal-registry import` of a content tree (a directory in our layout, or the media's
registry.tar.gz / .tar.zst): the merge install-node.sh does, with every import guarantee."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import imagetree
from contentsupport import copy_tree, mr, snapshot

from minimal_registry.content import place


def tags_of(capsys, tree: Path) -> dict:
    """`ls --json` as {"repository:tag": digest}."""
    listed = mr(capsys, "ls", "--json", "-d", str(tree))
    assert listed.code == 0, listed
    document = json.loads(listed.out)
    return {f"{r['repository']}:{t['tag']}": t["digest"] for r in document["repositories"] for t in r["tags"]}


def assert_verifies(capsys, tree: Path) -> None:
    checked = mr(capsys, "verify", "-q", "-d", str(tree))
    assert checked.code == 0, checked


def media_archive(tree: Path, archive: Path, compression: str) -> Path:
    """The tree packed as make-airgap-media.sh packs it: under `registry/`, tags as symlinks."""
    compress = {"gz": ["gzip", "-n"], "zst": ["zstd", "-q"]}[compression]
    tar = subprocess.run(["tar", "-c", "-f", "-", "-C", str(tree), "--sort=name",
                          "--transform=s,^\\.,registry,S", "."], check=True, capture_output=True).stdout
    archive.write_bytes(subprocess.run(compress, input=tar, check=True, capture_output=True).stdout)
    return archive


def test_a_tree_directory_imports_every_tag_where_it_was(capsys, small_tree, tmp_path):
    node = tmp_path / "node"
    result = mr(capsys, "import", "-d", str(node), str(small_tree.root))
    assert result.code == 0, result
    assert tags_of(capsys, node) == tags_of(capsys, small_tree.root)
    # The namespaced copy stays under docker.io/, the other one outside it.
    assert (node / "docker.io/library/busybox/manifests/latest").is_symlink()
    assert os.readlink(node / "library/busybox/manifests/latest") == small_tree.unnamespaced_busybox.digest
    assert_verifies(capsys, node)


def test_keep_domain_does_not_move_a_tree_s_images(capsys, small_tree, tmp_path):
    node = tmp_path / "node"
    assert mr(capsys, "import", "--keep-domain", "-d", str(node), str(small_tree.root)).code == 0
    assert tags_of(capsys, node) == tags_of(capsys, small_tree.root)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_the_media_archive_imports_like_the_tree(capsys, small_tree, tmp_path, compression):
    archive = media_archive(small_tree.root, tmp_path / f"registry.tar.{compression}", compression)
    node = tmp_path / "node"
    result = mr(capsys, "import", "-q", "-d", str(node), str(archive))
    assert result.code == 0, result
    assert tags_of(capsys, node) == tags_of(capsys, small_tree.root)
    assert_verifies(capsys, node)
    assert not [p for p in os.listdir(node) if p.startswith(".")], "staging left behind"


def test_a_rerun_changes_nothing(capsys, small_tree, tmp_path):
    archive = media_archive(small_tree.root, tmp_path / "registry.tar.gz", "gz")
    node = tmp_path / "node"
    assert mr(capsys, "import", "-d", str(node), str(archive)).code == 0
    before = snapshot(node)
    again = mr(capsys, "import", "-d", str(node), str(archive))
    assert again.code == 0, again
    assert snapshot(node) == before
    assert "imported" not in again.out and again.out.count("unchanged") == len(small_tree.tagged_items())


def test_merge_keeps_what_the_source_lacks_and_repoints_what_it_moved(capsys, tmp_path):
    old = imagetree.TreeBuilder(tmp_path / "old")
    old.image("rancher/mirrored-pause", "3.6", files={"pause": b"old\n"})
    app = old.image("example/app", "1.0", files={"app": b"the operator's own image\n"})
    new = imagetree.TreeBuilder(tmp_path / "new")
    moved = new.image("rancher/mirrored-pause", "3.6", files={"pause": b"new\n"})
    node = copy_tree(old.root, tmp_path / "node")

    result = mr(capsys, "import", "-d", str(node), str(new.root))
    assert result.code == 0, result
    assert "tag moved" in result.out
    tags = tags_of(capsys, node)
    assert tags["rancher/mirrored-pause:3.6"] == moved.digest
    assert tags["example/app:1.0"] == app.digest
    assert_verifies(capsys, node)


def test_a_lost_or_truncated_blob_is_restored_from_the_source(capsys, small_tree, tmp_path):
    node = copy_tree(small_tree.root, tmp_path / "node")
    lost, truncated = small_tree.hello.layers[0], small_tree.deep.layers[0]
    (node / "blobs" / lost.digest).unlink()
    with open(node / "blobs" / truncated.digest, "r+b") as handle:
        handle.truncate(truncated.size // 2)
    assert mr(capsys, "verify", "-q", "-d", str(node)).code == 1

    result = mr(capsys, "import", "-d", str(node), str(small_tree.root))
    assert result.code == 0, result
    assert_verifies(capsys, node)


def test_a_blob_damaged_in_place_is_replaced(capsys, small_tree, tmp_path):
    """Same size, other bytes: only a hash tells (issue 8 item 11, import's part)."""
    node = copy_tree(small_tree.root, tmp_path / "node")
    damaged = node / "blobs" / small_tree.hello.config.digest
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert mr(capsys, "verify", "-q", "-d", str(node)).code == 1

    result = mr(capsys, "import", "-d", str(node), str(small_tree.root))
    assert result.code == 0, result
    assert_verifies(capsys, node)


def test_an_interrupted_import_leaves_a_valid_tree(capsys, small_tree, tmp_path, monkeypatch):
    node = tmp_path / "node"
    calls = []
    real_blob = place.Placer.blob

    def blob_then_interrupt(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_blob(self, *args, **kwargs)

    archive = media_archive(small_tree.root, tmp_path / "registry.tar.gz", "gz")
    monkeypatch.setattr(place.Placer, "blob", blob_then_interrupt)
    assert mr(capsys, "import", "-q", "-d", str(node), str(archive)).code == 130
    monkeypatch.undo()
    assert [p for p in os.listdir(node) if p.startswith(".")] == []
    # Whatever is tagged is whole; the rest follows on the next run.
    for name, digest in tags_of(capsys, node).items():
        assert digest is not None, name
    verified = mr(capsys, "verify", "-d", str(node))
    assert "PROBLEM" not in verified.out, verified.out
    assert mr(capsys, "import", "-q", "-d", str(node), str(archive)).code == 0
    assert tags_of(capsys, node) == tags_of(capsys, small_tree.root)


def test_a_source_blob_linked_out_of_the_source_tree_is_not_read(capsys, tmp_path):
    source = imagetree.TreeBuilder(tmp_path / "source")
    image = source.image("example/app", "1.0", files={"app": b"x\n"})
    layer = source.root / "blobs" / image.layers[0].digest
    outside = tmp_path / "outside-blob"
    shutil.move(layer, outside)
    os.symlink(outside, layer)
    result = mr(capsys, "import", "-d", str(tmp_path / "node"), str(source.root))
    assert result.code == 3, result
    assert image.layers[0].digest in result.err and "Traceback" not in result.err


@pytest.mark.parametrize("kind", ["link-out", "fifo"])
def test_a_source_tag_that_is_no_manifest_is_refused_in_one_line(capsys, tmp_path, kind):
    source = imagetree.TreeBuilder(tmp_path / "source")
    source.image("example/app", "1.0", files={"app": b"x\n"})
    bad = source.root / "example/app/manifests/latest"
    if kind == "link-out":
        os.symlink("/etc/passwd", bad)
    else:
        os.mkfifo(bad)
    result = mr(capsys, "import", "-d", str(tmp_path / "node"), str(source.root))
    assert result.code == 2, result
    assert "latest: the tag names no manifest" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "node" / "example").exists()
