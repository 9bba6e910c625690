"""`minimal-registry verify`: a clean tree passes; each kind of damage is caught, with its path."""

import json
import os
import stat
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


# ----- one containment rule with the server; only regular files are ever opened -------------

def test_a_blob_linked_to_a_correct_file_outside_the_tree_is_reported_as_the_server_refuses_it(capsys, tree, tmp_path):
    from wsgicall import app_for, call

    layer = tree.hello.layers[0]
    blob = tree.root / "blobs" / layer.digest
    outside = tmp_path / "elsewhere" / layer.digest
    outside.parent.mkdir()
    os.replace(blob, outside)
    os.symlink(outside, blob)  # the right bytes, but outside the tree

    assert call(app_for(tree.root), "GET", f"/v2/library/hello/blobs/{layer.digest}").status == 404
    for extra in ((), ("--fast",)):
        result = verify(capsys, tree.root, *extra)
        assert result.code == 1, result.out
        [line] = problems(result)
        assert str(blob) in line and "outside the content tree" in line and "the server refuses it" in line


def test_a_fifo_as_a_tag_is_a_problem_not_a_hang(tree):
    tag = tree.root / "library/hello/manifests/latest"
    tag.unlink()
    os.mkfifo(tag)
    for command in (("verify",), ("verify", "--fast"), ("ls",), ("ls", "--json")):
        result = mr_process(*command, "-d", str(tree.root), timeout=20)
        assert "Traceback" not in result.err, result.err
        if command[0] == "verify":
            assert result.code == 1
            assert any(str(tag) in line and "a FIFO" in line for line in problems(result)), result.out
        else:
            assert result.code == 0
            assert "a FIFO" in result.out


def test_a_device_named_like_a_manifest_is_a_problem_never_read(tree):
    device = tree.root / "library/hello/manifests" / ("sha256:" + "e" * 64)
    os.mknod(device, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is: endless bytes
    os.mknod(tree.root / "blobs" / ("sha256:" + "f" * 64), 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    result = mr_process("verify", "-d", str(tree.root), timeout=20)
    assert result.code == 1 and "Traceback" not in result.err
    found = problems(result)
    assert any(str(device) in line and "a character device" in line for line in found), result.out
    assert any("f" * 64 in line and "a character device" in line for line in found), result.out
    listing = mr_process("ls", "-d", str(tree.root), timeout=20)
    assert listing.code == 0 and "Traceback" not in listing.err


@pytest.mark.parametrize("body,why", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"schemaVersion":2,"mediaType":"application/x\\r\\nX: 1","manifests":[]}', "mediaType"),
])
def test_a_manifest_that_parses_but_cannot_be_served_is_one_problem_line(capsys, tree, body, why):
    digest = imagetree.sha256_digest(body)
    manifests = tree.root / "library/hello/manifests"
    (manifests / digest).write_bytes(body)
    os.symlink(digest, manifests / "odd")
    result = mr_process("verify", "--fast", "-d", str(tree.root), timeout=20)
    assert result.code == 1 and "Traceback" not in result.err, result.err
    lines = [line for line in problems(result) if digest in line or "odd" in line]
    assert len(lines) == 1 and why in lines[0] and "not a manifest" in lines[0], result.out
    listing = mr_process("ls", "-d", str(tree.root), "--json", timeout=20)
    assert listing.code == 0 and "Traceback" not in listing.err


def test_a_repository_or_its_manifests_linked_out_of_the_tree_is_reported_and_not_listed(capsys, tree, tmp_path):
    outside = tmp_path / "etc"
    (outside / "manifests").mkdir(parents=True)
    (outside / "passwd").write_text("root:x:0:0\n")
    os.symlink(outside / "manifests", tree.root / "library/hello/manifests-elsewhere")
    (tree.root / "stolen").mkdir()
    os.symlink(outside, tree.root / "stolen/manifests")
    os.symlink(outside, tree.root / "linked")
    result = verify(capsys, tree.root, "--fast")
    assert result.code == 1
    found = problems(result)
    for link in (tree.root / "stolen/manifests", tree.root / "linked"):
        assert any(str(link) in line and "outside the content tree" in line for line in found), result.out
    listing = mr(capsys, "ls", "-d", str(tree.root), "--json")
    names = [r["repository"] for r in json.loads(listing.out)["repositories"]]
    assert "stolen" not in names and "linked" not in names and "passwd" not in listing.out


def test_a_tag_linked_to_a_copy_outside_the_tree_is_reported_as_the_server_refuses_it(capsys, tree, tmp_path):
    from wsgicall import app_for, call

    manifests = tree.root / "library/hello/manifests"
    outside = tmp_path / "copies" / tree.hello.digest
    outside.parent.mkdir()
    outside.write_bytes((manifests / tree.hello.digest).read_bytes())  # the right bytes
    (manifests / "latest").unlink()
    os.symlink(outside, manifests / "latest")

    assert call(app_for(tree.root), "GET", "/v2/library/hello/manifests/latest").status == 404
    result = verify(capsys, tree.root, "--fast")
    assert result.code == 1
    [line] = problems(result)
    assert str(manifests / "latest") in line and "outside the content tree" in line
