"""The registry as real clients see it: containerd (via ctr, what K3s embeds) and skopeo.

Every test pulls or copies from a registry process serving the standard tree, then checks what
the client ended up with against the digests the tree was built with. containerd is pointed at
the registry by the hosts.toml K3s writes; its pulls must unpack, and neither ctr (which does
the fetching in containerd 1.6) nor the daemon may log a warning, an error or a fallback to the
upstream registry.
"""

import hashlib
import json

import pytest

import clients
import imagetree
import serverproc
from clients import MIRRORED_HOST

AMD64 = "linux/amd64"


def ref(image, reference=None) -> str:
    """`bootstrap-registry.airgap/<name>:<tag>` or `...@<digest>`."""
    reference = reference or image.tag
    separator = "@" if reference.startswith("sha256:") else ":"
    return f"{MIRRORED_HOST}/{image.name}{separator}{reference}"


def pull_ok(containerd, reference, certs_d, **kwargs) -> clients.PullResult:
    pulled = containerd.pull(reference, certs_d, **kwargs)
    assert pulled.ok, str(pulled)
    assert not pulled.problems(), "\n".join(pulled.problems()) + "\n\n" + str(pulled)
    return pulled


def assert_unpacked(containerd, image: imagetree.Image) -> None:
    """All of the image's blobs are in the content store and its layers are a committed snapshot."""
    content = containerd.content_digests()
    missing = {b.digest for b in image.blobs} | {image.digest}
    assert missing <= content, f"missing from the content store: {sorted(missing - content)}"
    top = clients.config_chain_id(image.config.data)
    assert top in containerd.snapshot_keys(), f"{image.platform} not unpacked: no snapshot {top}"


def assert_files(containerd, reference, image: imagetree.Image) -> None:
    got = containerd.read_files(reference, image.platform, image.files)
    assert got == image.files


# ----- containerd ----------------------------------------------------------------------------

@pytest.mark.parametrize("form", clients.HOSTS_TOML_FORMS)
def test_ctr_pulls_by_tag_and_unpacks(containerd, certs_dirs, standard_tree, form):
    hello = standard_tree.hello
    pull_ok(containerd, ref(hello), certs_dirs[form], platform=AMD64)

    assert containerd.images()[ref(hello)] == (imagetree.OCI_MANIFEST, hello.digest)
    assert_unpacked(containerd, hello)
    assert ref(hello) in containerd.ready_images()
    assert_files(containerd, ref(hello), hello)


def test_ctr_pulls_by_digest(containerd, certs_dirs, standard_tree):
    hello = standard_tree.hello
    by_digest = ref(hello, hello.digest)
    pull_ok(containerd, by_digest, certs_dirs["k3s"], platform=AMD64)

    assert containerd.images()[by_digest] == (imagetree.OCI_MANIFEST, hello.digest)
    assert_unpacked(containerd, hello)
    assert_files(containerd, by_digest, hello)


def test_ctr_pulls_one_platform_of_an_index(containerd, certs_dirs, standard_tree):
    index = standard_tree.multiarch
    arm64, amd64 = index.child("linux/arm64/v8"), index.child(AMD64)
    pull_ok(containerd, ref(index), certs_dirs["k3s"], platform="linux/arm64")

    assert containerd.images()[ref(index)] == (imagetree.OCI_INDEX, index.digest)
    assert_unpacked(containerd, arm64)
    assert not {b.digest for b in amd64.blobs} & containerd.content_digests(), \
        "fetched the amd64 image's blobs for an arm64 pull"
    assert_files(containerd, ref(index), arm64)


def test_ctr_pulls_all_platforms_of_an_index(containerd, certs_dirs, standard_tree):
    index = standard_tree.multiarch
    pull_ok(containerd, ref(index), certs_dirs["k3s"], all_platforms=True)

    assert containerd.images()[ref(index)] == (imagetree.OCI_INDEX, index.digest)
    for child in index.children:
        assert_unpacked(containerd, child)
    assert ref(index) in containerd.ready_images()


def test_ctr_pulls_a_docker_manifest_list(containerd, certs_dirs, standard_tree):
    listing = standard_tree.docker_list
    pull_ok(containerd, ref(listing), certs_dirs["k3s"], all_platforms=True)

    assert containerd.images()[ref(listing)] == (imagetree.DOCKER_LIST, listing.digest)
    for child in listing.children:
        assert child.media_type == imagetree.DOCKER_MANIFEST
        assert_unpacked(containerd, child)
    assert_files(containerd, ref(listing), listing.child(AMD64))


@pytest.mark.parametrize("which", ["deep", "plain_tag", "no_media_type"])
def test_ctr_pulls_every_tree_shape(containerd, certs_dirs, standard_tree, which):
    """a/b/c/d; a tag stored as a plain copy; a manifest without `mediaType` (typed by shape)."""
    image = getattr(standard_tree, which)
    pull_ok(containerd, ref(image), certs_dirs["k3s"], platform=AMD64)

    # containerd types the image from the HEAD response's Content-Type alone.
    assert containerd.images()[ref(image)] == (imagetree.OCI_MANIFEST, image.digest)
    assert_unpacked(containerd, image)
    assert_files(containerd, ref(image), image)


def test_ctr_pulls_a_layer_over_64_mib(containerd, certs_dirs, standard_tree):
    big = standard_tree.big
    pull_ok(containerd, ref(big), certs_dirs["k3s"], platform=AMD64, timeout=120)

    assert containerd.images()[ref(big)] == (imagetree.OCI_MANIFEST, big.digest)
    # Ingesting verified the layer's digest; unpacking verified its diff_id.
    assert_unpacked(containerd, big)
    with containerd.mounted(ref(big), AMD64) as rootfs:
        assert (rootfs / imagetree.BIG_LAYER_FILE).stat().st_size == imagetree.BIG_LAYER_BYTES


@pytest.mark.parametrize("form", clients.HOSTS_TOML_FORMS)
def test_ctr_docker_io_mirror_gets_the_namespaced_copy(containerd, certs_dirs, standard_tree, form):
    """certs.d/docker.io -> the registry: containerd sends ?ns=docker.io, the tree's
    docker.io/library/busybox answers, not the un-namespaced library/busybox."""
    namespaced, plain = standard_tree.namespaced, standard_tree.unnamespaced_busybox
    assert namespaced.digest != plain.digest
    reference = "docker.io/library/busybox:latest"
    pulled = pull_ok(containerd, reference, certs_dirs[form], platform=AMD64)

    assert "ns=docker.io" in pulled.result.stderr  # --debug logs every request URL
    assert containerd.images()[reference] == (imagetree.OCI_MANIFEST, namespaced.digest)
    assert_unpacked(containerd, namespaced)
    assert_files(containerd, reference, namespaced)


def test_ctr_namespace_with_a_port_picks_its_directory(containerd, tmp_path):
    """`registry.local:5000/team/app` through its mirror: ?ns=registry.local%3A5000 selects
    ROOT/registry.local:5000/team/app over ROOT/team/app."""
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    ported = builder.image("team/app", "1.0", namespace="registry.local:5000",
                           files={"which.txt": b"registry.local:5000 copy\n"})
    builder.image("team/app", "1.0", files={"which.txt": b"un-namespaced copy\n"})
    reference = "registry.local:5000/team/app:1.0"
    with serverproc.running_registry(builder.root) as registry:
        clients.write_hosts_toml(tmp_path / "certs.d", "registry.local:5000", registry.url)
        pulled = pull_ok(containerd, reference, tmp_path / "certs.d", platform=AMD64)
    assert "ns=registry.local%3A5000" in pulled.result.stderr
    assert containerd.images()[reference] == (imagetree.OCI_MANIFEST, ported.digest)
    assert_files(containerd, reference, ported)


def test_ctr_unknown_namespace_falls_back_to_the_plain_tree(containerd, certs_dirs, standard_tree):
    """?ns=bootstrap-registry.airgap names no directory: ROOT/library/busybox answers."""
    plain = standard_tree.unnamespaced_busybox
    pull_ok(containerd, ref(plain), certs_dirs["k3s"], platform=AMD64)

    assert containerd.images()[ref(plain)] == (imagetree.OCI_MANIFEST, plain.digest)
    assert_files(containerd, ref(plain), plain)


def test_ctr_missing_tag_is_a_404_then_the_upstream(containerd, certs_dirs):
    """A miss on the mirror must be a 404 (containerd then tries the next host), never a 5xx.

    containerd 1.6 always appends the registry's own default endpoint, even to a hosts.toml
    without `server` (what K3s writes with --disable-default-registry-endpoint): in an air gap
    the pull then ends on a DNS error for the upstream, not on "not found".
    """
    reference = f"{MIRRORED_HOST}/library/hello:no-such-tag"
    pulled = containerd.pull(reference, certs_dirs["no-default"], platform=AMD64)
    assert not pulled.ok
    mirror_answers = [line for line in pulled.result.stderr.splitlines()
                      if "fetch response received" in line and "127.0.0.1" in line]
    assert mirror_answers and all('response.status="404 Not Found"' in line
                                  for line in mirror_answers), str(pulled)
    assert "trying next host - response was http.StatusNotFound" in pulled.result.stderr
    assert containerd.images() == {}


@pytest.mark.parametrize("form", clients.HOSTS_TOML_FORMS)
def test_ctr_pulls_over_https_with_the_ca_k3s_configures(containerd, tls_registry, tls_certs_dirs,
                                                         standard_tree, form):
    """TLS is the one path where blobs cannot go out by sendfile: pull the big layer through it."""
    assert tls_registry.url.startswith("https://")
    for image in (standard_tree.hello, standard_tree.big):
        pull_ok(containerd, ref(image), tls_certs_dirs[form], platform=AMD64, timeout=120)
        assert containerd.images()[ref(image)] == (imagetree.OCI_MANIFEST, image.digest)
        assert_unpacked(containerd, image)
    assert_files(containerd, ref(standard_tree.hello), standard_tree.hello)


def test_ctr_unpacks_with_the_native_snapshotter_too(certs_dirs, standard_tree):
    """The fallback where overlayfs cannot load (a rootfs on overlay, as in a container)."""
    daemon = clients.start_containerd(snapshotters=("native",))
    try:
        assert daemon.snapshotter == "native"
        hello = standard_tree.hello
        pull_ok(daemon, ref(hello), certs_dirs["k3s"], platform=AMD64)
        assert_unpacked(daemon, hello)
        assert_files(daemon, ref(hello), hello)
    finally:
        daemon.stop()


# ----- skopeo --------------------------------------------------------------------------------

def test_parameters_cover_every_tagged_image(standard_tree):
    items = [getattr(standard_tree, field) for field in imagetree.TAGGED_FIELDS]
    assert [(i.name, i.tag, i.digest, i.namespace) for i in items] == standard_tree.all_tagged()


def _repository(item) -> str:
    return item.repository  # namespaced images are `docker.io/library/busybox` to skopeo


@pytest.mark.parametrize("field", imagetree.TAGGED_FIELDS)
def test_skopeo_inspect_raw_returns_the_stored_bytes(tree_registry, standard_tree, skopeo_available,
                                                     field):
    item = getattr(standard_tree, field)
    for reference in (item.tag, item.digest):
        raw = clients.skopeo_inspect_raw(tree_registry.host_port, _repository(item), reference)
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == item.digest, reference
        assert raw == item.data, reference


@pytest.mark.parametrize("field", imagetree.TAGGED_FIELDS)
def test_skopeo_inspect_reads_config_and_tags(tree_registry, standard_tree, skopeo_available,
                                              field):
    item = getattr(standard_tree, field)
    # For an index skopeo describes one instance: the linux/amd64 one, asked for explicitly.
    image = item.child(AMD64) if isinstance(item, imagetree.Index) else item
    config = json.loads(image.config.data)
    for reference in (item.tag, item.digest):
        info = clients.skopeo_inspect(tree_registry.host_port, _repository(item), reference,
                                      platform=AMD64)
        assert info["Digest"] == item.digest, info  # of what was asked for, index or not
        assert info["Architecture"] == config["architecture"]
        assert info["Os"] == config["os"]
        assert info["Layers"] == [b.digest for b in image.layers]
        assert item.tag in info["RepoTags"]


@pytest.mark.parametrize("field", imagetree.TAGGED_FIELDS)
def test_skopeo_copy_all_keeps_every_digest(tree_registry, standard_tree, skopeo_available,
                                            field, tmp_path):
    item = getattr(standard_tree, field)
    images = item.children if isinstance(item, imagetree.Index) else (item,)
    docker_types = item.media_type in (imagetree.DOCKER_LIST, imagetree.DOCKER_MANIFEST)

    layout = tmp_path / "oci"
    clients.skopeo_copy_all(tree_registry.host_port, _repository(item), item.tag,
                            f"oci:{layout}:{item.tag}", preserve_digests=not docker_types)
    copied = clients.oci_layout_blob_digests(layout)
    assert {layer.digest for image in images for layer in image.layers} <= copied
    if not docker_types:
        assert clients.oci_layout_manifest_digests(layout) == [item.digest]
        assert {image.config.digest for image in images} | {i.digest for i in images} <= copied
    else:
        # An OCI layout cannot hold Docker media types: skopeo converts the manifests and
        # configs (so their digests change), never a layer.
        # dir: keeps any manifest type byte for byte.
        directory = tmp_path / "dir"
        clients.skopeo_copy_all(tree_registry.host_port, _repository(item), item.digest,
                                f"dir:{directory}", preserve_digests=True)
        assert (directory / "manifest.json").read_bytes() == item.data
        for image in images:
            assert (directory / f"{image.digest[7:]}.manifest.json").read_bytes() == image.data


# ----- the registry itself -------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tree_registry", "tls_registry"])
def test_registry_logged_no_traceback(request, which):
    """Runs last in this file: nothing the clients above did may have crashed a handler."""
    registry = request.getfixturevalue(which)
    log = registry.log()
    assert "Traceback" not in log, log[-5000:]
    assert registry.process.poll() is None, "the registry exited"


def test_containerd_logged_no_warning(containerd_daemon):
    """The daemon's whole log: start-up, every ingest and unpack, every garbage collection."""
    assert not clients.problem_lines(containerd_daemon.log()), containerd_daemon.log()[-5000:]
