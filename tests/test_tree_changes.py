"""The tree changes under a running server: every answer is the tree as it is now, never a stale
or half-old one, and a passing failure to read is never remembered as "not there".

In-process (the WSGI app called as a function), so each race can be staged exactly.
"""

import errno
import json
import os
import threading
import time

import pytest

from imagetree import OCI_MANIFEST, TreeBuilder, canonical_json, sha256_digest
from minimal_registry import storage
from minimal_registry.app import RegistryApp
from minimal_registry.storage import ContentTree
from wsgicall import call


@pytest.fixture
def builder(tmp_path):
    return TreeBuilder(tmp_path / "registry")


def same_size_manifests(builder, name):
    """Two different manifests of exactly the same size, stored under their digests."""
    image = builder.image(name, "base")
    versions = []
    for letter in "ab":
        data = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": image.config.media_type, "digest": image.config.digest,
                                          "size": image.config.size},
                               "layers": [], "annotations": {"version": letter}})
        digest = sha256_digest(data)
        (builder.root / name / "manifests" / digest).write_bytes(data)
        versions.append((data, digest))
    assert len(versions[0][0]) == len(versions[1][0])
    return versions


def served(app, url):
    answer = call(app, "GET", url)
    return answer.status, answer.headers.get("Docker-Content-Digest"), answer.body


# "settled": the cache trusts files at once (SETTLE_SECONDS = 0) and the clock ticks before the
# change, so only the file's ctime can show it. "fresh": as it runs, everything just written.
SETTLE_CASES = pytest.mark.parametrize("settle", ["fresh", "settled"])


def settle_first(monkeypatch, settle):
    if settle == "settled":
        monkeypatch.setattr(storage, "SETTLE_SECONDS", 0.0)


def let_the_clock_tick(settle):
    if settle == "settled":
        time.sleep(0.05)  # file times come from a clock that ticks every 1-10 ms


FIXED_MTIME_NS = 1_600_000_000_000_000_000


def served_as_a_plain_tag(builder, monkeypatch, settle):
    """A plain-file tag `app:v1` served once with the first of two same-size manifests:
    (app, the tag's path, (the second manifest's bytes, its digest)) for the change to come."""
    settle_first(monkeypatch, settle)
    (old, old_digest), second = same_size_manifests(builder, "app")
    tag = builder.root / "app/manifests/v1"
    tag.write_bytes(old)
    os.utime(tag, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))
    app = RegistryApp(ContentTree(builder.root))
    assert served(app, "/v2/app/manifests/v1")[:2] == (200, old_digest)
    return app, tag, second


@SETTLE_CASES
def test_a_tag_file_rewritten_in_place_with_the_same_size_and_mtime_is_served_at_once(builder, monkeypatch, settle):
    app, tag, (new, new_digest) = served_as_a_plain_tag(builder, monkeypatch, settle)

    # What `cp -p`, `rsync -t` and `tar --mtime` do: same inode, same size, same mtime.
    let_the_clock_tick(settle)
    with open(tag, "r+b") as file:
        file.write(new)
    os.utime(tag, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))

    status, digest, body = served(app, "/v2/app/manifests/v1")
    assert (status, digest) == (200, new_digest) and body == new


@SETTLE_CASES
def test_a_tag_file_deleted_and_re_created_with_the_same_size_and_mtime_is_served_at_once(builder, monkeypatch,
                                                                                          settle):
    app, tag, (new, new_digest) = served_as_a_plain_tag(builder, monkeypatch, settle)

    let_the_clock_tick(settle)
    tag.unlink()  # ext4 hands the freed inode to the next file at once
    tag.write_bytes(new)
    os.utime(tag, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))

    status, digest, body = served(app, "/v2/app/manifests/v1")
    assert (status, digest) == (200, new_digest) and body == new


def test_a_settled_manifest_is_read_once_and_then_validated_by_one_stat(builder, monkeypatch):
    image = builder.image("app", "v1")
    tree = ContentTree(builder.root)
    monkeypatch.setattr(storage, "SETTLE_SECONDS", 0.0)  # the files are old enough for the test
    app = RegistryApp(tree)
    assert served(app, "/v2/app/manifests/v1")[:2] == (200, image.digest)

    calls = []
    for name in ("stat", "lstat", "readlink", "open", "listdir", "scandir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for _ in range(3):
        assert served(app, "/v2/app/manifests/v1")[:2] == (200, image.digest)
    assert calls == ["stat"] * 3, calls


def test_a_recently_changed_manifest_is_read_again_until_it_settles(builder, monkeypatch):
    """A rewrite within the clock tick of the previous one keeps the ctime: a file changed
    less than SETTLE_SECONDS before it was read is not trusted from the cache."""
    monkeypatch.setattr(storage, "SETTLE_SECONDS", 3600.0)  # however slow this machine is today
    image = builder.image("app", "v1")
    tree = ContentTree(builder.root)
    app = RegistryApp(tree)
    for _ in range(3):
        assert served(app, "/v2/app/manifests/v1")[:2] == (200, image.digest)
    assert tree.manifests.loads == 3


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.EIO, errno.EACCES, errno.ENOMEM])
def test_a_failure_to_read_a_manifest_is_a_503_and_is_not_remembered(builder, monkeypatch, caplog, code):
    monkeypatch.setattr(storage, "SETTLE_SECONDS", 0.0)  # a remembered verdict would be used at once
    image = builder.image("app", "v1")
    app = RegistryApp(ContentTree(builder.root))
    real_open = os.open
    failures = []

    def failing_open(path, *args, **kwargs):
        if str(path).endswith(image.digest):
            failures.append(path)
            raise OSError(code, os.strerror(code), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    for _ in range(3):
        answer = call(app, "GET", "/v2/app/manifests/v1")
        assert answer.status == 503, answer
        assert answer.headers["Retry-After"].isdigit()
        assert answer.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert len(failures) == 3  # tried again each time, not remembered
    assert caplog.text.count(os.strerror(code)) == 1  # logged once per cause

    monkeypatch.setattr(os, "open", real_open)
    assert served(app, "/v2/app/manifests/v1")[:2] == (200, image.digest)


def test_a_failure_to_open_a_blob_is_a_503_not_a_404(builder, monkeypatch, caplog):
    image = builder.image("app", "v1")
    layer = image.layers[0]
    app = RegistryApp(ContentTree(builder.root))
    real_open = os.open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith(layer.digest):
            raise OSError(errno.EMFILE, "Too many open files", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    for _ in range(3):
        answer = call(app, "GET", f"/v2/app/blobs/{layer.digest}")
        assert answer.status == 503 and answer.headers["Retry-After"].isdigit()
        assert answer.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert caplog.text.count("Too many open files") == 1
    monkeypatch.setattr(os, "open", real_open)
    answer = call(app, "GET", f"/v2/app/blobs/{layer.digest}")
    assert answer.status == 200 and answer.body == layer.data


def test_a_tag_re_pointed_between_two_reads_is_served_wholly_old_or_wholly_new(builder, monkeypatch, caplog):
    """The tag link is read once per request: a re-point in the middle of a lookup cannot
    pair one manifest's bytes with the other's digest."""
    first = builder.image("app", "v1", files={"v": b"1"})
    second = builder.image("app", "v2", files={"v": b"2"})
    tag = builder.root / "app/manifests/v1"
    app = RegistryApp(ContentTree(builder.root))
    real_readlink = os.readlink

    def readlink_then_re_point(path, *args, **kwargs):
        target = real_readlink(path, *args, **kwargs)
        if str(path) == str(tag) or str(path).endswith("/app/manifests/v1"):
            current = real_readlink(tag)
            os.symlink(second.digest if current == first.digest else first.digest, f"{tag}.new")
            os.replace(f"{tag}.new", tag)
        return target

    monkeypatch.setattr(os, "readlink", readlink_then_re_point)
    for _ in range(4):
        status, digest, body = served(app, "/v2/app/manifests/v1")
        assert status == 200
        assert digest in (first.digest, second.digest) and sha256_digest(body) == digest
    assert "corrupt" not in caplog.text and "its sha256 is" not in caplog.text


def test_listings_do_not_follow_a_repository_or_its_manifests_out_of_the_tree(builder, tmp_path):
    builder.image("app", "v1")
    outside = tmp_path / "etc"
    (outside / "manifests").mkdir(parents=True)
    for name in ("passwd", "shadow"):
        (outside / name).write_text("secret")
        (outside / "manifests" / name).write_text("secret")
    os.symlink(outside, builder.root / "linked")  # a whole repository directory
    (builder.root / "linkedmanifests").mkdir()
    os.symlink(outside, builder.root / "linkedmanifests/manifests")  # only its manifests/
    app = RegistryApp(ContentTree(builder.root))

    for name in ("linked", "linkedmanifests"):
        answer = call(app, "GET", f"/v2/{name}/tags/list")
        assert answer.status == 404 and answer.json()["errors"][0]["code"] == "NAME_UNKNOWN", answer
        assert b"passwd" not in answer.body
        assert call(app, "GET", f"/v2/{name}/manifests/passwd").status == 404
    assert call(app, "GET", "/v2/_catalog").json() == {"repositories": ["app"]}


def test_a_manifest_inside_the_tree_reached_through_an_inner_link_is_served(builder):
    image = builder.image("app", "v1")
    os.symlink("app", builder.root / "alias")  # a repository directory linked inside the tree
    app = RegistryApp(ContentTree(builder.root))
    assert served(app, "/v2/alias/manifests/v1")[:2] == (200, image.digest)
    assert call(app, "GET", "/v2/alias/tags/list").json()["tags"] == ["v1"]


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body,why", [
    (DEEP, b"nested too deeply"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"nested too deeply"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.\u00e9", "manifests": []}).encode(), b"mediaType"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/x\r\nX-Injected: 1", "manifests": []}).encode(), b"mediaType"),
    (json.dumps({"schemaVersion": 2, "mediaType": "text/plain\u0100", "manifests": []}).encode(), b"mediaType"),
])
def test_a_manifest_that_parses_but_cannot_be_served_is_not_a_manifest(builder, caplog, body, why):
    image = builder.image("app", "v1")
    digest = sha256_digest(body)
    (builder.root / "app/manifests" / digest).write_bytes(body)
    os.symlink(digest, builder.root / "app/manifests/odd")
    app = RegistryApp(ContentTree(builder.root))
    for url in ("/v2/app/manifests/odd", f"/v2/app/manifests/{digest}"):
        answer = call(app, "GET", url)
        assert answer.status == 404 and answer.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert why in answer.body
    referrers = call(app, "GET", f"/v2/app/referrers/{image.digest}")
    assert referrers.status == 200 and referrers.json()["manifests"] == []
    refusals = [r for r in caplog.records if "not a manifest" in r.getMessage()]
    assert len(refusals) == 1 and "\n" not in refusals[0].getMessage()


def test_annotations_that_are_not_strings_do_not_break_referrers(builder):
    image = builder.image("app", "v1")
    nested = {"x": None}
    for _ in range(5000):
        nested = {"x": nested}
    referrer = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
        "mediaType": "application/vnd.oci.empty.v1+json", "digest": image.config.digest, "size": image.config.size},
        "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.size},
        "annotations": {"ok": "yes", "deep": [[["x"]]]}}).encode()
    (builder.root / "app/manifests" / sha256_digest(referrer)).write_bytes(referrer)
    answer = call(RegistryApp(ContentTree(builder.root)), "GET", f"/v2/app/referrers/{image.digest}")
    assert answer.status == 200
    assert answer.json()["manifests"][0]["annotations"] == {"ok": "yes"}


def test_the_catalog_walk_is_done_once_for_many_calls_and_sees_new_repositories(builder):
    for index in range(300):
        (builder.root / f"repo{index:04d}" / "manifests").mkdir(parents=True)
        for extra in range(3):
            (builder.root / f"repo{index:04d}" / f"other{extra}").mkdir()
    tree = ContentTree(builder.root)
    app = RegistryApp(tree)
    names = call(app, "GET", "/v2/_catalog").json()["repositories"]
    assert len(names) == 300
    for _ in range(50):
        assert call(app, "GET", "/v2/_catalog?n=10").status == 200
    assert tree.catalog.walks == 1

    (builder.root / "zzz-later" / "manifests").mkdir(parents=True)
    assert tree.catalog.wait_until_fresh(timeout=10)
    assert "zzz-later" in call(app, "GET", "/v2/_catalog").json()["repositories"]
    assert tree.catalog.walks == 2


def test_the_catalog_walk_is_bounded(builder, monkeypatch, caplog):
    from minimal_registry import catalog

    monkeypatch.setattr(catalog, "MAX_DIRECTORIES", 50)
    for index in range(100):
        (builder.root / f"repo{index:04d}" / "manifests").mkdir(parents=True)
    names = call(RegistryApp(ContentTree(builder.root)), "GET", "/v2/_catalog").json()["repositories"]
    assert 0 < len(names) < 100
    assert "stopped walking" in caplog.text


def test_a_large_tree_is_walked_off_the_request_path(builder, monkeypatch):
    """Past CHECK_IN_REQUEST directories a _catalog call never walks or stats the tree itself:
    it answers from the last walk while a background thread checks it."""
    from minimal_registry import catalog, layout

    for index in range(40):
        (builder.root / f"repo{index:02d}" / "manifests").mkdir(parents=True)
    tree = ContentTree(builder.root)
    app = RegistryApp(tree)
    assert len(call(app, "GET", "/v2/_catalog").json()["repositories"]) == 40  # the first walk

    monkeypatch.setattr(catalog, "CHECK_IN_REQUEST", 10)
    monkeypatch.setattr(catalog, "REFRESH_SECONDS", 0.0)
    walkers, real_walk = [], layout.repositories

    def recording_walk(*args, **kwargs):
        walkers.append(threading.current_thread().name)
        return real_walk(*args, **kwargs)

    monkeypatch.setattr(layout, "repositories", recording_walk)
    (builder.root / "new" / "manifests").mkdir(parents=True)
    before = call(app, "GET", "/v2/_catalog").json()["repositories"]
    assert "new" not in before  # answered from the last walk, at once
    assert tree.catalog.wait_until_fresh(timeout=10)
    assert "new" in call(app, "GET", "/v2/_catalog").json()["repositories"]
    assert walkers and threading.main_thread().name not in walkers


def test_a_loop_of_links_is_not_a_manifest_and_not_a_passing_failure(builder, caplog):
    builder.image("app", "v1")
    manifests = builder.root / "app/manifests"
    os.symlink("../manifests/loop", manifests / "loop")  # a link that leads to itself
    os.symlink("self", manifests / "self")
    layer_loop = "sha256:" + "9" * 64
    os.symlink(f"../blobs/{layer_loop}", builder.root / "blobs" / layer_loop)
    app = RegistryApp(ContentTree(builder.root))
    for _ in range(2):
        for url, code in (("/v2/app/manifests/loop", "MANIFEST_UNKNOWN"), ("/v2/app/manifests/self", "MANIFEST_UNKNOWN"),
                          (f"/v2/app/blobs/{layer_loop}", "BLOB_UNKNOWN")):
            answer = call(app, "GET", url)
            assert answer.status == 404 and answer.json()["errors"][0]["code"] == code, (url, answer)
    assert "503" not in caplog.text


def test_a_file_where_a_directory_should_be_is_one_clear_log_line(builder, caplog):
    image = builder.image("app", "v1")
    other = builder.image("other", "v1")
    layer = image.layers[0]
    os.rename(builder.root / "blobs", builder.root / "blobs.aside")
    (builder.root / "blobs").write_text("not a directory")
    os.rename(builder.root / "other/manifests", builder.root / "other/manifests.aside")
    (builder.root / "other/manifests").write_text("not a directory")
    app = RegistryApp(ContentTree(builder.root))
    for _ in range(3):
        assert call(app, "GET", f"/v2/app/blobs/{layer.digest}").status == 404
        assert call(app, "GET", "/v2/other/manifests/v1").status == 404
    for path in (builder.root / "blobs", builder.root / "other/manifests"):
        lines = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
        assert len(lines) == 1 and "a regular file, not a directory" in lines[0], caplog.text

    (builder.root / "blobs").unlink()
    os.rename(builder.root / "blobs.aside", builder.root / "blobs")
    (builder.root / "other/manifests").unlink()
    os.rename(builder.root / "other/manifests.aside", builder.root / "other/manifests")
    assert call(app, "GET", f"/v2/app/blobs/{layer.digest}").body == layer.data
    assert served(app, "/v2/other/manifests/v1")[:2] == (200, other.digest)


def test_the_manifest_caches_are_bounded_in_bytes(builder, monkeypatch):
    """Many big manifests cannot grow the process without end: past the byte bound the
    caches start over (and every answer is still right)."""
    monkeypatch.setattr(storage, "MANIFEST_CACHE_BYTES", 64 * 1024)
    image = builder.image("app", "v1")
    tree = ContentTree(builder.root)
    app = RegistryApp(tree)
    for index in range(40):
        data = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
            "mediaType": image.config.media_type, "digest": image.config.digest, "size": image.config.size},
            "layers": [], "annotations": {"pad": str(index) * 10_000}})
        digest = sha256_digest(data)
        (builder.root / "app/manifests" / digest).write_bytes(data)
        assert served(app, f"/v2/app/manifests/{digest}")[:2] == (200, digest)
        assert tree._lookups.bytes <= 64 * 1024 and tree.manifests._entries.bytes <= 64 * 1024


def test_a_manifest_changed_while_it_is_read_is_not_judged_and_is_tried_again(builder, monkeypatch, caplog):
    """Written in place (not by rename) while the server reads it: what was read is half of
    something. That is no verdict on the file: 503, and the next request reads it again."""
    from minimal_registry import treesafety

    (old, _old_digest), (new, new_digest) = same_size_manifests(builder, "app")
    tag = builder.root / "app/manifests/v1"
    tag.write_bytes(old)
    app = RegistryApp(ContentTree(builder.root))
    real_read = treesafety.OpenFile.read

    def read_while_rewritten(self, limit):
        half = real_read(self, len(old) // 2)
        tag.write_bytes(new[:-1])  # truncated and rewritten under the reader
        return half + real_read(self, limit)[len(old) // 2:]

    monkeypatch.setattr(treesafety.OpenFile, "read", read_while_rewritten)
    answer = call(app, "GET", "/v2/app/manifests/v1")
    assert answer.status == 503 and answer.headers["Retry-After"].isdigit(), answer
    assert "not a manifest" not in caplog.text

    monkeypatch.setattr(treesafety.OpenFile, "read", real_read)
    tag.write_bytes(new)
    assert served(app, "/v2/app/manifests/v1")[:2] == (200, new_digest)


def test_memory_follows_the_tree_not_its_history(builder, monkeypatch):
    # The soak found it: a plain-file tag rewritten by rename kept one cache entry per
    # version ever served, so a tag re-written all day grew the process without end.
    monkeypatch.setattr(storage, "SETTLE_SECONDS", 0.0)
    versions = same_size_manifests(builder, "app")
    tag = builder.root / "app" / "manifests" / "live"
    tree = ContentTree(builder.root)
    app = RegistryApp(tree)
    for round_number in range(200):
        data, digest = versions[round_number % 2]
        staged = tag.with_name(".live.tmp")
        staged.write_bytes(data)
        os.utime(staged, ns=(round_number * 10**9, round_number * 10**9))  # a new identity each time
        os.replace(staged, tag)
        assert served(app, "/v2/app/manifests/live") == (200, digest, data)
    assert len(tree.manifests._entries) == 1
