"""The content tree as the server reads it: live changes, the manifest cache, integrity, safety."""

import json
import os
import shutil

import pytest

from imagetree import TreeBuilder, canonical_json, sha256_digest
from minimal_registry.manifest import OCI_INDEX, OCI_MANIFEST
from minimal_registry import storage
from minimal_registry.storage import ContentTree
from wsgicall import call
from minimal_registry.app import RegistryApp


@pytest.fixture
def builder(tmp_path):
    return TreeBuilder(tmp_path / "registry")


def digest_of(app, path):
    answer = call(app, "HEAD", path)
    return answer.status, answer.headers.get("Docker-Content-Digest")


def test_repeated_manifest_requests_read_and_hash_the_file_once(builder, monkeypatch):
    image = builder.image("library/hello", "latest")
    # Files this new are read again until they settle (test_tree_changes): here they count as old.
    monkeypatch.setattr(storage, "SETTLE_SECONDS", 0.0)
    tree = ContentTree(builder.root)
    app = RegistryApp(tree)
    for _ in range(5):
        assert digest_of(app, "/v2/library/hello/manifests/latest") == (200, image.digest)
        assert digest_of(app, f"/v2/library/hello/manifests/{image.digest}") == (200, image.digest)
    assert tree.manifests.loads == 1  # the tag and the digest name one file: one read, one hash


def test_a_re_pointed_tag_is_served_at_once(builder):
    first = builder.image("app", "v1", files={"v": b"1"})
    app = RegistryApp(ContentTree(builder.root))
    assert digest_of(app, "/v2/app/manifests/v1") == (200, first.digest)
    second = builder.image("app", "v2", files={"v": b"2"})
    tag = builder.root / "app/manifests/v1"
    os.symlink(second.digest, builder.root / "app/manifests/.v1.tmp")
    os.replace(builder.root / "app/manifests/.v1.tmp", tag)
    assert digest_of(app, "/v2/app/manifests/v1") == (200, second.digest)


def test_a_plain_tag_file_replaced_by_rename_is_served_at_once(builder):
    first = builder.image("app", "v1", tag_as_copy=True, files={"v": b"1"})
    app = RegistryApp(ContentTree(builder.root))
    assert digest_of(app, "/v2/app/manifests/v1") == (200, first.digest)
    second = builder.image("app", None, files={"v": b"2"})
    (builder.root / "app/manifests/.new").write_bytes(second.data)
    os.replace(builder.root / "app/manifests/.new", builder.root / "app/manifests/v1")
    assert digest_of(app, "/v2/app/manifests/v1") == (200, second.digest)


def test_content_added_after_start_is_found(builder):
    builder.image("first", "v1")
    app = RegistryApp(ContentTree(builder.root))
    assert call(app, "GET", "/v2/later/manifests/v1").status == 404
    later = builder.image("later", "v1")
    assert digest_of(app, "/v2/later/manifests/v1") == (200, later.digest)
    assert call(app, "GET", f"/v2/later/blobs/{later.layers[0].digest}").body == later.layers[0].data


def test_a_corrupt_manifest_is_refused_not_served(builder, caplog):
    image = builder.image("app", "v1")
    path = builder.root / "app/manifests" / image.digest
    path.write_bytes(image.data.replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    app = RegistryApp(ContentTree(builder.root))
    for url in ("/v2/app/manifests/v1", f"/v2/app/manifests/{image.digest}"):
        answer = call(app, "GET", url)
        assert answer.status == 404 and answer.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert b"corrupt" in answer.body
    assert "its sha256 is" in caplog.text


@pytest.mark.parametrize("content,why", [
    (b"this is not json", b"not JSON"),
    (b"[1, 2]", b"not a JSON object"),
    (b'{"schemaVersion": 2}', b"no mediaType"),
])
def test_a_file_that_is_not_a_manifest_is_refused(builder, content, why):
    builder.image("app", "v1")
    (builder.root / "app/manifests/broken").write_bytes(content)
    answer = call(RegistryApp(ContentTree(builder.root)), "GET", "/v2/app/manifests/broken")
    assert answer.status == 404 and why in answer.body


def test_a_manifest_over_4_mib_is_refused(builder):
    builder.image("app", "v1")
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": [],
                "annotations": {"pad": "x" * (4 * 1024 * 1024)}}
    (builder.root / "app/manifests/huge").write_bytes(json.dumps(document).encode())
    answer = call(RegistryApp(ContentTree(builder.root)), "GET", "/v2/app/manifests/huge")
    assert answer.status == 404 and b"4 MiB" in answer.body


def test_a_symlink_out_of_the_tree_is_not_followed(builder, tmp_path):
    image = builder.image("app", "v1")
    secret = tmp_path / "secret"
    secret.write_text('{"schemaVersion":2,"manifests":[]}')
    os.symlink(secret, builder.root / "app/manifests/leak")
    fake = "sha256:" + "1" * 64
    os.symlink(secret, builder.root / "blobs" / fake)
    os.symlink(tmp_path, builder.root / "escape")  # a whole directory link
    (tmp_path / "manifests").mkdir()
    os.symlink(secret, tmp_path / "manifests" / "v1")
    app = RegistryApp(ContentTree(builder.root))
    assert call(app, "GET", "/v2/app/manifests/leak").status == 404
    assert call(app, "GET", f"/v2/app/blobs/{fake}").status == 404
    assert call(app, "GET", "/v2/escape/manifests/v1").status == 404
    assert call(app, "GET", f"/v2/app/blobs/{image.layers[0].digest}").status == 200


def test_top_level_blobs_may_live_on_another_disk(builder, tmp_path):
    image = builder.image("app", "v1")
    elsewhere = tmp_path / "other-disk-blobs"
    shutil.move(str(builder.root / "blobs"), elsewhere)
    os.symlink(elsewhere, builder.root / "blobs")
    app = RegistryApp(ContentTree(builder.root))
    answer = call(app, "GET", f"/v2/app/blobs/{image.layers[0].digest}")
    assert answer.status == 200 and answer.body == image.layers[0].data


def test_a_fifo_named_like_a_blob_is_not_opened(builder):
    builder.image("app", "v1")
    fifo = "sha256:" + "2" * 64
    os.mkfifo(builder.root / "blobs" / fifo)
    assert call(RegistryApp(ContentTree(builder.root)), "GET", f"/v2/app/blobs/{fifo}").status == 404


def test_referrers_list_manifests_whose_subject_is_the_digest(builder):
    image = builder.image("app", "v1")
    config = builder.write_blob(b"{}", "application/vnd.example.sbom")
    referrer = canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.digest, "size": config.size},
        "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.size},
        "annotations": {"org.example": "yes"},
    })
    digest = sha256_digest(referrer)
    (builder.root / "app/manifests" / digest).write_bytes(referrer)
    app = RegistryApp(ContentTree(builder.root))
    answer = call(app, "GET", f"/v2/app/referrers/{image.digest}")
    assert answer.headers["Content-Type"] == OCI_INDEX
    assert answer.json()["manifests"] == [{
        "mediaType": OCI_MANIFEST, "digest": digest, "size": len(referrer),
        "artifactType": "application/vnd.example.sbom", "annotations": {"org.example": "yes"},
    }]
    filtered = call(app, "GET", f"/v2/app/referrers/{image.digest}?artifactType=application/other")
    assert filtered.json()["manifests"] == [] and filtered.headers["OCI-Filters-Applied"] == "artifactType"
    kept = call(app, "GET", f"/v2/app/referrers/{image.digest}?artifactType=application/vnd.example.sbom")
    assert len(kept.json()["manifests"]) == 1


def test_tags_are_paged_with_a_link_to_the_next_page(builder):
    image = builder.image("app", "v1")
    for tag in ("v2", "v3", "latest"):
        os.symlink(image.digest, builder.root / "app/manifests" / tag)
    app = RegistryApp(ContentTree(builder.root))
    first = call(app, "GET", "/v2/app/tags/list?n=2")
    assert first.json() == {"name": "app", "tags": ["latest", "v1"]}
    assert first.headers["Link"] == '</v2/app/tags/list?n=2&last=v1>; rel="next"'
    second = call(app, "GET", "/v2/app/tags/list?n=2&last=v1")
    assert second.json()["tags"] == ["v2", "v3"] and "Link" not in second.headers


def count_looks(monkeypatch):
    """Count the file-system looks (stat, lstat, readlink, open) the storage layer makes."""
    counts = {"n": 0}
    for module, names in ((storage.os, ("stat", "lstat", "readlink", "open", "fstat")),
                          (storage.os.path, ("isdir",))):
        for fname in names:
            real = getattr(module, fname)

            def counted(*args, _real=real, **kwargs):
                counts["n"] += 1
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, fname, counted)
    return counts


def test_a_repeated_blob_lookup_costs_two_stats(builder, monkeypatch):
    image = builder.image("library/hello", "latest")
    layer = image.layers[0]
    tree = ContentTree(builder.root)
    first = tree.blob("library/hello", layer.digest)
    counts = count_looks(monkeypatch)
    again = tree.blob("library/hello", layer.digest)
    monkeypatch.undo()
    assert again == first
    # The repository still there, the file still the same: not a walk of the path each time.
    assert counts["n"] <= 2


def test_a_blob_replaced_after_lookup_is_looked_up_again(builder):
    image = builder.image("app", "v1", files={"a": b"1"})
    layer = image.layers[0]
    app = RegistryApp(ContentTree(builder.root))
    assert call(app, "GET", f"/v2/app/blobs/{layer.digest}").body == layer.data
    blob = builder.root / "blobs" / layer.digest
    blob.unlink()
    os.mkfifo(blob)
    assert call(app, "GET", f"/v2/app/blobs/{layer.digest}").status == 404
    blob.unlink()
    blob.write_bytes(layer.data)
    assert call(app, "GET", f"/v2/app/blobs/{layer.digest}").body == layer.data
    shutil.rmtree(builder.root / "app")
    assert call(app, "GET", f"/v2/app/blobs/{layer.digest}").status == 404
