"""`minimal-registry rm` and `prune`: remove images by reference (as k3s-images.txt lists them),
then give back exactly the space nothing else uses; safe beside a running server."""

import fcntl
import hashlib
import json
import os
import queue
import subprocess
import threading
from pathlib import Path

import pytest

import imagetree
from contentsupport import assert_one_line_error, mr, mr_process, snapshot
from httpraw import connect
from serverproc import command_env, registry_command, running_registry

from minimal_registry.content import prune


def blobs_of(*items) -> set:
    digests = set()
    for item in items:
        children = item.children if isinstance(item, imagetree.Index) else (item,)
        for child in children:
            digests.update(b.digest for b in child.blobs)
    return digests


def stored_blobs(tree: Path) -> set:
    return {name for name in os.listdir(tree / "blobs") if name.startswith("sha256:")}


def assert_verifies(capsys, tree: Path) -> None:
    checked = mr(capsys, "verify", "-q", "-d", str(tree))
    assert checked.code == 0, checked


@pytest.fixture
def two_releases(tmp_path):
    """Two K3s-like releases in one tree: pause shared, coredns moved, helm only in the old."""
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    pause = builder.index("rancher/mirrored-pause", "3.6", (
        builder.image("rancher/mirrored-pause", platform="linux/amd64", files={"pause": b"p\n"}),))
    old_dns = builder.image("rancher/mirrored-coredns-coredns", "1.10.1", files={"dns": b"old\n"})
    new_dns = builder.image("rancher/mirrored-coredns-coredns", "1.11.3", files={"dns": b"new\n"})
    helm = builder.index("rancher/klipper-helm", "v0.8.0", (
        builder.image("rancher/klipper-helm", platform="linux/amd64", docker=True, files={"h": b"1\n"}),
        builder.image("rancher/klipper-helm", platform="linux/arm64", docker=True, files={"h": b"2\n"}),
    ), docker=True)
    busybox = builder.image("library/busybox", "latest", namespace="docker.io", files={"b": b"ns\n"})
    return builder.root, pause, old_dns, new_dns, helm, busybox


def write_list(path: Path, *references: str) -> Path:
    path.write_text("# k3s-images.txt\n" + "".join(f"{r}\r\n" if i % 2 else f"{r}\n"
                                                     for i, r in enumerate(references)))
    return path


def test_rm_then_prune_frees_exactly_what_only_the_removed_images_used(capsys, two_releases, tmp_path):
    tree, pause, old_dns, new_dns, helm, busybox = two_releases
    old_list = write_list(tmp_path / "k3s-images-old.txt", "docker.io/rancher/mirrored-pause:3.6",
                          "docker.io/rancher/mirrored-coredns-coredns:1.10.1", "docker.io/rancher/klipper-helm:v0.8.0")
    new_list = write_list(tmp_path / "k3s-images-new.txt", "docker.io/rancher/mirrored-pause:3.6",
                          "docker.io/rancher/mirrored-coredns-coredns:1.11.3")
    removed = mr(capsys, "rm", "-d", str(tree), "-f", str(old_list), "--keep", str(new_list))
    assert removed.code == 0, removed
    assert "removed rancher/klipper-helm:v0.8.0" in removed.out
    assert "kept    docker.io/rancher/mirrored-pause:3.6" in removed.out
    assert (tree / "rancher/mirrored-pause/manifests/3.6").is_symlink()

    before = stored_blobs(tree)
    sizes = {d: (tree / "blobs" / d).stat().st_size for d in before}
    pruned = mr(capsys, "prune", "--json", "-d", str(tree))
    assert pruned.code == 0, pruned
    gone = before - stored_blobs(tree)
    assert gone == blobs_of(old_dns, helm)
    report = json.loads(pruned.out)
    assert report["blobs"] == {"count": len(gone), "bytes": sum(sizes[d] for d in gone)}
    assert report["manifests"]["count"] == 1 + 1 + 2  # coredns 1.10.1, helm's list and its two images
    assert not (tree / "rancher/klipper-helm").exists(), "an empty repository is removed"
    assert_verifies(capsys, tree)
    listed = json.loads(mr(capsys, "ls", "--json", "-d", str(tree)).out)
    tags = {(r["repository"], t["tag"]) for r in listed["repositories"] for t in r["tags"]}
    assert tags == {("rancher/mirrored-pause", "3.6"), ("rancher/mirrored-coredns-coredns", "1.11.3"),
                    ("docker.io/library/busybox", "latest")}


def test_a_second_prune_frees_nothing_and_says_so(capsys, two_releases):
    tree = two_releases[0]
    assert mr(capsys, "prune", "-d", str(tree)).code == 0
    before = snapshot(tree)
    again = mr(capsys, "prune", "-d", str(tree))
    assert again.code == 0 and "nothing to free" in again.out, again
    assert snapshot(tree) == before


def test_rm_finds_a_reference_under_its_domain_when_the_tree_keeps_domains(capsys, two_releases):
    tree, *_ = two_releases
    result = mr(capsys, "rm", "-d", str(tree), "busybox:latest")
    assert result.code == 0, result
    assert not os.path.lexists(tree / "docker.io/library/busybox/manifests/latest")


def test_rm_by_digest_removes_the_manifest_and_the_tags_naming_it(capsys, two_releases):
    tree, pause, *_ = two_releases
    os.symlink(pause.digest, tree / "rancher/mirrored-pause/manifests/latest")
    result = mr(capsys, "rm", "--json", "-d", str(tree), f"rancher/mirrored-pause@{pause.digest}")
    assert result.code == 0, result
    removed = json.loads(result.out)["removed"]
    assert {r["tag"] for r in removed} == {"3.6", "latest", None}
    assert sorted(os.listdir(tree / "rancher/mirrored-pause/manifests")) == [pause.children[0].digest]
    assert_verifies(capsys, tree)


def test_rm_of_a_reference_not_in_the_tree_exits_1_and_changes_nothing(capsys, two_releases):
    tree = two_releases[0]
    before = snapshot(tree)
    result = mr(capsys, "rm", "-d", str(tree), "rancher/mirrored-pause:9.9")
    assert result.code == 1 and "absent  rancher/mirrored-pause:9.9" in result.out, result
    assert snapshot(tree) == before


def test_rm_of_a_list_with_a_bad_line_removes_nothing(two_releases, tmp_path):
    tree = two_releases[0]
    listed = write_list(tmp_path / "list.txt", "docker.io/rancher/mirrored-pause:3.6", "Not A Reference")
    before = snapshot(tree)
    result = mr_process("rm", "-d", str(tree), "-f", str(listed))
    assert_one_line_error(result, "line 3", "Not A Reference")
    assert result.code == 2
    assert snapshot(tree) == before


def test_dry_run_deletes_nothing_and_counts_what_prune_frees(capsys, two_releases):
    tree, pause, old_dns, *_ = two_releases
    (tree / "rancher/mirrored-coredns-coredns/manifests/1.10.1").unlink()
    before = snapshot(tree)
    dry = mr(capsys, "prune", "--dry-run", "--json", "-d", str(tree))
    assert dry.code == 0, dry
    assert snapshot(tree) == before
    real = mr(capsys, "prune", "--json", "-d", str(tree))
    dry_report, real_report = json.loads(dry.out), json.loads(real.out)
    assert dry_report["dryRun"] and not real_report["dryRun"]
    for key in ("manifests", "blobs", "bytes"):
        assert dry_report[key] == real_report[key]
    assert real_report["blobs"]["count"] == len(blobs_of(old_dns))


def test_prune_keeps_what_refers_to_a_kept_manifest(capsys, two_releases):
    """A signature or SBOM (untagged, `subject` = a kept image) is what `referrers` serves."""
    tree, pause, old_dns, new_dns, *_ = two_releases
    config = b"{}"
    (tree / "blobs" / imagetree.sha256_digest(config)).write_bytes(config)
    signature = imagetree.canonical_json({
        "schemaVersion": 2, "mediaType": imagetree.OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": imagetree.sha256_digest(config), "size": 2},
        "layers": [], "subject": {"mediaType": new_dns.media_type, "digest": new_dns.digest, "size": new_dns.size}})
    stored = tree / "rancher/mirrored-coredns-coredns/manifests" / imagetree.sha256_digest(signature)
    stored.write_bytes(signature)
    assert mr(capsys, "prune", "-d", str(tree)).code == 0
    assert stored.exists() and (tree / "blobs" / imagetree.sha256_digest(config)).exists()


def test_prune_never_deletes_outside_the_tree(capsys, two_releases, tmp_path):
    tree, pause, old_dns, *_ = two_releases
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / ("sha256:" + "0" * 64)
    precious.write_text("not ours")
    # An unreferenced blob that is a link out of the tree, and a repository whose manifests/
    # is a link to a directory outside it.
    os.symlink(precious, tree / "blobs" / ("sha256:" + "1" * 64))
    linked = tree / "linked/repo"
    linked.mkdir(parents=True)
    os.symlink(outside, linked / "manifests")
    # A repository's manifests/ linked to another repository's, inside the tree.
    alias = tree / "alias/dns"
    alias.mkdir(parents=True)
    os.symlink(tree / "rancher/mirrored-coredns-coredns/manifests", alias / "manifests")

    result = mr(capsys, "prune", "-d", str(tree))
    assert result.code == 0, result
    assert precious.read_text() == "not ours"
    assert not os.path.lexists(tree / "blobs" / ("sha256:" + "1" * 64)), "the dangling name itself goes"
    assert (tree / "rancher/mirrored-coredns-coredns/manifests" / old_dns.digest).exists()
    assert (outside / precious.name).exists()


def test_a_damaged_kept_manifest_stops_prune_before_deleting(capsys, two_releases):
    tree, pause, old_dns, *_ = two_releases
    (tree / "rancher/mirrored-coredns-coredns/manifests/1.10.1").unlink()  # something to free
    (tree / "rancher/mirrored-pause/manifests" / pause.digest).write_bytes(b'{"not": "it"}')
    before = snapshot(tree)
    result = mr_process("prune", "-d", str(tree))
    assert_one_line_error(result, pause.digest, "verify")
    assert result.code == 1
    assert snapshot(tree) == before


def test_a_tag_repointed_during_prune_is_not_broken(capsys, two_releases, monkeypatch):
    """The tag moves, between the marks and the deletions, to content nothing reached before."""
    tree, pause, old_dns, new_dns, *_ = two_releases
    tags = tree / "rancher/mirrored-coredns-coredns/manifests"
    (tags / "1.10.1").unlink()  # old_dns is unreachable: the first marks leave it out
    real_candidates = prune.candidates

    def candidates_then_repoint(*args):
        found = real_candidates(*args)
        assert any(c.name.endswith(old_dns.digest) for c in found)
        (tags / ".tmp-repoint").symlink_to(old_dns.digest)
        os.replace(tags / ".tmp-repoint", tags / "1.11.3")  # as `import` re-points a tag
        return found

    monkeypatch.setattr(prune, "candidates", candidates_then_repoint)
    assert mr(capsys, "prune", "-d", str(tree)).code == 0
    assert (tags / old_dns.digest).exists()
    assert blobs_of(old_dns) <= stored_blobs(tree)
    assert_verifies(capsys, tree)


def test_an_interrupted_prune_leaves_a_tree_verify_passes(capsys, two_releases, monkeypatch):
    tree, pause, old_dns, new_dns, helm, _ = two_releases
    (tree / "rancher/klipper-helm/manifests/v0.8.0").unlink()
    real_unlink = os.unlink
    calls = []

    def unlink_then_interrupt(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink_then_interrupt)
    assert mr(capsys, "prune", "-q", "-d", str(tree)).code == 130
    monkeypatch.undo()
    assert_verifies(capsys, tree)
    assert mr(capsys, "prune", "-d", str(tree)).code == 0
    assert not (blobs_of(helm) & stored_blobs(tree))
    assert_verifies(capsys, tree)


def test_a_download_in_flight_survives_the_prune_of_its_blob(capsys, tmp_path):
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    big = builder.image("example/big", "1.0", layer_bytes=24 * 1024 * 1024)
    keep = builder.image("example/keep", "1.0", files={"k": b"k\n"})
    layer = big.layers[0]
    with running_registry(builder.root, "-q") as server:
        connection = connect(server)
        connection.request("GET", f"/v2/example/big/blobs/{layer.digest}")
        response = connection.getresponse()
        assert response.status == 200
        hasher = hashlib.sha256(response.read(65536))
        assert mr(capsys, "rm", "-d", str(builder.root), "example/big:1.0").code == 0
        assert mr(capsys, "prune", "-d", str(builder.root)).code == 0
        assert not (builder.root / "blobs" / layer.digest).exists()
        for chunk in iter(lambda: response.read(1 << 20), b""):
            hasher.update(chunk)
        assert "sha256:" + hasher.hexdigest() == layer.digest
        connection.close()
        after = connect(server)
        after.request("GET", "/v2/example/keep/manifests/1.0")
        assert after.getresponse().status == 200
        after.close()
    assert keep.digest


def test_rm_and_prune_help_and_bad_arguments(tmp_path):
    usage = mr_process("--help")
    assert "minimal-registry rm [-d DIR]" in usage.out and "minimal-registry prune [-d DIR] [--dry-run]" in usage.out
    assert_one_line_error(mr_process("prune", "-d", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(mr_process("rm", "-d", str(tmp_path)), "nothing to remove")


def test_rm_waits_for_another_writer_holding_the_tree(two_releases):
    """import, rm and prune never overlap: the second one says it waits, then runs."""
    tree = two_releases[0]
    tag = tree / "rancher/klipper-helm/manifests/v0.8.0"
    holder = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        waiting = subprocess.Popen(registry_command() + ["rm", "-d", str(tree), "rancher/klipper-helm:v0.8.0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=command_env())
        first_line = queue.Queue()
        threading.Thread(target=lambda: first_line.put(waiting.stderr.readline()), daemon=True).start()
        said = first_line.get(timeout=30)
        assert "waiting for another import, rm or prune" in said
        assert waiting.poll() is None and os.path.lexists(tag), "rm went on while the tree was locked"
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    waiting.wait(timeout=60)
    assert waiting.returncode == 0, waiting.stderr.read()
    assert not os.path.lexists(tag)


def test_a_manifest_linked_inside_the_tree_is_followed_and_kept(capsys, two_releases):
    """The server serves a manifest file that is a link resolving inside the tree; so does prune."""
    tree, pause, old_dns, new_dns, *_ = two_releases
    stored = tree / "rancher/mirrored-coredns-coredns/manifests" / new_dns.digest
    moved = tree / "kept-elsewhere" / new_dns.digest
    moved.parent.mkdir()
    os.replace(stored, moved)
    os.symlink(os.path.relpath(moved, stored.parent), stored)
    result = mr(capsys, "prune", "-d", str(tree))
    assert result.code == 0, result
    assert blobs_of(new_dns) <= stored_blobs(tree)
    assert moved.exists() and stored.is_symlink()


def test_rm_refuses_a_list_that_is_not_a_regular_file(two_releases, tmp_path):
    fifo = tmp_path / "list.fifo"
    os.mkfifo(fifo)
    result = mr_process("rm", "-d", str(two_releases[0]), "-f", str(fifo), timeout=30)
    assert_one_line_error(result, "cannot read the list")
