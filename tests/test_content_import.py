"""`minimal-registry import`: every kind of source, names, platforms, atomicity, re-runs."""

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

import imagetree
from contentsupport import (assert_one_line_error, containerd_name, docker_save_dir, mr,
                                  mr_process, oci_layout, snapshot, tar_directory)

from minimal_registry.content import decompress, importer, place

PAUSE = "docker.io/rancher/mirrored-pause:3.6"


@pytest.fixture
def images(tmp_path):
    """A small tree of real images to make sources from."""
    builder = imagetree.TreeBuilder(tmp_path / "upstream")
    pause = "rancher/mirrored-pause"
    index = builder.index(pause, "3.6", (
        builder.image(pause, platform="linux/amd64", files={"pause": b"amd64\n"}),
        builder.image(pause, platform="linux/arm64/v8", files={"pause": b"arm64\n"}),
    ))
    helm = "rancher/klipper-helm"
    docker_list = builder.index(helm, "v0.8.0", (
        builder.image(helm, platform="linux/amd64", docker=True, files={"entry": b"amd64\n"}),
        builder.image(helm, platform="linux/arm64", docker=True, files={"entry": b"arm64\n"}),
    ), docker=True)
    hello = builder.image("library/hello", "latest", files={"hello.txt": b"hello\n"})
    return builder.root, index, docker_list, hello


def tag_digest(tree: Path, repository: str, tag: str) -> str:
    return os.readlink(tree / repository / "manifests" / tag)


def assert_pause_and_helm_imported(tree: Path, index, docker_list) -> None:
    """The `images` fixture's OCI index and Docker list, tagged with upstream digests."""
    assert tag_digest(tree, "rancher/mirrored-pause", "3.6") == index.digest
    assert tag_digest(tree, "rancher/klipper-helm", "v0.8.0") == docker_list.digest
    assert_image_in_tree(tree, "rancher/mirrored-pause", index)
    assert_image_in_tree(tree, "rancher/klipper-helm", docker_list)


def assert_image_in_tree(tree: Path, repository: str, item) -> None:
    manifests = tree / repository / "manifests"
    assert (manifests / item.digest).read_bytes() == item.data
    children = item.children if isinstance(item, imagetree.Index) else (item,)
    for child in children:
        assert (manifests / child.digest).read_bytes() == child.data
        for blob in child.blobs:
            stored = tree / "blobs" / blob.digest
            assert "sha256:" + hashlib.sha256(stored.read_bytes()).hexdigest() == blob.digest


def test_oci_layout_with_containerd_names_lands_with_upstream_digests(tmp_path, images, capsys):
    upstream, index, docker_list, _ = images
    source = oci_layout(upstream, tmp_path / "layout", [index, docker_list],
                        [containerd_name(PAUSE), containerd_name("docker.io/rancher/klipper-helm:v0.8.0")])
    tree = tmp_path / "tree"
    result = mr(capsys, "import", str(source), "-d", str(tree))

    assert result.code == 0, result
    assert_pause_and_helm_imported(tree, index, docker_list)
    assert os.readlink(tree / "rancher" / "blobs") == "../blobs"
    assert os.readlink(tree / "rancher" / "mirrored-pause" / "blobs") == "../blobs"
    assert "imported rancher/mirrored-pause:3.6" in result.out
    assert mr(capsys, "verify", "-d", str(tree)).code == 0


def test_running_the_same_import_again_changes_nothing(tmp_path, images, capsys):
    upstream, index, _, hello = images
    source = oci_layout(upstream, tmp_path / "layout", [index, hello],
                        [containerd_name(PAUSE), containerd_name("docker.io/library/hello:latest")])
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(source), "-d", str(tree)).code == 0
    before = snapshot(tree)

    again = mr(capsys, "import", str(source), "-d", str(tree))

    assert again.code == 0
    assert snapshot(tree) == before
    assert again.out.count("unchanged ") == 2 and "imported" not in again.out


def test_keep_domain_files_images_under_their_registry(tmp_path, images, capsys):
    upstream, index, _, _ = images
    source = oci_layout(upstream, tmp_path / "layout", [index], [containerd_name(PAUSE)])
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(source), "-d", str(tree), "--keep-domain").code == 0

    assert tag_digest(tree, "docker.io/rancher/mirrored-pause", "3.6") == index.digest
    for level in ("docker.io", "docker.io/rancher", "docker.io/rancher/mirrored-pause"):
        assert os.readlink(tree / level / "blobs") == "../blobs"
    assert not (tree / "rancher").exists()


def test_bare_tag_needs_a_name_and_name_and_tag_override(tmp_path, images, capsys):
    upstream, _, _, hello = images
    source = oci_layout(upstream, tmp_path / "layout", [hello], [{"org.opencontainers.image.ref.name": "latest"}])
    tree = tmp_path / "tree"

    refused = mr(capsys, "import", str(source), "-d", str(tree))
    assert refused.code == 2
    assert "only the tag 'latest'" in refused.err and "--name" in refused.err
    assert not (tree / "blobs").exists() or not any((tree / "blobs").iterdir())

    assert mr(capsys, "import", str(source), "-d", str(tree), "--name", "ghcr.io/org/hello", "--tag", "v1").code == 0
    assert tag_digest(tree, "org/hello", "v1") == hello.digest


def test_name_override_refuses_a_source_with_several_images(tmp_path, images, capsys):
    upstream, index, _, hello = images
    source = oci_layout(upstream, tmp_path / "layout", [index, hello], [None, None])
    result = mr(capsys, "import", str(source), "-d", str(tmp_path / "tree"), "--name", "x/y")
    assert_one_line_error(result, "--name/--tag name one image", "hold 2")


def test_docker_archive_becomes_schema2_with_the_same_layer_contents(tmp_path, images, capsys):
    upstream, _, _, hello = images
    layer_tar = gzip.decompress(hello.layers[0].data)
    source = docker_save_dir(upstream, tmp_path / "saved", [hello], [["library/hello:latest", "hello:v2"]],
                             {hello.layers[0].digest: layer_tar})
    archive = tar_directory(source, tmp_path / "hello.tar")
    tree = tmp_path / "tree"
    result = mr(capsys, "import", str(archive), "-d", str(tree))
    assert result.code == 0, result

    digest = tag_digest(tree, "library/hello", "latest")
    assert tag_digest(tree, "library/hello", "v2") == digest  # `hello` is docker.io/library/hello
    document = json.loads((tree / "library/hello/manifests" / digest).read_bytes())
    assert document["mediaType"] == imagetree.DOCKER_MANIFEST
    assert document["config"]["digest"] == hello.config.digest  # same config: same image ID
    [layer] = document["layers"]
    assert layer["mediaType"] == imagetree.DOCKER_LAYER_TAR
    assert (tree / "blobs" / layer["digest"]).read_bytes() == layer_tar
    assert not list(tree.glob(".import-*")), "staging directory left behind"
    assert mr(capsys, "verify", "-d", str(tree)).code == 0


@pytest.mark.parametrize("compression", ["", "gz", "zst"])
def test_k3s_airgap_archive_prefers_the_oci_side_and_keeps_upstream_digests(tmp_path, images, capsys, compression):
    """`ctr images export` tarballs hold an OCI layout AND a docker manifest.json."""
    upstream, index, docker_list, _ = images
    layout = oci_layout(upstream, tmp_path / "airgap", [index, docker_list],
                        [containerd_name(PAUSE), containerd_name("docker.io/rancher/klipper-helm:v0.8.0")])
    amd64 = index.child("linux/amd64")
    (layout / "manifest.json").write_text(json.dumps([{
        "Config": "blobs/sha256/" + amd64.config.digest.split(":")[1],
        "RepoTags": [PAUSE],
        "Layers": ["blobs/sha256/" + amd64.layers[0].digest.split(":")[1]],
    }]))
    suffix = {"": ".tar", "gz": ".tar.gz", "zst": ".tar.zst"}[compression]
    archive = tar_directory(layout, tmp_path / f"k3s-airgap-images-amd64{suffix}", compression)
    tree = tmp_path / "tree"

    result = mr(capsys, "import", str(archive), "-d", str(tree))

    assert result.code == 0, result
    assert_pause_and_helm_imported(tree, index, docker_list)
    assert not list(tree.glob(".import-*"))


def test_zst_without_the_zstandard_module_uses_the_zstd_command(tmp_path, images, capsys, monkeypatch):
    upstream, _, _, hello = images
    layout = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")])
    archive = tar_directory(layout, tmp_path / "images.tar.zst", "zst")
    monkeypatch.setattr(decompress, "_have_zstandard", lambda: False)

    assert mr(capsys, "import", str(archive), "-d", str(tmp_path / "tree")).code == 0

    monkeypatch.setattr(decompress.shutil, "which", lambda _name: None)
    result = mr(capsys, "import", str(archive), "-d", str(tmp_path / "tree2"))
    assert_one_line_error(result, "zstd-compressed", "zstandard")


def test_single_platform_pull_keeps_the_upstream_index_digest(tmp_path, images, capsys):
    """What the download script does: the raw index (`skopeo inspect --raw`) + one platform's
    image; the tag names the upstream index, the other platform is absent on purpose."""
    upstream, index, _, _ = images
    raw = tmp_path / "index.json.raw"
    raw.write_bytes(index.data)
    arm64 = index.child("linux/arm64/v8")
    platform_layout = oci_layout(upstream, tmp_path / "arm64", [arm64], [None])
    tree = tmp_path / "tree"

    result = mr(capsys, "import", str(raw), str(platform_layout), "-d", str(tree),
                "--name", "docker.io/rancher/mirrored-pause", "--tag", "3.6")

    assert result.code == 0, result
    assert tag_digest(tree, "rancher/mirrored-pause", "3.6") == index.digest
    assert (tree / "rancher/mirrored-pause/manifests" / arm64.digest).exists()
    assert not (tree / "rancher/mirrored-pause/manifests" / index.child("linux/amd64").digest).exists()
    assert "not in the sources: linux/amd64" in result.out
    checked = mr(capsys, "verify", "-d", str(tree))
    assert checked.code == 0 and "pulled for fewer platforms): linux/amd64" in checked.out


def test_platform_filter_and_content_already_in_the_tree(tmp_path, images, capsys):
    upstream, index, _, _ = images
    source = oci_layout(upstream, tmp_path / "layout", [index], [containerd_name(PAUSE)])
    raw = tmp_path / "index.raw"
    raw.write_bytes(index.data)
    tree = tmp_path / "tree"

    assert importer.run([source], tree, platform="linux/amd64") == 0
    assert not (tree / "rancher/mirrored-pause/manifests" / index.child("linux/arm64/v8").digest).exists()
    before = snapshot(tree)

    # The bare index is enough for a platform the tree holds (the script's "skip" check)...
    assert importer.run([raw], tree, name="rancher/mirrored-pause", tag="3.6", platform="linux/amd64") == 0
    assert snapshot(tree) == before
    # ...and says "content missing" (exit 3) for one it does not.
    with pytest.raises(importer.Fatal) as missing:
        importer.run([raw], tree, name="rancher/mirrored-pause", tag="3.6", platform="linux/arm64")
    assert missing.value.exit_code == 3 and "linux/arm64/v8" in missing.value.message
    assert snapshot(tree) == before


def test_damaged_blob_in_a_source_is_refused_and_nothing_is_tagged(tmp_path, images, capsys):
    upstream, _, _, hello = images
    source = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")])
    layer = source / "blobs/sha256" / hello.layers[0].digest.split(":")[1]
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    tree = tmp_path / "tree"

    result = mr_process("import", str(source), "-d", str(tree))

    assert_one_line_error(result, hello.layers[0].digest, "hashes to")
    assert result.code == 2
    assert not (tree / "blobs" / hello.layers[0].digest).exists()
    assert not (tree / "library/hello/manifests/latest").exists()
    assert not [p for p in tree.rglob("*") if p.name.startswith(".tmp-")]


def test_missing_layer_exits_3_naming_it(tmp_path, images, capsys):
    upstream, _, _, hello = images
    source = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")],
                        skip=[hello.layers[0].digest])
    result = mr_process("import", str(source), "-d", str(tmp_path / "tree"))
    assert result.code == 3
    assert_one_line_error(result, hello.layers[0].digest, "in no source")


@pytest.mark.parametrize("kind", ["nothing", "text", "unsafe", "truncated"])
def test_bad_sources_get_one_clear_line(tmp_path, images, kind):
    upstream, _, _, hello = images
    if kind == "nothing":
        source, expected = tmp_path / "absent.tar", "does not exist"
    elif kind == "text":
        source, expected = tmp_path / "notes.txt", "neither a directory, a tar archive nor a manifest"
        source.write_text("hello\n" * 200)
    elif kind == "unsafe":
        import io
        import tarfile
        source, expected = tmp_path / "evil.tar", "unsafe path"
        with tarfile.open(source, "w") as tar:
            info = tarfile.TarInfo("../../escaped")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    else:
        layout = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")])
        whole = tar_directory(layout, tmp_path / "whole.tar.zst", "zst").read_bytes()
        source, expected = tmp_path / "cut.tar.zst", "damaged or truncated"
        source.write_bytes(whole[: len(whole) // 2])
    tree = tmp_path / "tree"
    result = mr_process("import", str(source), "-d", str(tree))
    assert_one_line_error(result, expected)
    assert not (tmp_path / "escaped").exists()
    assert not list(tree.glob(".import-*")) if tree.exists() else True


def test_an_interrupted_import_leaves_no_partial_file_and_no_tag(tmp_path, images, capsys, monkeypatch):
    upstream, index, _, _ = images
    layout = oci_layout(upstream, tmp_path / "layout", [index], [containerd_name(PAUSE)])
    archive = tar_directory(layout, tmp_path / "pause.tar.gz", "gz")
    tree = tmp_path / "tree"

    def interrupted(self, manifests, digest, body):
        raise KeyboardInterrupt

    monkeypatch.setattr(place.Placer, "manifest", interrupted)
    assert mr(capsys, "import", str(archive), "-d", str(tree)).code == 130

    assert not list(tree.glob(".import-*")), "staging directory left behind"
    assert not [p for p in tree.rglob("*") if p.name.startswith(".tmp-")]
    assert not (tree / "rancher/mirrored-pause/manifests/3.6").exists()
    for blob in tree.joinpath("blobs").iterdir():  # whatever was placed is whole
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

    monkeypatch.undo()
    assert mr(capsys, "import", str(archive), "-d", str(tree)).code == 0
    assert tag_digest(tree, "rancher/mirrored-pause", "3.6") == index.digest


def test_skopeo_dir_layout_keeps_docker_manifests_byte_for_byte(tmp_path, images, capsys):
    """`skopeo copy --all docker://... dir:D` (the script's skopeo path) as skopeo lays it."""
    upstream, _, docker_list, _ = images
    source = tmp_path / "dir"
    source.mkdir()
    (source / "version").write_text("Directory Transport Version: 1.1\n")
    (source / "manifest.json").write_bytes(docker_list.data)
    for child in docker_list.children:
        (source / (child.digest.split(":")[1] + ".manifest.json")).write_bytes(child.data)
        for blob in child.blobs:
            (source / blob.digest.split(":")[1]).write_bytes((upstream / "blobs" / blob.digest).read_bytes())
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(source), "-d", str(tree), "--name", "docker.io/rancher/klipper-helm",
              "--tag", "v0.8.0").code == 0
    assert tag_digest(tree, "rancher/klipper-helm", "v0.8.0") == docker_list.digest
    assert_image_in_tree(tree, "rancher/klipper-helm", docker_list)


def test_import_into_a_tree_that_is_a_file_is_refused(tmp_path, images, capsys):
    upstream, _, _, hello = images
    source = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert_one_line_error(mr(capsys, "import", str(source), "-d", str(not_a_dir)), "is not a directory")


def damage_in_place(path: Path) -> None:
    """Flip one byte: same size, same mtime, wrong content (what a failing disk does)."""
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["layout", "archive with a big layer"])
def test_rerunning_the_import_repairs_a_blob_damaged_in_the_tree(tmp_path, images, capsys, kind):
    upstream, _, _, hello = images
    if kind == "layout":
        source = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")])
    else:  # over the manifest limit: the archive reader skips blobs the tree already holds
        builder = imagetree.TreeBuilder(upstream)
        hello = builder.image("library/hello", "latest", layer_bytes=5 * 1024 * 1024)
        layout = oci_layout(upstream, tmp_path / "layout", [hello], [containerd_name("docker.io/library/hello:latest")])
        source = tar_directory(layout, tmp_path / "hello.tar.gz", "gz")
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(source), "-d", str(tree)).code == 0
    layer = tree / "blobs" / hello.layers[0].digest
    damage_in_place(layer)
    assert mr(capsys, "verify", "-d", str(tree)).code != 0

    again = mr(capsys, "import", str(source), "-d", str(tree))

    assert again.code == 0, again
    assert "repaired 1 damaged blob" in again.out, again.out
    assert sha256_of(layer) == hello.layers[0].digest
    assert mr(capsys, "verify", "-d", str(tree)).code == 0
    third = mr(capsys, "import", str(source), "-d", str(tree))
    assert "unchanged" in third.out and "repaired" not in third.out


def test_a_damaged_tree_blob_no_source_holds_is_missing_content(tmp_path, images, capsys):
    """The download script's "already there?" check (a bare index against the tree) must
    not take a damaged blob for a good one: exit 3 makes the script pull it again."""
    upstream, index, _, _ = images
    source = oci_layout(upstream, tmp_path / "layout", [index], [containerd_name(PAUSE)])
    raw = tmp_path / "index.raw"
    raw.write_bytes(index.data)
    tree = tmp_path / "tree"
    assert importer.run([source], tree, platform="linux/amd64") == 0
    layer = index.child("linux/amd64").layers[0].digest
    damage_in_place(tree / "blobs" / layer)

    result = mr_process("import", str(raw), "-d", str(tree), "--name", "rancher/mirrored-pause", "--tag", "3.6",
                        "--platform", "linux/amd64")

    assert result.code == 3, result
    assert_one_line_error(result, layer, "in no source")
