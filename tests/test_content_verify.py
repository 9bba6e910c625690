"""`minimal-registry verify`: a clean tree passes; each kind of damage is caught, with its path."""

import os
from pathlib import Path

import pytest

import imagetree
from contentsupport import mr, mr_process

from minimal_registry.content import progress


@pytest.fixture
def tree(tmp_path):
    return imagetree.build_standard_tree(tmp_path / "registry", with_big=False)


def verify(capsys, root: Path, *extra: str):
    return mr(capsys, "verify", "-d", str(root), *extra)


def problems(result):
    return [line for line in result.out.splitlines() if line.startswith("PROBLEM")]


def test_a_clean_tree_passes(capsys, tree):
    result = verify(capsys, tree.root)
    assert result.code == 0, result.out
    assert problems(result) == []
    assert "8 repositories, 8 tags" in result.out and "no problems" in result.out


def test_one_flipped_byte_in_a_blob_is_caught(capsys, tree):
    blob = tree.root / "blobs" / tree.hello.layers[0].digest
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    result = verify(capsys, tree.root)
    assert result.code == 1
    [line] = problems(result)
    assert str(blob) in line and "hashes to" in line
    # Same size: only hashing can see it.
    assert verify(capsys, tree.root, "--fast").code == 0


def test_a_truncated_blob_is_caught_even_with_fast(capsys, tree):
    blob = tree.root / "blobs" / tree.deep.layers[0].digest
    blob.write_bytes(blob.read_bytes()[:-10])
    for extra in ((), ("--fast",)):
        result = verify(capsys, tree.root, *extra)
        assert result.code == 1
        assert any(str(blob) in line and "truncated" in line for line in problems(result)), result.out


def test_a_missing_blob_is_caught(capsys, tree):
    config = tree.root / "blobs" / tree.plain_tag.config.digest
    config.unlink()
    result = verify(capsys, tree.root, "--fast")
    assert result.code == 1
    [line] = problems(result)
    assert str(config) in line and "missing" in line and "plain/tag/manifests" in line


def test_a_dangling_tag_is_caught(capsys, tree):
    manifests = tree.root / "library/hello/manifests"
    os.unlink(manifests / tree.hello.digest)  # the tag symlink now points at nothing
    result = verify(capsys, tree.root)
    assert result.code == 1
    [line] = problems(result)
    assert str(manifests / "latest") in line and "dangling tag" in line


def test_a_manifest_that_is_not_json_is_caught(capsys, tree):
    stored = tree.root / "a/b/c/d/manifests" / tree.deep.digest
    stored.write_bytes(b"<html>not a manifest</html>")
    result = verify(capsys, tree.root, "--fast")
    assert result.code == 1
    assert any(str(stored) in line and "not JSON" in line for line in problems(result)), result.out


def test_a_manifest_whose_bytes_differ_from_its_name_is_caught(capsys, tree):
    stored = tree.root / "library/hello/manifests" / tree.hello.digest
    stored.write_bytes(stored.read_bytes().replace(b"schemaVersion", b"schemaVersioN"))
    result = verify(capsys, tree.root, "--fast")
    assert result.code == 1
    assert any(str(stored) in line and "hashes to" in line for line in problems(result))


def test_an_index_pulled_for_fewer_platforms_is_a_note_not_a_problem(capsys, tree):
    arm64 = tree.multiarch.child("linux/arm64/v8")
    os.unlink(tree.root / "rancher/mirrored-pause/manifests" / arm64.digest)
    result = verify(capsys, tree.root)
    assert result.code == 0, result.out
    assert "pulled for fewer platforms): linux/arm64/v8" in result.out
    assert "referenced by no manifest" in result.out  # arm64's blobs are now unused

    os.unlink(tree.root / "rancher/mirrored-pause/manifests" / tree.multiarch.child("linux/amd64").digest)
    result = verify(capsys, tree.root)
    assert result.code == 1 and "none of the index's manifests" in result.out


def test_leftovers_of_an_interrupted_import_are_notes(capsys, tree):
    (tree.root / "blobs" / ".tmp-sha256:abc-1-2").write_bytes(b"partial")
    (tree.root / ".import-1-abcd").mkdir()
    result = verify(capsys, tree.root)
    assert result.code == 0
    assert result.out.count("interrupted import") == 2


def test_a_dangling_blobs_link_is_caught(capsys, tree):
    link = tree.root / "rancher/blobs"
    link.unlink()
    os.symlink("../nowhere", link)
    result = verify(capsys, tree.root, "--fast")
    assert result.code == 1 and any(str(link) in line for line in problems(result))


def test_quiet_prints_only_problems_and_the_summary(capsys, tree):
    (tree.root / "blobs" / "README").write_text("stray")
    result = verify(capsys, tree.root, "-q")
    assert result.code == 0
    assert result.out.strip().splitlines() == [result.out.strip().splitlines()[-1]]


def test_unusable_arguments_exit_2(tmp_path):
    result = mr_process("verify", "-d", str(tmp_path / "absent"))
    assert result.code == 2 and "does not exist" in result.err and "Traceback" not in result.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mr_process("verify", "-d", str(empty)).code == 1


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = progress.Progress("verify", 4 << 20, stream=screen)
    bar.add(1 << 20)
    bar.tick(force=True)
    bar.add(3 << 20)
    bar.finish()
    assert "\r" in screen.getvalue() and "[######" in screen.getvalue() and "100%" in screen.getvalue()

    log = io.StringIO()
    plain = progress.Progress("verify", 4 << 20, stream=log)
    plain.add(2 << 20)
    plain.tick(force=True)
    plain.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue() and " 50%" in lines[0]
