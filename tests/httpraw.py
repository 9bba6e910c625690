"""Small HTTP/1.1 clients for the tests: http.client for well-formed requests, a raw socket
for what no library would send."""

import hashlib
import http.client
import socket
from typing import Dict, Optional, Tuple

TIMEOUT = 10.0


def connect(registry, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    host, port = registry.host_port.rsplit(":", 1)
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def request(registry, method: str, path: str, headers: Optional[Dict[str, str]] = None,
            body: Optional[bytes] = None) -> Tuple[int, Dict[str, str], bytes]:
    connection = connect(registry)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k: v for k, v in response.getheaders()}, data
    finally:
        connection.close()


def raw(registry, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send bytes as they are; return all the server answers until it closes or pauses."""
    host, port = registry.host_port.rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def sha256_of_body(registry, path: str, headers=None) -> Tuple[int, str, int]:
    connection = connect(registry, timeout=60)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        digest = hashlib.sha256()
        size = 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
        return response.status, "sha256:" + digest.hexdigest(), size
    finally:
        connection.close()


def read_response(sock_file, method: str = "GET") -> Tuple[int, Dict[str, str], bytes]:
    """One response from a socket's file (`sock.makefile("rb")`), leaving the next one unread:
    for pipelined requests, whose answers share one buffer."""
    status_line = sock_file.readline()
    if not status_line:
        raise ConnectionError("closed before an answer")
    status = int(status_line.split(b" ", 2)[1])
    headers = {}
    while True:
        line = sock_file.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip()] = value.strip()
    length = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("Content-Length", 0))
    return status, headers, sock_file.read(length)


def closed_after(sock, timeout: float = TIMEOUT) -> bool:
    """True when the server closes the connection (reading gives EOF or a reset) in time."""
    sock.settimeout(timeout)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
