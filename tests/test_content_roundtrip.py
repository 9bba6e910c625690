"""Round trips through real clients: served -> skopeo (OCI layout, docker-archive, oci-archive)
-> import into a fresh tree -> served again -> pulled by skopeo and containerd, same content."""

import gzip
import hashlib
import json
import tarfile

import pytest

import clients
import imagetree
from serverproc import running_registry
from contentsupport import mr

AMD64 = "linux/amd64"


@pytest.fixture(scope="module")
def standard_tree(tmp_path_factory):
    return imagetree.build_standard_tree(tmp_path_factory.mktemp("upstream") / "registry", with_big=False)


@pytest.fixture(scope="module")
def tree_registry(standard_tree):
    """The registry standing in for upstream."""
    with running_registry(standard_tree.root) as registry:
        yield registry


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pull_and_read(containerd, registry, tmp_path, repository, tag, image: imagetree.Image, **pull):
    certs_d = tmp_path / "certs.d"
    clients.write_hosts_toml(certs_d, clients.MIRRORED_HOST, registry.url)
    reference = f"{clients.MIRRORED_HOST}/{repository}:{tag}"
    pulled = containerd.pull(reference, certs_d, **pull)
    assert pulled.ok and not pulled.problems(), str(pulled)
    assert containerd.read_files(reference, image.platform, image.files) == image.files
    return containerd.images()[reference]


@pytest.mark.parametrize("which", ["multiarch", "docker_list"])
def test_oci_layout_round_trip_keeps_every_digest(tmp_path, capsys, standard_tree, tree_registry,
                                                   containerd, skopeo_available, which):
    item = getattr(standard_tree, which)
    layout = tmp_path / "layout"
    clients.skopeo_copy_all(tree_registry.host_port, item.name, item.tag, f"oci:{layout}:{item.tag}")
    [copied_digest] = clients.oci_layout_manifest_digests(layout)
    tree = tmp_path / "tree"

    result = mr(capsys, "import", str(layout), "-d", str(tree), "--name", item.name)
    assert result.code == 0, result

    with running_registry(tree) as again:
        served = clients.skopeo_inspect_raw(again.host_port, item.name, item.tag)
        assert sha(served) == copied_digest
        if which == "multiarch":  # OCI in, OCI out: the upstream digest itself
            assert copied_digest == item.digest
        media_type, digest = pull_and_read(containerd, again, tmp_path, item.name, item.tag,
                                           item.child(AMD64), all_platforms=True)
        assert digest == copied_digest


def test_dir_transport_round_trip_keeps_docker_digests(tmp_path, capsys, standard_tree, tree_registry,
                                                        containerd, skopeo_available):
    """skopeo's oci: converts Docker manifests (new digests); dir: keeps them byte for byte."""
    listing = standard_tree.docker_list
    source = tmp_path / "dir"
    clients.skopeo_copy_all(tree_registry.host_port, listing.name, listing.tag, f"dir:{source}")
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(source), "-d", str(tree), "--name", listing.name, "--tag", listing.tag).code == 0

    with running_registry(tree) as again:
        assert sha(clients.skopeo_inspect_raw(again.host_port, listing.name, listing.tag)) == listing.digest
        assert pull_and_read(containerd, again, tmp_path, listing.name, listing.tag, listing.child(AMD64),
                             platform=AMD64) == (imagetree.DOCKER_LIST, listing.digest)


def test_oci_archive_round_trip(tmp_path, capsys, standard_tree, tree_registry, containerd, skopeo_available):
    hello = standard_tree.hello
    archive = tmp_path / "hello.oci.tar"
    clients.skopeo("copy", "--src-tls-verify=false", clients.docker_ref(tree_registry.host_port, hello.name, hello.tag),
                   f"oci-archive:{archive}:{hello.tag}", check=True)
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(archive), "-d", str(tree), "--name", hello.name).code == 0

    with running_registry(tree) as again:
        assert sha(clients.skopeo_inspect_raw(again.host_port, hello.name, hello.tag)) == hello.digest
        assert pull_and_read(containerd, again, tmp_path, hello.name, hello.tag, hello,
                             platform=AMD64) == (imagetree.OCI_MANIFEST, hello.digest)


def test_docker_archive_round_trip_keeps_layer_contents(tmp_path, capsys, standard_tree, tree_registry,
                                                         containerd, skopeo_available):
    hello = standard_tree.hello
    archive = tmp_path / "hello.docker.tar"
    clients.skopeo("copy", "--src-tls-verify=false", clients.docker_ref(tree_registry.host_port, hello.name, hello.tag),
                   f"docker-archive:{archive}:docker.io/{hello.name}:{hello.tag}", check=True)
    tree = tmp_path / "tree"
    result = mr(capsys, "import", str(archive), "-d", str(tree))  # named by its RepoTags
    assert result.code == 0, result

    with running_registry(tree) as again:
        manifest = json.loads(clients.skopeo_inspect_raw(again.host_port, hello.name, hello.tag))
        assert manifest["mediaType"] == imagetree.DOCKER_MANIFEST
        assert manifest["config"]["digest"] == hello.config.digest
        layer_digest = manifest["layers"][0]["digest"]
        assert layer_digest == sha(gzip.decompress(hello.layers[0].data))  # the same tar, uncompressed
        copied = tmp_path / "copied"
        clients.skopeo("copy", "--src-tls-verify=false", clients.docker_ref(again.host_port, hello.name, hello.tag),
                       f"dir:{copied}", check=True)
        with tarfile.open(copied / layer_digest.split(":")[1]) as tar:
            assert {m.name for m in tar.getmembers() if m.isfile()} == set(hello.files)
        pull_and_read(containerd, again, tmp_path, hello.name, hello.tag, hello, platform=AMD64)
