"""Every endpoint and every refusal, as one table run against the WSGI app in-process.

Each row: what a client asks, and the status and OCI error code (or body) it must get.
"""

import json

import pytest

from minimal_registry.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from wsgicall import app_for, call

MISSING = "sha256:" + "0" * 64
OTHER_ALGORITHM = "sha512:" + "a" * 128


@pytest.fixture(scope="module")
def app(small_tree):
    return app_for(small_tree.root)


@pytest.fixture(scope="module")
def refs(small_tree):
    t = small_tree
    return {
        "hello": t.hello.digest, "hello_layer": t.hello.layers[0].digest, "hello_config": t.hello.config.digest,
        "multiarch": t.multiarch.digest, "arm64": t.multiarch.child("linux/arm64/v8").digest,
        "docker_list": t.docker_list.digest, "deep": t.deep.digest, "plain": t.plain_tag.digest,
        "nomediatype": t.no_media_type.digest, "busybox_ns": t.namespaced.digest,
        "busybox": t.unnamespaced_busybox.digest, "missing": MISSING, "sha512": OTHER_ALGORITHM,
    }


TABLE = [
    # description, method, url, request headers, status, OCI code or None
    ("base endpoint", "GET", "/v2/", {}, 200, None),
    ("base endpoint without slash", "GET", "/v2", {}, 200, None),
    ("manifest by tag", "GET", "/v2/library/hello/manifests/latest", {}, 200, None),
    ("manifest by tag, HEAD", "HEAD", "/v2/library/hello/manifests/latest", {}, 200, None),
    ("manifest by digest", "GET", "/v2/library/hello/manifests/{hello}", {}, 200, None),
    ("manifest with unknown query parameters", "GET", "/v2/library/hello/manifests/latest?x=1&ns=docker.io", {}, 200, None),
    ("manifest whatever Accept says", "GET", "/v2/library/hello/manifests/latest", {"Accept": "text/plain"}, 200, None),
    ("index by tag", "GET", "/v2/rancher/mirrored-pause/manifests/3.6", {}, 200, None),
    ("index child by digest", "GET", "/v2/rancher/mirrored-pause/manifests/{arm64}", {}, 200, None),
    ("docker list", "GET", "/v2/rancher/klipper-helm/manifests/v0.8.0", {}, 200, None),
    ("four-level name", "GET", "/v2/a/b/c/d/manifests/1.0", {}, 200, None),
    ("tag as a plain file", "GET", "/v2/plain/tag/manifests/v1", {}, 200, None),
    ("manifest without mediaType", "GET", "/v2/oci/nomediatype/manifests/v1", {}, 200, None),
    ("unknown tag", "GET", "/v2/library/hello/manifests/nope", {}, 404, "MANIFEST_UNKNOWN"),
    ("unknown tag, HEAD", "HEAD", "/v2/library/hello/manifests/nope", {}, 404, "MANIFEST_UNKNOWN"),
    ("unknown digest", "GET", "/v2/library/hello/manifests/{missing}", {}, 404, "MANIFEST_UNKNOWN"),
    ("invalid tag is 404 (conformance)", "GET", "/v2/library/hello/manifests/.INVALID_MANIFEST_NAME", {}, 404, "MANIFEST_UNKNOWN"),
    ("invalid digest", "GET", "/v2/library/hello/manifests/sha256:xyz", {}, 400, "DIGEST_INVALID"),
    ("other digest algorithm", "GET", "/v2/library/hello/manifests/{sha512}", {}, 404, "MANIFEST_UNKNOWN"),
    ("unknown repository", "GET", "/v2/no/such/manifests/latest", {}, 404, "NAME_UNKNOWN"),
    ("invalid repository name", "GET", "/v2/Library/hello/manifests/latest", {}, 400, "NAME_INVALID"),
    ("blob", "GET", "/v2/library/hello/blobs/{hello_layer}", {}, 200, None),
    ("blob, HEAD", "HEAD", "/v2/library/hello/blobs/{hello_layer}", {}, 200, None),
    ("config blob", "GET", "/v2/library/hello/blobs/{hello_config}", {}, 200, None),
    ("blob through the top-level blobs fallback", "GET", "/v2/a/b/c/d/blobs/{hello_layer}", {}, 200, None),
    ("unknown blob", "GET", "/v2/library/hello/blobs/{missing}", {}, 404, "BLOB_UNKNOWN"),
    ("unknown blob, HEAD", "HEAD", "/v2/library/hello/blobs/{missing}", {}, 404, "BLOB_UNKNOWN"),
    ("blob of another algorithm", "GET", "/v2/library/hello/blobs/{sha512}", {}, 404, "BLOB_UNKNOWN"),
    ("invalid blob digest", "GET", "/v2/library/hello/blobs/latest", {}, 400, "DIGEST_INVALID"),
    ("blob in unknown repository", "GET", "/v2/no/such/blobs/{hello_layer}", {}, 404, "NAME_UNKNOWN"),
    ("blob range", "GET", "/v2/library/hello/blobs/{hello_layer}", {"Range": "bytes=0-0"}, 206, None),
    ("blob range past the end", "GET", "/v2/library/hello/blobs/{hello_layer}", {"Range": "bytes=999999-"}, 416, "RANGE_INVALID"),
    ("blob, If-None-Match", "GET", "/v2/library/hello/blobs/{hello_layer}", {"If-None-Match": '"{hello_layer}"'}, 304, None),
    ("manifest, If-None-Match", "GET", "/v2/library/hello/manifests/latest", {"If-None-Match": '"{hello}"'}, 304, None),
    ("blob, If-None-Match other", "GET", "/v2/library/hello/blobs/{hello_layer}", {"If-None-Match": '"{missing}"'}, 200, None),
    ("tags", "GET", "/v2/library/hello/tags/list", {}, 200, None),
    ("tags of unknown repository", "GET", "/v2/no/such/tags/list", {}, 404, "NAME_UNKNOWN"),
    ("tags with bad n", "GET", "/v2/library/hello/tags/list?n=-1", {}, 400, "UNSUPPORTED"),
    ("tags with a superscript digit as n", "GET", "/v2/library/hello/tags/list?n=%C2%B2", {}, 400, "UNSUPPORTED"),
    ("tags with a 5,000-digit n", "GET", "/v2/library/hello/tags/list?n=" + "9" * 5000, {}, 200, None),
    ("catalog with a superscript digit as n", "GET", "/v2/_catalog?n=%C2%B2", {}, 400, "UNSUPPORTED"),
    ("catalog with a 5,000-digit n", "GET", "/v2/_catalog?n=" + "9" * 5000, {}, 200, None),
    ("blob range of a superscript digit: whole body", "GET", "/v2/library/hello/blobs/{hello_layer}", {"Range": "bytes=\u00b2-"}, 200, None),
    ("blob range of 5,000 digits", "GET", "/v2/library/hello/blobs/{hello_layer}", {"Range": "bytes=" + "9" * 5000 + "-"}, 416, "RANGE_INVALID"),
    ("catalog", "GET", "/v2/_catalog", {}, 200, None),
    ("referrers", "GET", "/v2/library/hello/referrers/{hello}", {}, 200, None),
    ("referrers of invalid digest", "GET", "/v2/library/hello/referrers/nope", {}, 400, "DIGEST_INVALID"),
    ("upload endpoint does not exist", "GET", "/v2/library/hello/blobs/uploads/", {}, 404, "UNSUPPORTED"),
    ("path outside the API", "GET", "/", {}, 404, "UNSUPPORTED"),
    ("traversal in the name", "GET", "/v2/../../etc/manifests/passwd", {}, 400, "NAME_INVALID"),
    ("traversal in the tag", "GET", "/v2/library/hello/manifests/..", {}, 404, "MANIFEST_UNKNOWN"),
    ("traversal in the digest", "GET", "/v2/library/hello/blobs/sha256:../../../etc/passwd", {}, 404, "UNSUPPORTED"),
    ("NUL in the name", "GET", "/v2/library/hel\0lo/manifests/latest", {}, 400, "NAME_INVALID"),
    ("10 kB name", "GET", "/v2/" + "a" * 10240 + "/manifests/latest", {}, 400, "NAME_INVALID"),
    ("PUT a manifest", "PUT", "/v2/library/hello/manifests/latest", {}, 405, "UNSUPPORTED"),
    ("POST an upload", "POST", "/v2/library/hello/blobs/uploads/", {}, 405, "UNSUPPORTED"),
    ("DELETE a blob", "DELETE", "/v2/library/hello/blobs/{hello_layer}", {}, 405, "UNSUPPORTED"),
    ("PATCH", "PATCH", "/v2/library/hello/blobs/uploads/x", {}, 405, "UNSUPPORTED"),
    ("OPTIONS", "OPTIONS", "/v2/", {}, 405, "UNSUPPORTED"),
    ("unknown method", "BREW", "/v2/", {}, 405, "UNSUPPORTED"),
]


@pytest.mark.parametrize("description,method,url,headers,want_status,want_code", TABLE, ids=[r[0] for r in TABLE])
def test_route_table(app, refs, description, method, url, headers, want_status, want_code):
    answer = call(app, method, url.format(**refs), {k: v.format(**refs) for k, v in headers.items()})
    assert answer.status == want_status
    assert answer.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    if want_code:
        assert answer.headers["Content-Type"] == "application/json"
        if method == "HEAD":
            assert answer.body == b""
        else:
            assert int(answer.headers["Content-Length"]) == len(answer.body)
            error = json.loads(answer.body)["errors"][0]
            assert error["code"] == want_code and error["message"]
    if want_status == 405:
        assert answer.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("path,attr,media_type", [
    ("/v2/library/hello/manifests/latest", "hello", OCI_MANIFEST),
    ("/v2/rancher/mirrored-pause/manifests/3.6", "multiarch", OCI_INDEX),
    ("/v2/rancher/klipper-helm/manifests/v0.8.0", "docker_list", DOCKER_LIST),
    ("/v2/plain/tag/manifests/v1", "plain_tag", OCI_MANIFEST),
    ("/v2/oci/nomediatype/manifests/v1", "no_media_type", OCI_MANIFEST),
    ("/v2/a/b/c/d/manifests/1.0", "deep", OCI_MANIFEST),
])
def test_manifest_headers_are_identical_for_head_and_get(app, small_tree, path, attr, media_type):
    stored = getattr(small_tree, attr)
    get = call(app, "GET", path, {"Accept": "application/vnd.oci.image.manifest.v1+json, */*"})
    head = call(app, "HEAD", path)
    assert get.body == stored.data
    assert head.body == b""
    for answer in (get, head):
        assert answer.headers["Content-Type"] == media_type
        assert answer.headers["Content-Length"] == str(len(stored.data))
        assert answer.headers["Docker-Content-Digest"] == stored.digest
        assert answer.headers["ETag"] == f'"{stored.digest}"'
    assert {k: v for k, v in get.headers.items()} == {k: v for k, v in head.headers.items()}


def test_docker_schema2_child_has_its_own_media_type(app, small_tree):
    child = small_tree.docker_list.children[0]
    answer = call(app, "GET", f"/v2/rancher/klipper-helm/manifests/{child.digest}")
    assert answer.headers["Content-Type"] == DOCKER_MANIFEST
    assert answer.body == child.data


def test_blob_headers(app, small_tree):
    layer = small_tree.hello.layers[0]
    get = call(app, "GET", f"/v2/library/hello/blobs/{layer.digest}")
    head = call(app, "HEAD", f"/v2/library/hello/blobs/{layer.digest}")
    assert get.body == layer.data and head.body == b""
    for answer in (get, head):
        assert answer.headers["Content-Length"] == str(layer.size)
        assert answer.headers["Content-Type"] == "application/octet-stream"
        assert answer.headers["Docker-Content-Digest"] == layer.digest
        assert answer.headers["ETag"] == f'"{layer.digest}"'
        assert answer.headers["Accept-Ranges"] == "bytes"
        assert "Content-Encoding" not in answer.headers and "Transfer-Encoding" not in answer.headers


def test_namespace_selects_the_upstream_copy(app, small_tree):
    with_ns = call(app, "GET", "/v2/library/busybox/manifests/latest?ns=docker.io")
    without = call(app, "GET", "/v2/library/busybox/manifests/latest")
    other_ns = call(app, "GET", "/v2/library/busybox/manifests/latest?ns=ghcr.io")
    assert with_ns.headers["Docker-Content-Digest"] == small_tree.namespaced.digest
    assert without.headers["Docker-Content-Digest"] == small_tree.unnamespaced_busybox.digest
    # An upstream the tree has no folder for falls back to the un-namespaced repository.
    assert other_ns.headers["Docker-Content-Digest"] == small_tree.unnamespaced_busybox.digest


def test_namespace_that_is_not_a_host_is_ignored(app, small_tree):
    answer = call(app, "GET", "/v2/library/hello/manifests/latest?ns=../../etc")
    assert answer.status == 200 and answer.headers["Docker-Content-Digest"] == small_tree.hello.digest


def test_namespaced_blob_resolves_through_the_blobs_links(app, small_tree):
    layer = small_tree.namespaced.layers[0]
    answer = call(app, "GET", f"/v2/library/busybox/blobs/{layer.digest}?ns=docker.io")
    assert answer.status == 200 and answer.body == layer.data


def test_tags_are_sorted_and_paged(app):
    everything = call(app, "GET", "/v2/library/hello/tags/list").json()
    assert everything == {"name": "library/hello", "tags": ["latest"]}
    first = call(app, "GET", "/v2/rancher/mirrored-pause/tags/list?n=0")
    assert first.json()["tags"] == []


def test_catalog_lists_every_repository_sorted_with_paging(app):
    names = call(app, "GET", "/v2/_catalog").json()["repositories"]
    assert names == sorted(names)
    assert {"library/hello", "a/b/c/d", "docker.io/library/busybox", "rancher/mirrored-pause"} <= set(names)
    first = call(app, "GET", "/v2/_catalog?n=2")
    assert first.json()["repositories"] == names[:2]
    assert first.headers["Link"] == f'</v2/_catalog?n=2&last={names[1]}>; rel="next"'
    second = call(app, "GET", f"/v2/_catalog?n=2&last={names[1]}")
    assert second.json()["repositories"] == names[2:4]
    last_page = call(app, "GET", f"/v2/_catalog?n=100&last={names[1]}")
    assert last_page.json()["repositories"] == names[2:] and "Link" not in last_page.headers


def test_referrers_empty_index(app, small_tree):
    answer = call(app, "GET", f"/v2/library/hello/referrers/{small_tree.hello.digest}")
    assert answer.headers["Content-Type"] == OCI_INDEX
    assert answer.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
