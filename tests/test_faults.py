"""A real server process while the disk and the machine misbehave: clear answers, clear log
lines, never a wrong byte, never a 404 for what is there, and serving resumes by itself.
"""

import hashlib
import http.client
import json
import os
import resource
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import imagetree
from httpraw import connect, request
from serverproc import command_env, registry_command, running_registry, start_registry

WAIT = 20.0  # every wait in this file is bounded by this


def wait_for(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


@pytest.fixture
def tree(tmp_path):
    return imagetree.build_standard_tree(tmp_path / "registry", with_big=False)


# ----- file descriptors run out ------------------------------------------------------------

def fd_limit(limit: int):
    """For start_registry's preexec_fn: soft AND hard RLIMIT_NOFILE at `limit` (so raising
    the soft limit to the hard one at start-up cannot lift it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_out_of_file_descriptors_existing_content_gets_503_never_404(tree, tmp_path):
    items = (tree.hello, tree.deep, tree.plain_tag, tree.no_media_type)
    expected = {f"/v2/library/hello/blobs/{blob.digest}": blob.data for item in items for blob in item.blobs}
    # Just written, so not trusted from memory yet (SETTLE_SECONDS): each GET opens the file.
    expected.update({f"/v2/{item.repository}/manifests/{item.tag}": item.data for item in items})
    registry = start_registry(tree.root, "-q", log_path=tmp_path / "registry.log", preexec_fn=fd_limit(48))
    try:
        def fetch(url):
            try:
                status, headers, body = request(registry, "GET", url)
            except (OSError, http.client.HTTPException) as error:
                return ("no answer", type(error).__name__)
            if status == 200:
                assert body == expected[url]
                return (200, None)
            if status == 503:
                assert headers["Retry-After"].isdigit() and error_code(body) == "UNAVAILABLE"
            return (status, body[:200])

        # Many more concurrent downloads than descriptors: opens fail with EMFILE.
        with ThreadPoolExecutor(max_workers=150) as pool:
            answers = list(pool.map(fetch, list(expected) * 30))
        statuses = [status for status, _ in answers]
        assert 404 not in statuses, [a for a in answers if a[0] == 404][:3]
        assert set(statuses) <= {200, 503, "no answer"}, set(statuses)
        assert statuses.count(200) > 0

        # The pressure is gone: every blob is served at once (nothing was remembered).
        for url, data in expected.items():
            status, _headers, body = request(registry, "GET", url)
            assert status == 200 and body == data, url
        log = registry.log()
        if 503 in statuses:
            assert log.count("Too many open files; answering 503") == 1, log[-3000:]
        # (EMFILE on accept() is gevent's to report, until the connection layer backs off.)
    finally:
        registry.stop()


# ----- a tag re-pointed while clients pull ---------------------------------------------------

def test_every_answer_during_a_re_point_storm_is_wholly_old_or_wholly_new(tmp_path):
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    first = builder.image("app", "v1", files={"v": b"first"})
    second = builder.image("app", "other", files={"v": b"second"})
    tag = builder.root / "app/manifests/v1"
    stop = threading.Event()
    re_points = [0]

    def re_point():
        names = [first.digest, second.digest]
        while not stop.is_set():
            temporary = f"{tag}.tmp"
            os.symlink(names[re_points[0] % 2], temporary)
            os.replace(temporary, tag)  # atomic: the tag always names one or the other
            re_points[0] += 1

    with running_registry(builder.root, "-q") as registry:
        pointer = threading.Thread(target=re_point)
        pointer.start()
        try:
            def pull(_):
                answers = []
                connection = connect(registry)
                try:
                    for _ in range(150):
                        connection.request("GET", "/v2/app/manifests/v1")
                        response = connection.getresponse()
                        body = response.read()
                        answers.append((response.status, response.getheader("Docker-Content-Digest"),
                                        "sha256:" + hashlib.sha256(body).hexdigest(), body[:200]))
                finally:
                    connection.close()
                return answers

            with ThreadPoolExecutor(max_workers=6) as pool:
                answers = [a for batch in pool.map(pull, range(6)) for a in batch]
        finally:
            stop.set()
            pointer.join(WAIT)
        log = registry.log()
    assert re_points[0] > 100
    wrong = [a for a in answers if a[0] != 200 or a[1] != a[2] or a[1] not in (first.digest, second.digest)]
    assert not wrong, f"{len(wrong)} of {len(answers)}: {wrong[:3]}"
    seen = {a[1] for a in answers}
    assert seen == {first.digest, second.digest}
    assert "corrupt" not in log and "its sha256 is" not in log


# ----- the disk changes under a download -----------------------------------------------------

def test_a_blob_truncated_while_it_is_sent_ends_the_connection_short_and_names_the_file(tmp_path):
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    image = builder.image("big", "v1", layer_bytes=48 * 1024 * 1024)
    layer = image.layers[0]
    path = builder.root / "blobs" / layer.digest
    with running_registry(builder.root) as registry:
        connection = connect(registry)
        connection.request("GET", f"/v2/big/blobs/{layer.digest}")
        response = connection.getresponse()
        assert response.status == 200 and int(response.getheader("Content-Length")) == layer.size
        received = len(response.read(1024 * 1024))
        os.truncate(path, layer.size // 4)  # the disk loses most of the file mid-download
        try:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:  # http.client's read(n) ends quietly at a short close
                    break
                received += len(chunk)
        except http.client.IncompleteRead as cut:
            received += len(cut.partial)
        connection.close()
        # Closed short of Content-Length: the client knows the answer is incomplete.
        assert received < layer.size
        assert wait_for(lambda: "shrank" in registry.log())
        line = next(line for line in registry.log().splitlines() if "shrank" in line)
        assert str(path) in line or layer.digest in line
        # The server goes on: another client is served.
        status, _headers, body = request(registry, "GET", f"/v2/big/manifests/v1")
        assert status == 200 and body == image.data


def test_the_tree_removed_while_running_is_503_and_served_again_when_put_back(tree, tmp_path):
    backup = tmp_path / "backup"
    shutil.copytree(tree.root, backup, symlinks=True)
    layer = tree.hello.layers[0]
    urls = ["/v2/library/hello/manifests/latest", f"/v2/library/hello/blobs/{layer.digest}",
            "/v2/library/hello/tags/list"]
    with running_registry(tree.root) as registry:
        for url in urls:
            assert request(registry, "GET", url)[0] == 200

        shutil.rmtree(tree.root)
        for url in urls:
            status, headers, body = request(registry, "GET", url)
            assert status == 503, (url, status, body)
            assert error_code(body) == "UNAVAILABLE" and headers["Retry-After"].isdigit()
        assert registry.log().count(f"content tree {tree.root} is missing") == 1

        shutil.copytree(backup, tree.root, symlinks=True)  # put back: new inodes, same bytes
        for url in urls:
            status, headers, body = request(registry, "GET", url)
            assert status == 200, (url, status, body)
        status, headers, body = request(registry, "GET", "/v2/library/hello/manifests/latest")
        assert headers["Docker-Content-Digest"] == tree.hello.digest and body == tree.hello.data
        assert f"content tree {tree.root} is back" in registry.log()


def test_a_read_only_mount_is_served_in_full(tree, tmp_path):
    """The registry only reads: a tree on a read-only mount serves exactly as a writable one.

    Needs CAP_SYS_ADMIN for the bind mount (the test suite runs as root here). Without it
    the tree is made read-only by its modes instead, which root ignores: the test then still
    proves everything is served, but not that nothing needs to write.
    """
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    mount = subprocess.run(["mount", "--bind", "-o", "ro", str(tree.root), str(mounted)],
                           capture_output=True, text=True)
    try:
        if mount.returncode != 0:
            print(f"bind mount unavailable ({mount.stderr.strip()}): using modes instead")
            mounted = tree.root
            subprocess.run(["chmod", "-R", "a-w", str(mounted)], check=True)
        else:
            with pytest.raises(OSError):
                (mounted / "probe").write_text("x")  # it really is read-only
        layer = tree.hello.layers[0]
        with running_registry(mounted) as registry:
            for item in tree.tagged_items():
                status, headers, body = request(registry, "GET", f"/v2/{item.repository}/manifests/{item.tag}")
                assert status == 200 and body == item.data, item
            status, _headers, body = request(registry, "GET", f"/v2/library/hello/blobs/{layer.digest}",
                                             {"Range": "bytes=10-"})
            assert status == 206 and body == layer.data[10:]
            status, _headers, body = request(registry, "GET", "/v2/_catalog")
            assert status == 200 and "library/hello" in json.loads(body)["repositories"]
            assert "Traceback" not in registry.log() and " ERROR " not in registry.log()
        verify = subprocess.run(registry_command() + ["verify", "-d", str(mounted)], capture_output=True,
                                text=True, env=command_env(), timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        if mount.returncode == 0:
            subprocess.run(["umount", str(mounted)], check=False)
        else:
            subprocess.run(["chmod", "-R", "u+w", str(tree.root)], check=False)


def test_a_directory_where_a_file_should_be_is_refused_clearly_and_served_once_fixed(tree):
    layer = tree.hello.layers[0]
    blob = tree.root / "blobs" / layer.digest
    tag = tree.root / "plain/tag/manifests/v1"
    blob_url, tag_url = f"/v2/library/hello/blobs/{layer.digest}", "/v2/plain/tag/manifests/v1"
    with running_registry(tree.root) as registry:
        assert request(registry, "GET", tag_url)[0] == 200
        os.rename(blob, f"{blob}.aside")
        os.rename(tag, f"{tag}.aside")
        blob.mkdir()
        tag.mkdir()
        for url, code in ((blob_url, "BLOB_UNKNOWN"), (tag_url, "MANIFEST_UNKNOWN")):
            for _ in range(3):
                status, _headers, body = request(registry, "GET", url)
                assert status == 404 and error_code(body) == code, (url, status, body)
        log = registry.log()
        for path in (blob, tag):
            lines = [line for line in log.splitlines() if str(path) in line and "a directory" in line]
            assert len(lines) == 1, log[-2000:]  # one clear line, not one per request

        blob.rmdir()
        tag.rmdir()
        os.rename(f"{blob}.aside", blob)
        os.rename(f"{tag}.aside", tag)
        status, _headers, body = request(registry, "GET", blob_url)
        assert status == 200 and body == layer.data
        status, headers, body = request(registry, "GET", tag_url)
        assert status == 200 and body == tree.plain_tag.data


def test_the_catalog_of_a_large_tree_follows_changes_by_itself(tmp_path):
    """A tree too large to check inside a request: the background refresh runs beside the
    event loop, and a new repository is listed within a few polls."""
    builder = imagetree.TreeBuilder(tmp_path / "registry")
    builder.image("app", "v1")
    for index in range(1500):
        (builder.root / f"many/r{index:04d}/manifests").mkdir(parents=True)
    with running_registry(builder.root, "-q") as registry:
        status, _headers, body = request(registry, "GET", "/v2/_catalog")
        assert status == 200 and len(json.loads(body)["repositories"]) == 1501
        (builder.root / "later/manifests").mkdir(parents=True)

        def listed():
            assert request(registry, "GET", "/v2/")[0] == 200
            return "later" in json.loads(request(registry, "GET", "/v2/_catalog")[2])["repositories"]

        assert wait_for(listed)
