"""Soak a real minimal-registry: a mix of requests at high concurrency while the tree changes.

Usage: soak.py [--duration SECONDS] [--concurrency N] [--no-fault] [--keep] [--seed N]

It builds a content tree of real images (tests/imagetree.py), starts the registry on it
(tests/serverproc.py: the source tree, or the binary MINIMAL_REGISTRY_BIN names) and drives
it from `--concurrency` clients for `--duration` seconds with: manifests by tag and by
digest, HEADs, whole blobs, ranges, resumed downloads (`Range: bytes=N-` after a cut),
tags lists, bad requests (junk lines, bad digests and names, unknown methods) and aborted
downloads. Meanwhile a second process re-points tags (atomic rename of a symlink between two
valid manifests), rewrites a plain-file tag by rename, and replaces blobs and manifests by
rename. Once, in the middle, the server's open-file limit is lowered to what it holds for a
few seconds (prlimit: EMFILE, a fault that works as root): 503s are allowed only then.

Every answer is checked: a body's sha256 against its digest (a tag's against its
Docker-Content-Digest, which must be one of the tag's valid digests), a range's bytes
against the slice of the known blob, every status against the one the request deserves.
Violations: a 5xx (but the fault's 503s), a wrong status or byte, a connection error the
soak did not cause, an ERROR or traceback in the server log, the server's file descriptors
growing (start and end, idle), or its RSS growing by more than 5 MiB from the end of warm-up
(a third of the run, 20 to 60 s: the allocator's high water for 200 clients is reached by
then and stays) to the end. Exit status 1 on any violation, with one summary line per kind.
"""

import sys

if __name__ == "__main__" and sys.argv[1:2] != ["mutate"]:
    from gevent import monkey

    monkey.patch_all()

import argparse
import collections
import hashlib
import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT / "tests"))

MIB = 1024 * 1024
IO_TIMEOUT = 30.0  # longer than a fault window: a client waits through it, never gives up
FAULT_SECONDS = 4.0
FAULT_GRACE = 1.0  # answers this soon after a fault ends may still be its 503s
FD_MARGIN = 5
# Memory: the allocator keeps the high water of 200 clients at once, reached in the first
# 20 s or so; after it RSS creeps by a few MiB at most (free chunks of the heap, measured
# +2.7 MiB in the 240 s after warm-up of a 300 s run). A leak keeps growing: after warm-up
# (a third of the run, at least WARMUP_MIN, at most WARMUP_MAX) RSS may grow by RSS_GROWTH.
# A glibc heap pinned by over-sized manifest reads grew 10 MiB in the 100 s after warm-up.
WARMUP_MIN, WARMUP_MAX = 20.0, 60.0
RSS_GROWTH = 5 * MIB
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json", "*/*"])


# ----- the tree ---------------------------------------------------------------------------

def build_tree(root: Path) -> dict:
    """Images of several shapes and sizes; returns the plan both the clients and the mutator read."""
    from imagetree import TreeBuilder

    builder = TreeBuilder(root)
    manifests, tags, blobs, flips, plain, repositories = {}, {}, {}, [], [], set()

    def record(item, repository, namespace=None):
        manifests[item.digest] = {"repository": repository, "ns": namespace, "media_type": item.media_type,
                                  "data": item.data.decode()}
        repositories.add((repository, namespace))
        for child in getattr(item, "children", ()):
            record(child, repository, namespace)
        for blob in getattr(item, "blobs", ()):
            blobs[blob.digest] = {"repository": repository, "ns": namespace, "size": blob.size,
                                  "path": str(builder.blob_path(blob.digest))}

    def tag(repository, namespace, name, digests, kind="symlink"):
        tags[f"{namespace or ''}|{repository}|{name}"] = {"repository": repository, "ns": namespace,
                                                          "tag": name, "digests": list(digests)}
        if kind == "flip":
            flips.append({"dir": manifests_dir(repository, namespace), "tag": name, "digests": list(digests)})
        if kind == "plain":
            plain.append({"dir": manifests_dir(repository, namespace), "tag": name, "digests": list(digests)})

    def manifests_dir(repository, namespace):
        return str(root / namespace / repository / "manifests" if namespace else root / repository / "manifests")

    # Small gzip layers (a few KiB) re-pointed under `flip`, and a stable tag.
    one = builder.image("soak/alpha", "stable", files={"a.txt": b"alpha one\n", "noise": random.Random(1).randbytes(6000)})
    two = builder.image("soak/alpha", "flip", files={"a.txt": b"alpha two\n", "noise": random.Random(2).randbytes(9000)})
    for item in (one, two):
        record(item, "soak/alpha")
    tag("soak/alpha", None, "stable", [one.digest])
    tag("soak/alpha", None, "flip", [one.digest, two.digest], "flip")

    # Big uncompressed layers, from 64 KiB to 4 MiB, re-pointed too.
    sizes = [64 * 1024, 512 * 1024, 2 * MIB, 4 * MIB]
    big = [builder.image("soak/beta", f"size-{size}", layer_bytes=size) for size in sizes]
    for item, size in zip(big, sizes):
        record(item, "soak/beta")
        tag("soak/beta", None, f"size-{size}", [item.digest])
    os.symlink(big[1].digest, Path(manifests_dir("soak/beta", None)) / "flip")
    tag("soak/beta", None, "flip", [big[1].digest, big[3].digest], "flip")

    # An index of two platforms, and a Docker list, each with its own tag.
    children = (builder.image("soak/multi", platform="linux/amd64", files={"m": b"amd64\n"}),
                builder.image("soak/multi", platform="linux/arm64/v8", files={"m": b"arm64\n"}))
    oci_index = builder.index("soak/multi", "index", children)
    docker_children = (builder.image("soak/multi", platform="linux/amd64", docker=True, files={"d": b"amd64\n"}),
                       builder.image("soak/multi", platform="linux/arm64", docker=True, files={"d": b"arm64\n"}))
    docker_list = builder.index("soak/multi", "list", docker_children, docker=True)
    for item in (oci_index, docker_list):
        record(item, "soak/multi")
    tag("soak/multi", None, "index", [oci_index.digest])
    tag("soak/multi", None, "list", [docker_list.digest])
    # A tag re-pointed between an index and a Docker list: the media type changes with it.
    os.symlink(oci_index.digest, Path(manifests_dir("soak/multi", None)) / "either")
    tag("soak/multi", None, "either", [oci_index.digest, docker_list.digest], "flip")

    # A plain-file tag (a copy of the manifest), rewritten by rename between two manifests.
    plain_one = builder.image("soak/gamma", "plain", tag_as_copy=True, files={"g": b"gamma one\n"})
    plain_two = builder.image("soak/gamma", files={"g": b"gamma two, longer\n"})
    for item in (plain_one, plain_two):
        record(item, "soak/gamma")
    tag("soak/gamma", None, "plain", [plain_one.digest, plain_two.digest], "plain")

    # containerd's ?ns= mirror path, under ROOT/docker.io/.
    namespaced = builder.image("library/delta", "latest", namespace="docker.io", files={"d": b"delta\n"})
    record(namespaced, "library/delta", "docker.io")
    tag("library/delta", "docker.io", "latest", [namespaced.digest])

    manifest_files = [str(Path(manifests_dir(m["repository"], m["ns"])) / digest) for digest, m in manifests.items()]
    return {"root": str(root), "manifests": manifests, "tags": tags, "blobs": blobs, "flips": flips,
            "plain": plain, "manifest_files": manifest_files,
            "repositories": sorted({r for r, ns in repositories if ns is None})}


# ----- the mutator: a separate process, so the changes race the server for real -----------

def mutate(plan_path: str) -> int:
    """Re-point tags, rewrite the plain tag, replace files by rename, until stdin closes."""
    import select

    plan = json.loads(Path(plan_path).read_text())
    manifests = plan["manifests"]
    spares = Path(plan["root"]) / ".soak-spares"
    spares.mkdir(exist_ok=True)
    # Each replaced file alternates between two inodes of the same bytes: cheap even for 4 MiB.
    replaced = [blob["path"] for blob in plan["blobs"].values()] + plan["manifest_files"]
    copies = {}
    for number, path in enumerate(replaced):
        copies[path] = [spares / f"{number}.a", spares / f"{number}.b"]
        for copy in copies[path]:
            shutil.copyfile(path, copy)
    counts = collections.Counter()
    round_number = 0
    while not select.select([sys.stdin], [], [], 0.002)[0]:
        round_number += 1
        for flip in plan["flips"]:
            digest = flip["digests"][round_number % len(flip["digests"])]
            temporary = os.path.join(flip["dir"], f".soak-{flip['tag']}.tmp")
            os.symlink(digest, temporary)
            os.replace(temporary, os.path.join(flip["dir"], flip["tag"]))
            counts["tag re-points"] += 1
        for entry in plan["plain"]:
            digest = entry["digests"][round_number % len(entry["digests"])]
            temporary = os.path.join(entry["dir"], f".soak-{entry['tag']}.tmp")
            Path(temporary).write_text(manifests[digest]["data"])
            os.replace(temporary, os.path.join(entry["dir"], entry["tag"]))
            counts["plain tag rewrites"] += 1
        path = replaced[round_number % len(replaced)]
        temporary = f"{path}.soak.tmp"
        os.link(copies[path][round_number % 2], temporary)
        os.replace(temporary, path)
        counts["files replaced by rename"] += 1
    print(json.dumps(counts))
    return 0


# ----- one HTTP exchange, on a raw socket -------------------------------------------------

class ConnectionFailed(Exception):
    """The server closed, reset or stalled a connection the client was using properly."""


class Answer:
    def __init__(self, status, headers, body, elapsed):
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def header(self, name):
        return self.headers.get(name.lower())


class Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, address):
        self.address = address
        self.sock = None
        self.reader = None

    def open(self):
        self.close()
        try:
            self.sock = socket.create_connection(self.address, timeout=IO_TIMEOUT)
        except OSError as error:
            raise ConnectionFailed(f"connect: {error}") from None
        self.reader = self.sock.makefile("rb")

    def close(self):
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
        self.sock = self.reader = None

    def request(self, method, path, headers=(), raw=None, read_limit=None):
        """Send one request (or `raw` bytes); return its Answer. Retries once on a stale keep-alive."""
        data = raw or self._request_bytes(method, path, headers)
        fresh = self.sock is None
        if fresh:
            self.open()
        try:
            return self._exchange(data, method == "HEAD", read_limit)
        except _StaleConnection:
            if fresh:
                raise ConnectionFailed("closed before answering a new connection's first request") from None
            self.open()
            try:
                return self._exchange(data, method == "HEAD", read_limit)
            except _StaleConnection:
                raise ConnectionFailed("closed before answering, twice") from None

    def _request_bytes(self, method, path, headers):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.address[0]}:{self.address[1]}",
                 "User-Agent: minimal-registry-soak"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _exchange(self, data, head, read_limit):
        started = time.monotonic()
        try:
            self.sock.sendall(data)
            status_line = self.reader.readline(65536)
        except (ConnectionResetError, BrokenPipeError):
            raise _StaleConnection() from None
        except OSError as error:
            self.close()
            raise ConnectionFailed(f"sending or waiting for the status line: {error!r}") from None
        if not status_line:
            raise _StaleConnection()
        try:
            parts = status_line.decode("latin-1").split(" ", 2)
            status = int(parts[1])
            headers = {}
            while True:
                line = self.reader.readline(65536)
                if not line:
                    raise ConnectionFailed(f"closed inside the headers after {status_line!r}")
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = headers.get("content-length")
            body = b""
            if not head and status not in (204, 304):
                if length is None:
                    raise ConnectionFailed(f"{status} without Content-Length")
                wanted = int(length) if read_limit is None else min(read_limit, int(length))
                body = self.reader.read(wanted)
                if len(body) < wanted:
                    raise ConnectionFailed(f"{status}: body cut at {len(body)} of {length} bytes")
        except ConnectionFailed:
            self.close()
            raise
        except (OSError, ValueError, IndexError) as error:
            self.close()
            raise ConnectionFailed(f"reading the answer to {status_line[:80]!r}: {error!r}") from None
        if read_limit is not None or headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, headers, body, time.monotonic() - started)


class _StaleConnection(Exception):
    pass


# ----- the soak ---------------------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Soak:
    def __init__(self, plan, address, duration, concurrency):
        self.plan, self.address, self.duration, self.concurrency = plan, address, duration, concurrency
        self.tags = list(plan["tags"].values())
        self.manifests = plan["manifests"]
        self.blobs = plan["blobs"]
        self.blob_bytes = {digest: Path(blob["path"]).read_bytes() for digest, blob in self.blobs.items()}
        self.big_blobs = [d for d, b in self.blobs.items() if b["size"] >= 256 * 1024]
        self.started = None
        self.fault_windows = []  # (start, end) in time.monotonic()
        self.statuses = collections.defaultdict(collections.Counter)  # kind -> status -> n
        self.violations = collections.defaultdict(list)  # kind -> [detail]
        self.allowed_503 = 0

    # --- bookkeeping ------------------------------------------------------------------------

    def in_fault(self, begun, ended):
        return any(begun <= end + FAULT_GRACE and ended >= start for start, end in self.fault_windows)

    def violation(self, kind, detail, at=None):
        """Record one; `at` (time.monotonic()) when it happened earlier than now."""
        when = "    ?" if at is False else f"{(time.monotonic() if at is None else at) - self.started:5.1f}s"
        self.violations[kind].append(f"{when} {detail}")

    def check_status(self, kind, what, answer, want, begun):
        """True when the status is the one wanted; a 503 inside a fault window is allowed."""
        self.statuses[kind][answer.status] += 1
        if answer.status in want:
            return True
        if answer.status == 503 and self.in_fault(begun, time.monotonic()):
            self.allowed_503 += 1
            if not answer.header("retry-after"):
                self.violation("503 without Retry-After", what)
            return False
        label = "5xx" if answer.status >= 500 else f"wrong status ({answer.status} for {'/'.join(map(str, want))})"
        if self.in_fault(begun, time.monotonic()):
            label += " during the injected fault"
        self.violation(label, f"{what} -> {answer.status} {answer.body[:160]!r}")
        return False

    def check_error_body(self, what, answer):
        try:
            errors = json.loads(answer.body)["errors"]
            assert errors and all("code" in e for e in errors)
        except Exception:
            self.violation("error without OCI JSON", f"{what} -> {answer.status} {answer.body[:120]!r}")

    # --- requests ---------------------------------------------------------------------------

    def query(self, item):
        return f"?ns={item['ns']}" if item["ns"] else ""

    def manifest_by_tag(self, client, head=False):
        entry = random.choice(self.tags)
        kind = "HEAD manifest by tag" if head else "manifest by tag"
        what = f"{'HEAD' if head else 'GET'} {entry['repository']}:{entry['tag']}"
        begun = time.monotonic()
        answer = client.request("HEAD" if head else "GET",
                                f"/v2/{entry['repository']}/manifests/{entry['tag']}{self.query(entry)}",
                                [("Accept", MANIFEST_ACCEPT)])
        if not self.check_status(kind, what, answer, (200,), begun):
            return
        digest = answer.header("docker-content-digest")
        if digest not in entry["digests"]:
            self.violation("wrong digest for a tag", f"{what}: Docker-Content-Digest {digest}, valid: {entry['digests']}")
            return
        self.check_manifest(what, answer, digest, head)

    def manifest_by_digest(self, client, head=False):
        digest = random.choice(list(self.manifests))
        item = self.manifests[digest]
        kind = "HEAD manifest by digest" if head else "manifest by digest"
        what = f"{'HEAD' if head else 'GET'} {item['repository']}@{digest[:19]}"
        begun = time.monotonic()
        answer = client.request("HEAD" if head else "GET", f"/v2/{item['repository']}/manifests/{digest}{self.query(item)}",
                                [("Accept", MANIFEST_ACCEPT)])
        if self.check_status(kind, what, answer, (200,), begun):
            if answer.header("docker-content-digest") != digest:
                self.violation("wrong bytes", f"{what}: Docker-Content-Digest {answer.header('docker-content-digest')}")
            self.check_manifest(what, answer, digest, head)

    def check_manifest(self, what, answer, digest, head):
        item = self.manifests[digest]
        size = len(item["data"].encode())
        if answer.header("content-length") != str(size):
            self.violation("wrong bytes", f"{what}: Content-Length {answer.header('content-length')} for {digest} of {size}")
        if answer.header("content-type") != item["media_type"]:
            self.violation("wrong Content-Type", f"{what}: {answer.header('content-type')} for a {item['media_type']}")
        if not head and sha256_digest(answer.body) != digest:
            self.violation("wrong bytes", f"{what}: body sha256 {sha256_digest(answer.body)[:19]} != {digest[:19]}")

    def blob(self, client, head=False):
        digest = random.choice(list(self.blobs))
        item = self.blobs[digest]
        what = f"{'HEAD' if head else 'GET'} blob {digest[:19]} ({item['size']} B)"
        begun = time.monotonic()
        answer = client.request("HEAD" if head else "GET", f"/v2/{item['repository']}/blobs/{digest}{self.query(item)}")
        if not self.check_status("HEAD blob" if head else "blob", what, answer, (200,), begun):
            return
        if answer.header("content-length") != str(item["size"]) or answer.header("docker-content-digest") != digest:
            self.violation("wrong bytes", f"{what}: Content-Length {answer.header('content-length')}, "
                                          f"Docker-Content-Digest {answer.header('docker-content-digest')}")
        if not head and sha256_digest(answer.body) != digest:
            self.violation("wrong bytes", f"{what}: body sha256 {sha256_digest(answer.body)[:19]}")

    def blob_range(self, client):
        digest = random.choice(list(self.blobs))
        item, data = self.blobs[digest], self.blob_bytes[digest]
        first = random.randrange(item["size"])
        last = random.choice([None, random.randrange(first, item["size"])])
        spec = f"bytes={first}-{'' if last is None else last}"
        what = f"GET blob {digest[:19]} Range {spec}"
        begun = time.monotonic()
        answer = client.request("GET", f"/v2/{item['repository']}/blobs/{digest}{self.query(item)}", [("Range", spec)])
        if self.check_status("range", what, answer, (206,), begun):
            self.check_slice(what, answer, data, first, item["size"] - 1 if last is None else last)

    def check_slice(self, what, answer, data, first, last):
        if answer.header("content-range") != f"bytes {first}-{last}/{len(data)}":
            self.violation("wrong bytes", f"{what}: Content-Range {answer.header('content-range')}")
        elif answer.body != data[first:last + 1]:
            self.violation("wrong bytes", f"{what}: {len(answer.body)} bytes differ from the blob's slice")

    def resumed_download(self, client):
        """Read part of a big blob, cut the connection, fetch the rest with bytes=N-."""
        digest = random.choice(self.big_blobs)
        item, data = self.blobs[digest], self.blob_bytes[digest]
        cut = random.randrange(1, item["size"])
        path = f"/v2/{item['repository']}/blobs/{digest}{self.query(item)}"
        begun = time.monotonic()
        head = client.request("GET", path, read_limit=cut)
        if not self.check_status("resumed download", f"GET blob {digest[:19]} (cut at {cut})", head, (200,), begun):
            return
        what = f"GET blob {digest[:19]} Range bytes={cut}-"
        begun = time.monotonic()
        rest = client.request("GET", path, [("Range", f"bytes={cut}-")])
        if self.check_status("resumed download", what, rest, (206,), begun):
            self.check_slice(what, rest, data, cut, item["size"] - 1)
            if sha256_digest(head.body + rest.body) != digest:
                self.violation("wrong bytes", f"{what}: the resumed blob's sha256 is wrong")

    def tags_list(self, client):
        repository = random.choice(self.plan["repositories"])
        want = sorted({t["tag"] for t in self.tags if t["repository"] == repository and t["ns"] is None})
        what = f"GET {repository}/tags/list"
        begun = time.monotonic()
        answer = client.request("GET", f"/v2/{repository}/tags/list")
        if self.check_status("tags list", what, answer, (200,), begun):
            listed = json.loads(answer.body)["tags"]
            if sorted(listed) != want:
                during = " during the injected fault" if self.in_fault(begun, time.monotonic()) else ""
                self.violation("wrong tags list" + during, f"{what}: {listed}, want {want}")

    def bad_request(self, client):
        item = random.choice(list(self.blobs.values()))
        cases = [
            ("GET", f"/v2/{item['repository']}/blobs/sha256:{'z' * 64}", (400, 404)),
            ("GET", f"/v2/{item['repository']}/blobs/sha256:abc", (400, 404)),
            ("GET", f"/v2/{item['repository']}/manifests/no-such-tag", (404,)),
            ("GET", f"/v2/{item['repository']}/blobs/sha256:{'0' * 64}", (404,)),
            ("GET", "/v2/soak/../../etc/manifests/passwd", (400, 404)),
            ("GET", "/v2/no/such/repo/tags/list", (404,)),
            ("BREW", "/v2/", (405,)),
            ("DELETE", f"/v2/{item['repository']}/manifests/flip", (405,)),
        ]
        method, path, want = random.choice(cases)
        begun = time.monotonic()
        answer = client.request(method, path)
        if self.check_status("bad request", f"{method} {path}", answer, want, begun):
            self.check_error_body(f"{method} {path}", answer)

    def junk(self, _client):
        """A line that is not HTTP, on its own connection (the server closes it after its 400)."""
        junk = bytes(random.choice(b"abcXYZ019-_/%\x01\x7f\xff") for _ in range(random.randrange(1, 300)))
        client = Client(self.address)
        begun = time.monotonic()
        try:
            answer = client.request("JUNK", "", raw=junk + b"\r\n\r\n")
        finally:
            client.close()
        if self.check_status("junk line", f"junk {junk[:40]!r}", answer, (400,), begun):
            self.check_error_body("junk line", answer)

    def aborted_download(self, _client):
        """Connect, maybe ask for a big blob and read a little, then go away (sometimes with a reset)."""
        sock = socket.create_connection(self.address, timeout=IO_TIMEOUT)
        try:
            how = random.choice(["nothing", "half a line", "read a little"])
            if how == "half a line":
                sock.sendall(b"GET /v2/soak/al")
            elif how == "read a little":
                digest = random.choice(self.big_blobs)
                sock.sendall(f"GET /v2/{self.blobs[digest]['repository']}/blobs/{digest} HTTP/1.1\r\n"
                             f"Host: soak\r\n\r\n".encode())
                sock.recv(random.randrange(1, 65536))
            if random.random() < 0.5:
                # Linger on, zero seconds: close sends a reset, as a killed client does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as error:
            raise ConnectionFailed(f"aborted download: {error!r}") from None
        finally:
            sock.close()
        self.statuses["aborted download"]["cut"] += 1

    MIX = [  # (weight, name)
        (20, "manifest_by_tag"), (8, "manifest_head_by_tag"), (10, "manifest_by_digest"),
        (4, "manifest_head_by_digest"), (16, "blob"), (4, "blob_head"), (12, "blob_range"),
        (5, "resumed_download"), (3, "tags_list"), (8, "bad_request"), (4, "junk"),
        (6, "aborted_download"),
    ]

    def manifest_head_by_tag(self, client):
        self.manifest_by_tag(client, head=True)

    def manifest_head_by_digest(self, client):
        self.manifest_by_digest(client, head=True)

    def blob_head(self, client):
        self.blob(client, head=True)

    def worker(self, deadline):
        client = Client(self.address)
        names = [name for weight, name in self.MIX for _ in range(weight)]
        try:
            while time.monotonic() < deadline:
                name = random.choice(names)
                begun = time.monotonic()
                try:
                    getattr(self, name)(client)
                except ConnectionFailed as error:
                    kind = "connection error during the injected fault" if self.in_fault(begun, time.monotonic()) else "connection error"
                    self.violation(kind, f"{name}: {error}")
                    client.close()
        finally:
            client.close()


# ----- the server process -----------------------------------------------------------------

def serving_process(pid: int) -> int:
    """The process that serves: the one-file binary runs it as a child (or grandchild)."""
    while True:
        children = [int(c) for task in os.listdir(f"/proc/{pid}/task")
                    for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        if len(children) != 1:
            return pid
        pid = children[0]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_after_warmup(samples, warmup_end):
    """The first (time, RSS) sample's RSS at or after `warmup_end`; None if the run ended before."""
    return next((rss for at, rss in samples if at >= warmup_end), None)


def rss_grew(samples, warmup_end, rss_end) -> bool:
    """A leak: RSS at the end more than RSS_GROWTH above RSS after warm-up."""
    rss_warm = rss_after_warmup(samples, warmup_end)
    return rss_warm is not None and rss_end > rss_warm + RSS_GROWTH


def inject_fault(soak, pid, at, stop):
    """At `at`, lower the server's soft open-file limit to what it holds, for FAULT_SECONDS."""
    import gevent

    gevent.sleep(max(0.0, at - time.monotonic()))
    if time.monotonic() >= stop:
        return
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = fd_count(pid)
    start = time.monotonic()
    soak.fault_windows.append((start, start + FAULT_SECONDS))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (held, original[1]))
    try:
        gevent.sleep(FAULT_SECONDS)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        soak.fault_windows[-1] = (start, time.monotonic())
    print(f"fault: open-file limit of pid {pid} lowered to {held} (from {original[0]}) for "
          f"{time.monotonic() - start:.1f} s", flush=True)


def log_problems(soak, log_text: str, started_wall: float):
    """ERROR lines and tracebacks in the server log. Every file in the tree is valid, so a line
    calling one corrupt is false wherever it falls; other ERRORs are allowed only in a fault.
    A traceback is never allowed (the project's rule), but is labelled when it falls in one."""
    wall_offset = started_wall - soak.started
    lines = log_text.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("Traceback"):
            # The exception is the first unindented line after it; gevent then prints its own
            # line with a UTC timestamp: "2026-...T07:50:20Z <RegistryServer ...> failed with".
            rest = lines[number + 1:number + 40]
            frames = [l.strip() for l in rest if l.startswith("  File")]
            exception = next((l for l in rest if l and not l.startswith(" ")), "?")
            stamped = next((l for l in rest if l[:4].isdigit() and "T" in l[:20]), "")
            try:
                at = datetime.strptime(stamped[:20], "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=timezone.utc).timestamp() - wall_offset
            except ValueError:
                at = False
            where = frames[-1].split("/")[-1] if frames else "?"
            label = "traceback in the server log"
            # gevent's stamp is truncated to the second: the traceback came within the next one.
            if at is not False and soak.in_fault(at, at + 1):
                label += " during the injected fault"
            soak.violation(label, f"{exception} (at {where})", at)
            continue
        if " ERROR " not in line:
            continue
        try:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_offset
        except ValueError:
            at = False
        false_claim = "not a manifest" in line or "sha256 is" in line
        if false_claim or at is False or not soak.in_fault(at, at):
            soak.violation("ERROR in the server log" + (" calling a valid file corrupt" if false_claim else ""),
                           line[24:400], at)


def summary_line(kind, details):
    return f"VIOLATION {kind}: {len(details)} x, first: {details[0]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--concurrency", type=int, default=200, help="clients at once (default 200)")
    parser.add_argument("--no-fault", action="store_true", help="inject no fault (then no 503 is allowed)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (tree and server log)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the request mix")
    args = parser.parse_args(argv)

    import gevent
    from serverproc import registry_command, start_registry

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    random.seed(seed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    work = Path(tempfile.mkdtemp(prefix="minimal-registry-soak-"))
    mutator = registry = None
    try:
        plan = build_tree(work / "registry")
        plan_path = work / "plan.json"
        plan_path.write_text(json.dumps(plan))
        registry = start_registry(work / "registry", "-q", log_path=work / "registry.log")
        pid = serving_process(registry.process.pid)
        address = ("127.0.0.1", registry.port)
        print(f"soak: {args.duration:.0f} s at concurrency {args.concurrency} against "
              f"{' '.join(registry_command())} (pid {pid}) on {registry.url}, seed {seed}", flush=True)
        soak = Soak(plan, address, args.duration, args.concurrency)
        soak.started = time.monotonic()
        started_wall = time.time()
        # Warm the cache and the allocator with one request of each kind before the baseline.
        warm = Client(address)
        for name in ("manifest_by_tag", "blob", "blob_range", "bad_request"):
            getattr(soak, name)(warm)
        warm.close()
        time.sleep(0.5)
        fds_start, rss_start = fd_count(pid), rss_bytes(pid)
        print(f"server at start: {fds_start} fds, RSS {rss_start / MIB:.1f} MiB", flush=True)

        mutator = subprocess.Popen([sys.executable, __file__, "mutate", str(plan_path)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        begin = time.monotonic()
        deadline = begin + args.duration
        warmup_end = begin + min(WARMUP_MAX, max(WARMUP_MIN, args.duration / 3))
        rss_samples = []

        def sample():
            while time.monotonic() < deadline:
                gevent.sleep(1.0)
                rss_samples.append((time.monotonic(), rss_bytes(pid)))

        greenlets = [gevent.spawn(soak.worker, deadline) for _ in range(args.concurrency)]
        greenlets.append(gevent.spawn(sample))
        if not args.no_fault:
            greenlets.append(gevent.spawn(inject_fault, soak, pid, begin + args.duration / 2, deadline))
        gevent.joinall(greenlets, raise_error=True)
        elapsed = time.monotonic() - begin
        mutator_counts = json.loads(mutator.communicate("stop\n", timeout=30)[0] or "{}")

        # fds once every client has gone: the server may linger up to 2 s on a closing socket.
        alive = registry.process.poll() is None
        fds_end = fd_count(pid) if alive else None
        wait_until = time.monotonic() + 10
        while alive and fds_end > fds_start + FD_MARGIN and time.monotonic() < wait_until:
            time.sleep(0.2)
            fds_end = fd_count(pid)
        rss_end = rss_bytes(pid) if alive else 0
        rss_warm = rss_after_warmup(rss_samples, warmup_end)
        print(f"server at end: {fds_end} fds, RSS {rss_end / MIB:.1f} MiB "
              f"(after warm-up, at {warmup_end - begin:.0f} s: "
              f"{'not reached' if rss_warm is None else f'{rss_warm / MIB:.1f} MiB'}; "
              f"highest {max([rss for _, rss in rss_samples] or [0]) / MIB:.1f} MiB)")
        step = max(1, len(rss_samples) // 10)
        print("server RSS during the run: " + ", ".join(
            f"{at - begin:.0f} s {rss / MIB:.0f}" for at, rss in rss_samples[step - 1::step]) + " (MiB)")
        if not alive:
            soak.violation("server died", f"exit status {registry.process.returncode}")
        else:
            if fds_end > fds_start + FD_MARGIN:
                soak.violation("file descriptors grew", f"{fds_start} at start, {fds_end} at end")
            if rss_grew(rss_samples, warmup_end, rss_end):
                soak.violation("RSS grew", f"{rss_warm / MIB:.1f} MiB after warm-up, {rss_end / MIB:.1f} MiB at end "
                               f"(more than {RSS_GROWTH // MIB} MiB)")
        registry.stop()
        log_problems(soak, registry.log(), started_wall)

        total = sum(sum(statuses.values()) for statuses in soak.statuses.values())
        print(f"requests: {total} in {elapsed:.1f} s = {total / elapsed:.0f}/s")
        for kind in sorted(soak.statuses, key=lambda k: -sum(soak.statuses[k].values())):
            statuses = ", ".join(f"{status}: {n}" for status, n in sorted(soak.statuses[kind].items(), key=str))
            print(f"  {kind:<24} {sum(soak.statuses[kind].values()):>8}  ({statuses})")
        print("mutations: " + (", ".join(f"{n} {what}" for what, n in mutator_counts.items()) or "none"))
        if soak.fault_windows:
            print(f"fault: {soak.allowed_503} answers were 503 during the injected fault (allowed)")
        else:
            print("fault: none injected")
        for kind in sorted(soak.violations):
            print(summary_line(kind, soak.violations[kind]))
            for detail in soak.violations[kind][1:4]:
                print(f"    also: {detail}")
        if soak.violations:
            print(f"soak FAILED: {sum(map(len, soak.violations.values()))} violations of "
                  f"{len(soak.violations)} kinds (work directory {work}{' kept' if args.keep else ''})")
            return 1
        print("soak passed: no violation")
        return 0
    finally:
        if mutator is not None and mutator.poll() is None:
            mutator.kill()
            mutator.wait()
        if registry is not None:
            registry.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["mutate"]:
        sys.exit(mutate(sys.argv[2]))
    sys.exit(main())
