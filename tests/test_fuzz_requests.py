"""Whatever a client sends, the app answers with a 2xx-4xx and, for errors, an OCI JSON body.

Hypothesis generates paths from the registry's own vocabulary (API words, names, tags,
digests, traversal pieces, encodings, control characters) and arbitrary methods and headers.
"""

import json
import os
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings, strategies as st

from wsgicall import app_for, call

PIECES = st.sampled_from([
    "v2", "", "library", "hello", "manifests", "blobs", "tags", "list", "referrers", "_catalog",
    "latest", "sha256:" + "0" * 64, "sha256:", "sha512:" + "a" * 128, "..", ".", "%2e%2e", "%2f",
    "\x00", "\\", "uploads", "docker.io", "a" * 300, "Ünïcode", "blobs -> ../blobs", "~", "*",
])
SEGMENTS = st.one_of(PIECES, st.text(min_size=0, max_size=20))
PATHS = st.lists(SEGMENTS, min_size=0, max_size=8).map(lambda parts: "/" + "/".join(parts))
METHODS = st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"])
# Digits int() accepts but HTTP does not (superscripts, Arabic-Indic, fullwidth), and numbers
# longer than int() parses: the ways a client number used to become a 500.
ODD_DIGITS = st.sampled_from(["\u00b2", "\u0661", "\uff11", "\u0e51", "9" * 5000, "0" * 5000 + "1", "1"])
NUMBERS = st.lists(ODD_DIGITS, min_size=1, max_size=3).map("".join)
RANGES = st.one_of(
    NUMBERS.map(lambda n: f"bytes={n}-"), NUMBERS.map(lambda n: f"bytes=-{n}"),
    st.tuples(NUMBERS, NUMBERS).map(lambda pair: f"bytes={pair[0]}-{pair[1]}"),
)
HEADER_VALUES = st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                          RANGES.map(lambda value: value.encode().decode("latin-1")))
HEADERS = st.dictionaries(st.sampled_from(["Range", "If-None-Match", "If-Range", "Accept"]), HEADER_VALUES,
                          max_size=4)
QUERIES = st.dictionaries(st.sampled_from(["ns", "n", "last", "artifactType", "x"]),
                          st.one_of(st.text(max_size=30), NUMBERS), max_size=4)


@pytest.fixture(scope="module")
def app(small_tree):
    return app_for(small_tree.root)


@settings(max_examples=600, deadline=None)
@given(method=METHODS, path=PATHS, query=QUERIES, headers=HEADERS)
def test_no_request_gets_a_server_error(app, method, path, query, headers):
    answer = call(app, method, path + ("?" + urlencode(query) if query else ""), headers)
    assert 200 <= answer.status < 500
    if answer.status >= 400 and method != "HEAD":
        error = json.loads(answer.body)["errors"][0]
        assert error["code"] and error["message"]
    if answer.status != 304 and method != "HEAD":
        assert int(answer.headers["Content-Length"]) == len(answer.body)


@settings(max_examples=200, deadline=None)
@given(range_header=RANGES, number=NUMBERS, where=st.sampled_from(["blob", "catalog", "tags"]))
def test_client_numbers_never_get_a_server_error(app, small_tree, range_header, number, where):
    """Range bounds and ?n= on the endpoints that read them, with every kind of odd digit."""
    layer = small_tree.hello.layers[0]
    if where == "blob":
        answer = call(app, "GET", f"/v2/library/hello/blobs/{layer.digest}", {"Range": range_header.encode().decode("latin-1")})
        assert answer.status in (200, 206, 416)
        if answer.status == 200:
            assert answer.body == layer.data
    else:
        path = "/v2/_catalog" if where == "catalog" else "/v2/library/hello/tags/list"
        answer = call(app, "GET", f"{path}?{urlencode({'n': number})}")
        assert answer.status in (200, 400)
        assert json.loads(answer.body)

# --- stored manifests: whatever bytes a file holds, parse() says "not a manifest" or gives a
# manifest whose media type can go into a header as it is.

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=20)
MEDIA_TYPES = st.one_of(st.text(max_size=40), st.sampled_from([
    "application/vnd.oci.image.manifest.v1+json", "a/b\r\nX-Injected: 1", "application/\u00e9", "\u0100/x", "",
]))


def nested(depth: int, as_object: bool) -> bytes:
    """JSON nested `depth` deep: past Python's recursion limit, json.loads raises RecursionError."""
    if as_object:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"]" * depth


@settings(max_examples=300, deadline=None)
@given(media_type=MEDIA_TYPES, extra=st.dictionaries(
    st.sampled_from(["manifests", "config", "layers", "subject", "annotations", "artifactType", "schemaVersion"]),
    JSON_VALUES, max_size=5), depth=st.sampled_from([0, 10, 999, 5_000, 200_000]), as_object=st.booleans())
def test_stored_manifest_bytes_are_a_manifest_or_not_a_manifest_never_an_exception(media_type, extra, depth,
                                                                                   as_object):
    from minimal_registry import manifest

    document = dict(extra, mediaType=media_type)
    if depth:
        document["annotations"] = "PLACEHOLDER"
    body = json.dumps(document).encode()
    if depth:
        body = body.replace(b'"PLACEHOLDER"', nested(depth, as_object))
    try:
        parsed = manifest.parse(body)
    except manifest.NotAManifest as refusal:
        assert "\n" not in str(refusal)
        return
    parsed.media_type.encode("latin-1")
    assert parsed.media_type.isprintable() and parsed.media_type.isascii() and " " not in parsed.media_type
    for text in parsed.annotations.values():
        assert isinstance(text, str)



@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory):
    from imagetree import TreeBuilder

    builder = TreeBuilder(tmp_path_factory.mktemp("fuzz") / "registry")
    image = builder.image("app", "v1")
    return builder.root, image


@settings(max_examples=150, deadline=None)
@given(media_type=MEDIA_TYPES, extra=st.dictionaries(
    st.sampled_from(["manifests", "config", "layers", "annotations", "artifactType"]), JSON_VALUES, max_size=4),
    depth=st.sampled_from([0, 999, 5_000, 200_000]), as_object=st.booleans())
def test_whatever_a_stored_manifest_holds_the_server_answers_without_a_server_error(
        fuzz_tree, media_type, extra, depth, as_object):
    """The same bytes served: by tag, by digest, HEAD, and referrers of the repository."""
    from imagetree import sha256_digest

    root, image = fuzz_tree
    document = dict(extra, mediaType=media_type,
                    subject={"mediaType": image.media_type, "digest": image.digest, "size": image.size})
    if depth:
        document["annotations"] = "PLACEHOLDER"
    body = json.dumps(document).encode()
    if depth:
        body = body.replace(b'"PLACEHOLDER"', nested(depth, as_object))
    digest = sha256_digest(body)
    (root / "app/manifests" / digest).write_bytes(body)
    (root / "app/manifests/fuzz").write_bytes(body)
    app = app_for(root)
    try:
        for method, url in (("GET", "/v2/app/manifests/fuzz"), ("HEAD", f"/v2/app/manifests/{digest}"),
                            ("GET", f"/v2/app/referrers/{image.digest}")):
            answer = call(app, method, url)
            assert answer.status in (200, 404), (url, answer)
            for name, value in answer.headers.items():
                value.encode("latin-1")
                assert "\r" not in value and "\n" not in value
            if answer.status == 200 and url.endswith("fuzz"):
                assert answer.body == body and answer.headers["Docker-Content-Digest"] == digest
    finally:
        os.unlink(root / "app/manifests" / digest)
