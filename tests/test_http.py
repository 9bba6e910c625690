"""The registry process over real sockets: framing, keep-alive, big blobs, hostile input,
slow and vanishing clients (PROTOCOL.md P1-P21)."""

import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from httpraw import connect, raw, request, sha256_of_body, status_of
from serverproc import running_registry

MISSING = "sha256:" + "0" * 64


def test_head_and_get_share_headers_and_keep_alive_survives_head(registry, full_tree):
    """A HEAD answer with a wrong framing would corrupt the next response on the connection."""
    image = full_tree.hello
    layer = image.layers[0]
    connection = connect(registry)
    try:
        answers = []
        for method, path in [("HEAD", "/v2/library/hello/manifests/latest?ns=docker.io"),
                             ("GET", "/v2/library/hello/manifests/latest?ns=docker.io"),
                             ("HEAD", f"/v2/library/hello/blobs/{layer.digest}"),
                             ("GET", f"/v2/library/hello/blobs/{layer.digest}"),
                             ("HEAD", "/v2/library/hello/manifests/nope"),
                             ("GET", "/v2/")]:
            connection.request(method, path)
            response = connection.getresponse()
            answers.append((response.status, dict(response.getheaders()), response.read()))
    finally:
        connection.close()
    (s1, h1, b1), (s2, h2, b2), (s3, h3, b3), (s4, h4, b4), (s5, h5, b5), (s6, _h6, b6) = answers
    assert (s1, s2, s3, s4, s5, s6) == (200, 200, 200, 200, 404, 200)
    assert b1 == b"" and b2 == image.data and b3 == b"" and b4 == layer.data and b5 == b"" and b6 == b"{}"
    for head, get in ((h1, h2), (h3, h4)):
        head.pop("Date"), get.pop("Date")
        assert head == get
    assert h2["Content-Length"] == str(len(image.data)) and h2["Docker-Content-Digest"] == image.digest
    assert h4["Content-Length"] == str(layer.size) and "Transfer-Encoding" not in h4
    assert int(h5["Content-Length"]) > 0 and h5["Content-Type"] == "application/json"


def test_base_endpoint_announces_the_api_version(registry):
    status, headers, body = request(registry, "GET", "/v2/")
    assert (status, body) == (200, b"{}")
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_big_blob_arrives_whole_and_resumes_from_an_offset(registry, full_tree):
    layer = full_tree.big.layers[0]
    assert layer.size > 64 * 1024 * 1024
    path = f"/v2/big/blob/blobs/{layer.digest}"
    status, digest, size = sha256_of_body(registry, path)
    assert (status, digest, size) == (200, layer.digest, layer.size)
    # containerd resumes a short read with `Range: bytes=<offset>-`.
    offset = layer.size - 1234567
    status, _digest, size = sha256_of_body(registry, path, {"Range": f"bytes={offset}-"})
    assert (status, size) == (206, 1234567)
    status, headers, body = request(registry, "GET", path, {"Range": "bytes=-10"})
    assert status == 206 and headers["Content-Range"] == f"bytes {layer.size - 10}-{layer.size - 1}/{layer.size}"
    assert len(body) == 10


def test_unsatisfiable_range_is_416_with_the_size(registry, full_tree):
    layer = full_tree.hello.layers[0]
    status, headers, body = request(registry, "GET", f"/v2/library/hello/blobs/{layer.digest}",
                                    {"Range": f"bytes={layer.size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{layer.size}"
    assert b"RANGE_INVALID" in body


@pytest.mark.parametrize("line", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\n\r\n",
    b"GET /v2/ HTTP/1.x\r\n\r\n",
    b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
    b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    b"HEAD /v2/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
])
def test_junk_gets_a_prompt_client_error_never_500(registry, line):
    answer = raw(registry, line, timeout=5)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]


def test_a_10kb_path_and_a_100kb_header_are_refused_cleanly(registry):
    assert status_of(raw(registry, b"GET /v2/" + b"a" * 10240 + b"/manifests/latest HTTP/1.1\r\n\r\n")) == 414
    assert status_of(raw(registry, b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 102400 + b"\r\n\r\n")) == 400
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    assert status_of(raw(registry, b"GET /v2/ HTTP/1.1\r\n" + many + b"\r\n")) == 400
    # ... and the server is still there.
    assert request(registry, "GET", "/v2/")[0] == 200


TRAVERSALS = [
    "/v2/../../../../etc/passwd",
    "/v2/%2e%2e/%2e%2e/%2e%2e/etc/manifests/passwd",
    "/v2/library/hello/manifests/..%2f..%2f..%2f..%2fsecret",
    "/v2/library/hello/manifests/%2e%2e%2f%2e%2e%2fsecret",
    "/v2/library/hello/blobs/..%2f..%2fsecret",
    "/v2/library/%252e%252e/manifests/latest",
    "/v2/library/hello/manifests/%00latest",
    "/v2/library/hello/manifests/latest%00",
    "/v2/..%5c..%5csecret/manifests/x",
    "/v2/%c0%ae%c0%ae/%c0%ae%c0%ae/manifests/secret",
    "/v2/%ef%bc%8e%ef%bc%8e/manifests/secret",
    "/v2//etc/manifests/passwd",
    "/v2/library/hello/manifests/latest?ns=../../..",
    "/v2/library/hello/manifests/latest?ns=%2e%2e%2f%2e%2e",
    "/v2/library/hello/manifests/latest?ns=/",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_never_escapes_the_tree(registry, full_tree, path):
    secret = full_tree.root.parent / "secret"
    secret.write_text("TOP SECRET")
    status, _headers, body = request(registry, "GET", path)
    assert b"TOP SECRET" not in body and b"root:" not in body
    if "?ns=" in path:
        # A namespace that is not a host is ignored: the plain repository answers.
        assert (status, body) == (200, full_tree.hello.data)
    else:
        assert status in (400, 404), (status, body)


def tree_snapshot(root):
    snapshot = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            snapshot[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snapshot


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "MKCOL",
                                    "BREW", "X-CUSTOM"])  # tokens llhttp does not know: still 405
def test_every_method_but_get_and_head_is_405_and_changes_nothing(registry, full_tree, method):
    before = tree_snapshot(full_tree.root)
    layer = full_tree.hello.layers[0]
    for path in ["/v2/", "/v2/library/hello/manifests/latest", f"/v2/library/hello/blobs/{layer.digest}",
                 "/v2/library/hello/blobs/uploads/", "/v2/new/repo/manifests/v1", "/anything"]:
        status, headers, body = request(registry, method, path, body=b'{"schemaVersion":2}')
        assert status == 405 and headers["Allow"] == "GET, HEAD" and b"UNSUPPORTED" in body
    assert tree_snapshot(full_tree.root) == before


def test_a_large_upload_is_not_read_but_answered(registry):
    """A 405 for a PUT must not wait for (or drain) a body it will never use."""
    host, port = registry.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"PUT /v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        sock.sendall(b"x" * 65536)
        answer = sock.recv(65536)
    assert status_of(answer) == 405 and b"Connection: close" in answer


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_clients_vanishing_mid_blob_leak_nothing(registry, full_tree):
    layer = full_tree.big.layers[0]
    request(registry, "GET", "/v2/")
    baseline = fd_count(registry.process.pid)
    host, port = registry.host_port.rsplit(":", 1)
    request_bytes = f"GET /v2/big/blob/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    def vanish():
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request_bytes)
            sock.recv(65536)  # the headers and a little body, then hang up

    threads = [threading.Thread(target=vanish) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    deadline = time.monotonic() + 20
    while fd_count(registry.process.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fd_count(registry.process.pid) <= baseline
    status, digest, _size = sha256_of_body(registry, f"/v2/library/hello/blobs/{full_tree.hello.layers[0].digest}")
    assert (status, digest) == (200, full_tree.hello.layers[0].digest)
    assert "Traceback" not in registry.log()


def test_an_idle_keep_alive_connection_is_kept_over_30_seconds(registry):
    """containerd reuses idle connections for up to 30 s."""
    connection = connect(registry, timeout=10)
    try:
        connection.request("GET", "/v2/")
        connection.getresponse().read()
        sock = connection.sock
        time.sleep(32)
        connection.request("GET", "/v2/")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b"{}"
        assert connection.sock is sock  # the same connection, not a silent reconnect
    finally:
        connection.close()


def test_a_tls_handshake_on_the_http_port_is_refused_with_one_clean_log_line(registry):
    hello = bytes.fromhex("16030100de010000da0303") + bytes(range(32)) + b"\x00\x02\x13\x01\x01\x00"
    answer = raw(registry, hello, timeout=5)
    assert status_of(answer) == 400
    time.sleep(0.2)
    log = registry.log()
    assert "TLS handshake on a plain-HTTP port" in log
    assert "\x16" not in log and "gevent._socket3" not in log


@contextmanager
def traced_registry(root, tmp_path, syscalls, *args):
    """The registry under strace, tracing `syscalls`; yields (registry, trace file)."""
    import shutil

    strace = shutil.which("strace")
    assert strace, "strace is needed to watch the server's system calls (apt-get install strace)"
    trace = tmp_path / "trace"
    prefix = [strace, "-f", "-qq", "-e", f"trace={syscalls}", "-e", "read=none", "-e", "write=none",
              "-s", "0", "-o", str(trace)]
    # SIGTERM goes to the traced server itself; strace then exits with it.
    with running_registry(root, *args, prefix=prefix, signal_child=True, log_path=tmp_path / "registry.log",
                          start_timeout=30) as registry:
        yield registry, trace


def call_name(line: str) -> str:
    """`read` of `1234  read(5, ...) = 10`: strace -f prefixes each line with the pid."""
    return line.split(None, 1)[-1].split("(", 1)[0]


def returned(line: str) -> int:
    value = line.rsplit("=", 1)[1].strip()
    return int(value) if value.isdigit() else -1


def test_blobs_leave_by_sendfile_never_read_into_python(full_tree, tmp_path):
    """Zero-copy (P14): the kernel copies the file to the socket; Python never reads it."""
    layer = full_tree.big.layers[0]
    with traced_registry(full_tree.root, tmp_path, "sendfile,read") as (registry, trace):
        status, digest, size = sha256_of_body(registry, f"/v2/big/blob/blobs/{layer.digest}")
        assert (status, digest, size) == (200, layer.digest, layer.size)
    calls = trace.read_text().splitlines()
    sent = sum(returned(line) for line in calls if "sendfile(" in line and returned(line) > 0)
    assert sent == layer.size
    reads = [line for line in calls if call_name(line) == "read"]
    assert reads  # the trace does see reads (the content tree's manifests and links)
    big_reads = [line for line in reads if returned(line) >= 1 << 20]
    assert big_reads == []  # nothing read the blob into Python


def test_each_answer_leaves_in_as_few_system_calls_as_it_can(full_tree, tmp_path):
    """A manifest's head and body in one send; a blob's head held back with MSG_MORE to share
    the file's first packet, then sendfile; one write per access-log line."""
    image, layer = full_tree.hello, full_tree.hello.layers[0]
    with traced_registry(full_tree.root, tmp_path, "sendto,sendfile,write") as (registry, trace):
        answer = raw(registry, b"GET /v2/library/hello/manifests/latest HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.endswith(image.data)
        manifest_answer = len(answer)
        connection = connect(registry)
        connection.request("GET", f"/v2/library/hello/blobs/{layer.digest}")
        assert connection.getresponse().read() == layer.data
        connection.close()
        time.sleep(0.3)
        access_lines = [line for line in registry.log().splitlines() if '"GET /v2/library/hello/' in line]
    all_lines = registry.log().splitlines()
    calls = [line for line in trace.read_text().splitlines() if "resumed" not in line]
    sends = [line for line in calls if "sendto(" in line]
    # One sendto carries the manifest's whole answer (head and body).
    assert any(returned(line) == manifest_answer for line in sends), sends
    # The blob: its head with MSG_MORE, then the file by sendfile.
    more = [index for index, line in enumerate(calls) if "sendto(" in line and "MSG_MORE" in line]
    assert len(more) == 1
    assert any("sendfile(" in line and returned(line) == layer.size for line in calls[more[0] + 1:])
    # One write(2) to stderr per log line, the access log's two included.
    assert len(access_lines) == 2
    log_writes = [line for line in calls if call_name(line) == "write" and "write(2," in line]
    assert len(log_writes) == len(all_lines), (log_writes, all_lines)


def test_random_bytes_never_get_a_500_and_the_server_survives(registry):
    import random

    rng = random.Random(20261129)
    words = [b"GET", b"HEAD", b"PUT", b" ", b"/v2/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b":", b"Range",
             b"bytes=", b"-", b"0", b"%00", b"..", b"manifests", b"Content-Length: 3", b"\x00", b"\xff"]
    for _ in range(300):
        noise = b"".join(rng.choice(words) if rng.random() < 0.7 else bytes([rng.randrange(256)])
                         for _ in range(rng.randrange(1, 40)))
        answer = raw(registry, noise + b"\r\n\r\n", timeout=3)
        assert not answer.startswith(b"HTTP/1.1 5"), (noise, answer[:200])
    assert request(registry, "GET", "/v2/")[0] == 200
    assert "Traceback" not in registry.log()
