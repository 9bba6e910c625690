"""One client connection under gevent: deadlines, zero-copy blob sending, the access log.

`RegistryHandler` is gevent's `WSGIHandler` with what a registry facing real clients needs
and pywsgi lacks (PROTOCOL.md, "gevent facts"):

- an idle keep-alive timeout (longer than containerd's 30 s), and a deadline for reading
  a request's line and headers once its first byte has arrived (slowloris);
- a stall timeout on every send;
- blobs sent with `os.sendfile` from the file to the socket, cooperatively: on
  `BlockingIOError` the greenlet waits for the socket to become writable;
- request bodies are never read (no endpoint takes one): the connection is closed after
  answering instead of draining an arbitrarily large body;
- one access-log line per request, as text or JSON;
- a prompt JSON 400 for a request that cannot be parsed, and no traceback for a client
  that goes away or stalls.
"""

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone

import gevent
from gevent.pywsgi import Input, WSGIHandler
from gevent.socket import wait_write

from minimal_registry.app import SENDFILE_KEY
from minimal_registry.errors import RegistryError

log = logging.getLogger("minimal_registry")


class SendStalled(socket.timeout):
    """The client read nothing for the whole send timeout."""


class SendfileBody:
    """A file slice for the handler to send with os.sendfile; what the app returns for a blob."""

    def __init__(self, file, offset: int, length: int):
        self.file, self.offset, self.length = file, offset, length

    def __iter__(self):
        # Only the handler below sends this; never iterated as bytes.
        return iter(())

    def close(self) -> None:
        self.file.close()


def _bad_request_response() -> bytes:
    body = RegistryError(400, "UNSUPPORTED", "malformed HTTP request").body()
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


BAD_REQUEST = _bad_request_response()
# After a final error answer: how long, and how much, to read from a client still sending.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# Bodies up to this size are sent in the same write as the headers.
COALESCE_LIMIT = 64 * 1024


class RegistryHandler(WSGIHandler):
    _header_deadline = None
    _has_body = False

    def __init__(self, sock, address, server, rfile=None):
        super().__init__(sock, address, server, rfile)
        try:
            # Headers and body go out in separate writes (sendfile cannot carry the headers):
            # with Nagle's algorithm the second waits for the client's delayed ACK, ~40 ms
            # on every response.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket in tests): nothing to tune

    # --- deadlines ------------------------------------------------------------------------

    def handle_one_request(self):
        server = self.server
        if server.stopping:
            return None
        # Between requests the connection is idle: wait for the first byte of the next one
        # no longer than the idle timeout. A shutdown may end this wait early.
        self.socket.settimeout(server.idle_timeout)
        server.idle.add(self)
        try:
            if not self.rfile.peek(1):
                return None
        except OSError:
            return None
        finally:
            server.idle.discard(self)
        if server.stopping:
            return None
        self._header_deadline = gevent.Timeout(server.header_timeout)
        self._header_deadline.start()
        try:
            result = super().handle_one_request()
        except gevent.Timeout as timeout:
            if timeout is not self._header_deadline:
                raise
            self._warn(f"request headers not received within {server.header_timeout}s: connection closed")
            return None
        finally:
            self._header_deadline.close()
        if isinstance(result, tuple):
            # pywsgi's answer to a request it could not parse (400, 414).
            self.status, response = result
            self._answer_and_close(response)
            return None
        if self._has_body:
            self._linger()
        return result

    def _answer_and_close(self, response: bytes) -> None:
        """Send a final answer, then read (and drop) what the client still sends for a moment.

        Closing with unread request bytes in the kernel's buffer makes it send a reset, which
        can destroy the answer before the client reads it (RFC 9112 section 9.6).
        """
        try:
            self.socket.sendall(response)
            self.response_length = len(response)
        except OSError:
            return
        self.time_finish = time.time()
        self.log_request()
        self._linger()

    def _linger(self) -> None:
        """Half-close, then drop what the client still sends, for a moment, before closing."""
        try:
            self.socket.shutdown(socket.SHUT_WR)
            self.socket.settimeout(LINGER_SECONDS)
            drained = 0
            while drained < LINGER_BYTES:
                chunk = self.socket.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def read_request(self, raw_requestline):
        result = super().read_request(raw_requestline)
        # The whole head is in: from here on, only sends can stall.
        self._header_deadline.close()
        self.socket.settimeout(self.server.send_timeout)
        transfer_encoding = self.headers.get("transfer-encoding", "").lower()
        self._has_body = bool(self.content_length) or "chunked" in transfer_encoding
        if self._has_body or self.server.stopping:
            self.close_connection = True
        return result

    def get_environ(self):
        environ = super().get_environ()
        if self._has_body:
            # pywsgi drains an unread body before the next request; with the connection
            # closing anyway, a zero-length input makes that a no-op.
            self.wsgi_input = Input(self.rfile, 0)
            environ["wsgi.input"] = self.wsgi_input
        if not self.server.ssl_enabled:
            # sendfile writes plain bytes to the socket: never under TLS.
            environ[SENDFILE_KEY] = SendfileBody
        return environ

    def finalize_headers(self):
        super().finalize_headers()
        if self.close_connection and not any(name.lower() == b"connection" for name, _ in self.response_headers):
            self.response_headers.append((b"Connection", b"close"))

    def _write_with_headers(self, data):
        # One write for the head and a small body (a manifest, an error): one packet, one
        # syscall, instead of pywsgi's two.
        # Only with an exact Content-Length (what the app always sends): never chunked.
        if not data or len(data) > COALESCE_LIMIT or self.provided_content_length is None:
            return super()._write_with_headers(data)
        self.headers_sent = True
        self.finalize_headers()
        self._send(self._head() + data)

    def _send(self, data: bytes, flags: int = 0) -> None:
        """sendall for a small buffer: gevent's sendall asks the kernel for the socket's
        buffer size on every call, which costs more than the send itself here."""
        view = memoryview(data)
        while view:
            view = view[self.socket.send(view, flags):]
        self.response_length += len(data)

    def _head(self) -> bytes:
        head = bytearray(b"HTTP/1.1 ")
        head += self.status + b"\r\n"
        for name, value in self.response_headers:
            head += name + b": " + value + b"\r\n"
        head += b"\r\n"
        return bytes(head)

    # --- zero-copy sending ----------------------------------------------------------------

    def process_result(self):
        if not isinstance(self.result, SendfileBody):
            return super().process_result()
        self.headers_sent = True
        self.finalize_headers()
        head = self._head()
        # MSG_MORE: hold the head back so it leaves in the same packet as the file's first
        # bytes (TCP_NODELAY would otherwise send it alone).
        self._send(head, socket.MSG_MORE)
        self._sendfile(self.result)

    def _sendfile(self, body: SendfileBody) -> None:
        socket_fd = self.socket.fileno()
        file_fd = body.file.fileno()
        offset, left = body.offset, body.length
        while left > 0:
            try:
                sent = os.sendfile(socket_fd, file_fd, offset, left)
            except BlockingIOError:
                wait_write(socket_fd, timeout=self.server.send_timeout,
                           timeout_exc=SendStalled("client read nothing for %ss" % self.server.send_timeout))
                continue
            if sent == 0:
                # The file is shorter than when it was looked up: the response cannot be
                # completed, so end the connection rather than desynchronise it.
                self.close_connection = True
                return
            offset += sent
            left -= sent
            self.response_length += sent

    # --- errors ---------------------------------------------------------------------------

    def handle_error(self, t, v, tb):
        if isinstance(v, (socket.timeout, ConnectionError)):
            # The client stalled or went away mid-response: nothing to answer, no traceback.
            self.status = "%s (%s)" % (getattr(self, "_orig_status", None) or "000", v)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def _handle_client_error(self, ex):
        # pywsgi prints a traceback for some client mistakes (over 100 headers) and the raw
        # bytes for others; one clean line is all a malformed request deserves.
        if (self.requestline or "").startswith("\x16\x03"):
            self._warn("TLS handshake on a plain-HTTP port: the client wants https://, this listener serves http://")
        else:
            reason = getattr(ex, "formatted_message", None) or str(ex) or type(ex).__name__
            self._warn(f"malformed request: {ascii(reason)[1:-1][:200]}")
        return ("400", BAD_REQUEST)

    def _warn(self, message: str) -> None:
        client = self.client_address
        where = f"{client[0]}:{client[1]}" if isinstance(client, tuple) else str(client)
        log.warning("client %s: %s", where, message)

    # --- access log -----------------------------------------------------------------------

    def log_request(self):
        log = self.server.access_log
        if log is None:
            return
        log.write(self.format_request() + "\n")

    def format_request(self):
        duration = (self.time_finish or time.time()) - self.time_start
        client = self.client_address[0] if isinstance(self.client_address, tuple) else self.client_address
        status = (self._orig_status or (self.status.decode("latin-1") if isinstance(self.status, bytes) else self.status) or "000").split()[0]
        method = _printable(self.command or "-")
        # A request that could not be parsed is logged by what its first line said.
        path = _printable(self.path or (self.requestline or "-").strip()[:200])
        user_agent = _printable(self.headers.get("User-Agent", "-") if self.headers is not None else "-")
        if self.server.log_format == "json":
            return json.dumps({
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "client": client, "method": method, "path": path, "status": int(status) if status.isdigit() else status,
                "bytes": self.response_length, "duration_ms": round(duration * 1000, 3), "user_agent": user_agent,
            }, separators=(",", ":"))
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        return '%s %s "%s %s" %s %d %.3fs "%s"' % (client or "-", stamp, method, path, status,
                                                   self.response_length, duration, user_agent)


def _printable(text: str) -> str:
    """Client-chosen text as it may go into a log line: printable ASCII, escapes otherwise."""
    return text if text.isascii() and text.isprintable() else ascii(text)[1:-1]
