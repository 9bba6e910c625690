"""HTTP/1.1 framing as RFC 9112 asks, over raw sockets: what could smuggle a request behind a
proxy is refused with a 400, the OCI error body and a close; pipelined requests are answered
in order; odd but valid forms (absolute target, HTTP/1.0) are served."""

import json
import socket

import pytest

from httpraw import closed_after, raw, read_response, status_of

# After each refused head, a second request that a lenient parser would answer: the smuggled one.
SMUGGLED = b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n"

REFUSED = {
    "two different Content-Lengths":
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n",
    "whitespace between a header name and its colon":
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length : 41\r\n\r\n",
    "Content-Length with Transfer-Encoding":
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "NUL in a header value":
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare CR in a header value":
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "obs-fold":
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n",
    "HTTP/1.1 without Host":
        b"GET /v2/ HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
    "HTTP/1.1 with two Hosts":
        b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


def talk(registry, data: bytes, timeout: float = 10.0) -> socket.socket:
    host, port = registry.host_port.rsplit(":", 1)
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    sock.sendall(data)
    return sock


@pytest.mark.parametrize("case", list(REFUSED))
def test_ambiguous_framing_is_refused_and_nothing_after_it_is_answered(registry, case):
    with talk(registry, REFUSED[case] + SMUGGLED) as sock:
        answers = sock.makefile("rb")
        status, headers, body = read_response(answers)
        assert status == 400, case
        assert headers["Connection"] == "close" and headers["Content-Type"] == "application/json"
        error = json.loads(body)["errors"][0]
        assert error["code"] and error["message"]
        # The connection ends there: the request behind it is never answered.
        assert answers.read() == b""


def test_an_http09_request_line_gets_a_prompt_400(registry):
    """`GET /v2/` and nothing else: no version, so no headers will ever follow."""
    with talk(registry, b"GET /v2/\r\n", timeout=5) as sock:
        answer = sock.recv(65536)
    assert status_of(answer) == 400 and b'"errors"' in answer


def test_absolute_form_targets_are_served(registry, full_tree):
    target = f"http://{registry.host_port}/v2/library/hello/manifests/latest?ns=docker.io"
    with talk(registry, f"GET {target} HTTP/1.1\r\nHost: {registry.host_port}\r\n\r\n".encode()) as sock:
        status, headers, body = read_response(sock.makefile("rb"))
    assert (status, body) == (200, full_tree.hello.data)
    assert headers["Docker-Content-Digest"] == full_tree.hello.digest


def test_pipelined_requests_are_answered_in_order(registry, full_tree):
    layer = full_tree.hello.layers[0]
    requests = [("GET", "/v2/library/hello/manifests/latest"), ("HEAD", f"/v2/library/hello/blobs/{layer.digest}"),
                ("GET", "/v2/nope/manifests/latest"), ("GET", f"/v2/library/hello/blobs/{layer.digest}"),
                ("GET", "/v2/")]
    data = b"".join(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for method, path in requests)
    with talk(registry, data) as sock:
        answers = sock.makefile("rb")
        got = [read_response(answers, method) for method, _ in requests]
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        last = read_response(answers)
    assert [status for status, _, _ in got] == [200, 200, 404, 200, 200]
    assert got[0][2] == full_tree.hello.data
    assert got[1][1]["Content-Length"] == str(layer.size) and got[1][2] == b""
    assert json.loads(got[2][2])["errors"][0]["code"] == "NAME_UNKNOWN"
    assert got[3][2] == layer.data and got[4][2] == b"{}"
    assert last[0] == 200 and last[1]["Connection"] == "close"


def test_a_request_split_into_single_bytes_is_served(registry):
    with talk(registry, b"") as sock:
        for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n":
            sock.sendall(bytes([byte]))
        status, _headers, body = read_response(sock.makefile("rb"))
    assert (status, body) == (200, b"{}")


def test_pipelined_answers_stop_at_a_malformed_request(registry):
    data = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n" + SMUGGLED
    with talk(registry, data) as sock:
        answers = sock.makefile("rb")
        assert read_response(answers)[:3:2] == (200, b"{}")
        assert read_response(answers)[0] == 400
        assert answers.read() == b""


def test_http10_needs_no_host_and_is_closed_unless_kept_alive(registry):
    with talk(registry, b"GET /v2/ HTTP/1.0\r\n\r\n") as sock:
        status, _headers, body = read_response(sock.makefile("rb"))
        assert (status, body) == (200, b"{}")
        assert closed_after(sock, timeout=5)
    with talk(registry, b"GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n") as sock:
        answers = sock.makefile("rb")
        status, headers, _body = read_response(answers)
        assert status == 200 and headers["Connection"] == "keep-alive"
        sock.sendall(b"GET /v2/ HTTP/1.0\r\n\r\n")
        assert read_response(answers)[0] == 200


def test_head_never_gets_a_body_even_for_errors(registry):
    with talk(registry, b"HEAD /v2/nope/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
        answers = sock.makefile("rb")
        status, headers, body = read_response(answers, "HEAD")
        assert status == 404 and int(headers["Content-Length"]) > 0 and body == b""
        # The next answer starts right after the HEAD's head: no stray body bytes between.
        assert read_response(answers)[:3:2] == (200, b"{}")


def test_a_request_with_a_body_is_answered_then_closed_without_reading_it(registry):
    data = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED
    with talk(registry, data) as sock:
        answers = sock.makefile("rb")
        status, headers, body = read_response(answers)
        assert (status, body, headers["Connection"]) == (200, b"{}", "close")
        assert answers.read() == b""


def test_header_names_with_underscores_cannot_pose_as_dashes(registry, full_tree):
    """`Range` is honoured; `R_ange`-style look-alikes (X_Forwarded...) never reach the app."""
    layer = full_tree.hello.layers[0]
    answer = raw(registry, f"GET /v2/library/hello/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n"
                           "If_None_Match: *\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) == 200


def test_the_environ_is_what_pep_3333_asks(small_tree):
    """In-process: wsgiref's validator checks every environ the handler builds (it fails the
    request on a missing or mistyped key) and the app sees the decoded path and the headers."""
    import wsgiref.validate

    import gevent
    from gevent import socket as gsocket

    from minimal_registry.server import ConnectionTable, RegistryServer

    seen = []

    def app(environ, start_response):
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    server = RegistryServer(("127.0.0.1", 0), wsgiref.validate.validator(app), table=ConnectionTable(10),
                            access_log=None)
    server.start()
    try:
        client = gsocket.create_connection(server.address, timeout=10)
        client.sendall(b"GET /v2/a%20b/manifests/x?n=1&last=y HTTP/1.1\r\nHost: h:1\r\nX-Two: a\r\nX-Two: b\r\n"
                       b"Connection: close\r\n\r\n")
        answer = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
        client.close()
    finally:
        server.table.stopping = True
        server.close()
        server.table.end_waiting()
        gevent.sleep(0)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer
    (environ,) = seen
    assert environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/v2/a b/manifests/x"
    assert environ["QUERY_STRING"] == "n=1&last=y" and environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["HTTP_HOST"] == "h:1" and environ["HTTP_X_TWO"] == "a,b"
    assert environ["wsgi.url_scheme"] == "http" and environ["REMOTE_ADDR"] == "127.0.0.1"
    assert callable(environ["wsgi.file_wrapper"])
