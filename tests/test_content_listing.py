"""`minimal-registry ls`: every repository and tag, with digest, type, platforms and size."""

import json
import os

import imagetree
from contentsupport import mr


def test_ls_lists_every_tag_for_a_person(tmp_path, capsys):
    tree = imagetree.build_standard_tree(tmp_path / "registry", with_big=False)
    result = mr(capsys, "ls", "-d", str(tree.root))
    assert result.code == 0
    rows = {tuple(line.split()[:2]): line for line in result.out.splitlines()[1:] if line.strip()}
    for tagged in tree.all_tagged():
        repository = f"{tagged.namespace}/{tagged.name}" if tagged.namespace else tagged.name
        line = rows[(repository, tagged.tag)]
        assert tagged.digest[:19] in line
    assert "linux/amd64, linux/arm64/v8" in rows[("rancher/mirrored-pause", "3.6")]
    assert "docker-list" in rows[("rancher/klipper-helm", "v0.8.0")]
    assert "8 repositories, 8 tags" in result.out


def test_ls_json_gives_digests_types_platforms_and_sizes(tmp_path, capsys):
    tree = imagetree.build_standard_tree(tmp_path / "registry", with_big=False)
    arm64 = tree.multiarch.child("linux/arm64/v8")
    os.unlink(tree.root / "rancher/mirrored-pause/manifests" / arm64.digest)

    document = json.loads(mr(capsys, "ls", "-d", str(tree.root), "--json").out)

    by_name = {r["repository"]: r for r in document["repositories"]}
    [pause] = by_name["rancher/mirrored-pause"]["tags"]
    assert pause["digest"] == tree.multiarch.digest
    assert pause["mediaType"] == imagetree.OCI_INDEX
    assert pause["platforms"] == ["linux/amd64"] and pause["absentPlatforms"] == ["linux/arm64/v8"]
    amd64 = tree.multiarch.child("linux/amd64")
    assert pause["size"] == tree.multiarch.size + amd64.size + sum(b.size for b in amd64.blobs)
    assert by_name["docker.io/library/busybox"]["namespace"] == "docker.io"
    assert by_name["docker.io/library/busybox"]["name"] == "library/busybox"
    blobs = list((tree.root / "blobs").iterdir())
    assert document["totals"]["blobs"] == len(blobs)
    assert document["totals"]["tags"] == 8
