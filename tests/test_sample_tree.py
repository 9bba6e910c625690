"""The sample tree the README serves is what the builder makes, and it serves."""

import filecmp
import os

from httpraw import request
from sample_tree import SAMPLE_DIR, build_sample_tree
from serverproc import running_registry


def listing(root):
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            entries[relative] = os.readlink(path) if os.path.islink(path) else (None if os.path.isdir(path) else os.path.getsize(path))
    return entries


def test_committed_sample_is_exactly_what_the_builder_makes(tmp_path):
    build_sample_tree(tmp_path / "sample")
    assert listing(SAMPLE_DIR) == listing(tmp_path / "sample")
    for relative, value in listing(SAMPLE_DIR).items():
        if isinstance(value, int):
            assert filecmp.cmp(SAMPLE_DIR / relative, tmp_path / "sample" / relative, shallow=False), relative


def test_sample_serves_its_index_by_both_tags(tmp_path):
    with running_registry(SAMPLE_DIR, log_path=tmp_path / "registry.log") as registry:
        latest = request(registry, "GET", "/v2/library/hello/manifests/latest")
        pinned = request(registry, "GET", "/v2/library/hello/manifests/1.0")
        assert latest[0] == pinned[0] == 200
        assert latest[1]["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        assert latest[1]["Docker-Content-Digest"] == pinned[1]["Docker-Content-Digest"]


def test_the_readme_ctr_pull_of_the_sample_works(tmp_path, containerd):
    """The README's `ctr images pull --hosts-dir ...` against the sample tree, for real."""
    import clients
    from sample_tree import README

    with running_registry(SAMPLE_DIR, log_path=tmp_path / "registry.log") as registry:
        certs_d = tmp_path / "certs.d"
        clients.write_hosts_toml(certs_d, "bootstrap-registry.airgap", registry.url)
        pulled = containerd.pull("bootstrap-registry.airgap/library/hello:latest", certs_d)
        assert pulled.ok, pulled
        platform = "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
        files = containerd.read_files("bootstrap-registry.airgap/library/hello:latest", platform, ["hello.txt"])
        assert files["hello.txt"] == README
