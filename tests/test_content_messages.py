"""What the content tools say about a tree of one image: counts in the singular where there
is one, and no speed figure where too little was hashed for it to mean anything."""

import pytest

import imagetree
from contentsupport import mr

from minimal_registry.content import verify as verify_module


@pytest.fixture
def one_image(tmp_path):
    """One repository, one tag, one manifest; an index of one child adds a second manifest."""
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    builder.image("library/hello", "latest", files={"hello.txt": b"hello\n"})
    return builder.root


def test_verify_of_one_image_counts_in_the_singular_and_shows_no_speed(capsys, one_image):
    result = mr(capsys, "verify", "-d", str(one_image))
    assert result.code == 0, result.out
    assert "verify: 1 repository, 1 tag, 1 manifest, 2 blobs (" in result.out
    assert "/s" not in result.out  # a few hundred bytes hashed say nothing about the disk


def test_verify_shows_the_speed_once_enough_was_hashed(capsys, one_image, monkeypatch):
    # The threshold is what makes a figure meaningful; lowered here so a tiny tree passes it.
    monkeypatch.setattr(verify_module, "RATE_MIN_BYTES", 0)
    monkeypatch.setattr(verify_module, "RATE_MIN_SECONDS", 0)
    result = mr(capsys, "verify", "-d", str(one_image))
    assert ", hashed at " in result.out and "/s: no problems" in result.out


def test_ls_of_one_image_counts_in_the_singular(capsys, one_image):
    result = mr(capsys, "ls", "-d", str(one_image))
    assert result.code == 0
    assert "\n1 repository, 1 tag, 2 blobs, " in result.out


def test_import_rm_and_prune_of_one_image_count_in_the_singular(capsys, one_image, tmp_path):
    tree = tmp_path / "tree"
    imported = mr(capsys, "import", str(one_image), "-d", str(tree))
    assert imported.code == 0, imported
    assert "2 new blobs, 1 new manifest)" in imported.out

    removed = mr(capsys, "rm", "-d", str(tree), "library/hello:latest")
    assert removed.code == 0, removed
    assert "rm: 1 removed, 0 not in the tree, 0 kept" in removed.out

    pruned = mr(capsys, "prune", "-d", str(tree))
    assert pruned.code == 0, pruned
    assert "prune: 1 manifest and 2 blobs, " in pruned.out
    assert ", 1 empty repository removed" in pruned.out
