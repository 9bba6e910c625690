"""Whatever a client sends, the app answers with a 2xx-4xx and, for errors, an OCI JSON body.

Hypothesis generates paths from the registry's own vocabulary (API words, names, tags,
digests, traversal pieces, encodings, control characters) and arbitrary methods and headers.
"""

import json
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
QUERIES = st.dictionaries(st.sampled_from(["ns", "n", "last", "artifactType", "x"]),
                          st.text(max_size=30), max_size=4)
METHODS = st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"])
HEADERS = st.dictionaries(st.sampled_from(["Range", "If-None-Match", "If-Range", "Accept"]),
                          st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                          max_size=4)


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
