"""One client connection: read requests with llhttp, call the WSGI app, write the answers.

`Connection` is the `handler_class` of our gevent server (server.py): gevent accepts, this
class does everything from the socket to the app call and back.

- Requests are parsed by `httptools` (the Python binding of llhttp, Node's parser), strictly
  (RFC 9112): two Content-Lengths, whitespace before a colon, Content-Length with
  Transfer-Encoding, NUL or bare CR in a header, obs-fold, a missing or doubled Host on
  HTTP/1.1, an HTTP/0.9 line, junk: `400` with the OCI error body, and the connection closed.
- Pipelined requests are answered in order, each after the other connections had their
  turn (a busy or pipelining client cannot hold the loop). Request bodies are never read
  (no endpoint takes one): the connection is closed after answering, with a lingering
  half-close.
- Deadlines: a new connection must send its whole first request head within the header
  timeout of being accepted; a kept-alive one may wait the idle timeout for its next request,
  then has the header timeout from that request's first byte. Every send may stall at most
  the send timeout.
- A connection waiting for a request is registered in the `ConnectionTable`, which may end it
  at once: to admit a new connection at the cap (oldest first), or at shutdown.
- Answers: the head and a small body in one `send`; a file (PEP 3333 `wsgi.file_wrapper`) as
  the head with `MSG_MORE`, then `os.sendfile`, cooperatively; under TLS, 64 KiB reads.
  HEAD never gets a body, decided here only.
- One access-log line per answer (text or JSON, one write), marked when the answer did not
  complete (client gone, stalled, file shrank).
"""

import io
import json
import logging
import os
import re
import socket
import time
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gevent.socket import wait_write

from minimal_registry.errors import RegistryError

log = logging.getLogger("minimal_registry")

RECV_SIZE = 65536
# RFC 9112 section 3 leaves the limits to the server; these are gevent pywsgi's, which clients met.
MAX_URL = 8192
MAX_HEAD = 65536
MAX_HEADERS = 100
# After a final error answer: how long, and how much, to read from a client still sending.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# Bodies up to this size leave in the same send as the head.
COALESCE_LIMIT = 64 * 1024
# Under TLS, files are read and encrypted in blocks this large (no sendfile through TLS).
# Below glibc's 128 KiB mmap threshold: a freed 1 MiB block would raise that threshold, and
# every later mid-sized allocation would then fragment the heap (RSS grew 30 MiB in a soak
# when manifest reads did this; see treesafety.OpenFile.read).
TLS_BLOCK = 64 * 1024
# Answers that never carry a body (RFC 9110 section 6.4.1).
NO_BODY_STATUSES = frozenset((b"204", b"304")) | frozenset(b"1%02d" % n for n in range(100))


class AccessLog:
    """Access-log lines gathered during one turn of the event loop and written at its end in
    one call: under load one write carries the lines of many requests (one write per line
    cost a tenth of a manifest answer). A line waits at most until the loop next turns,
    which every connection lets it do after each answer."""

    def __init__(self, stream):
        self.stream = stream
        self.pending = []

    def write(self, line: str) -> None:
        if not self.pending:
            gevent.get_hub().loop.run_callback(self.flush)
        self.pending.append(line)

    def flush(self) -> None:
        lines, self.pending = self.pending, []
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or full: serving goes on without its log


class ConnectionEnded(gevent.GreenletExit):
    """Thrown into a connection waiting for a request: to admit another one, or at shutdown."""


class _HeadComplete(Exception):
    """Raised inside the parser to stop it at a request that has a body (never read)."""


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FileWrapper:
    """PEP 3333 `wsgi.file_wrapper`: the app hands over an open file positioned at the first
    byte to send; Content-Length says how many. Iterating it (any other server) reads blocks."""

    __slots__ = ("file", "block_size")

    def __init__(self, file, block_size: int = TLS_BLOCK):
        self.file, self.block_size = file, block_size

    def __iter__(self):
        read, size = self.file.read, self.block_size
        while True:
            block = read(size)
            if not block:
                return
            yield block

    def close(self) -> None:
        self.file.close()


def error_answer(status: int, reason: str) -> bytes:
    """A complete final answer for a request we refuse before the app sees it."""
    phrase = {400: "Bad Request", 405: "Method Not Allowed", 414: "URI Too Long"}[status]
    allow = b"Allow: GET, HEAD\r\n" if status == 405 else b""
    body = RegistryError(status, "UNSUPPORTED", reason).body()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (status, phrase.encode(), allow, len(body), body))


# A request line that starts with a method llhttp does not know (`BREW /v2/ HTTP/1.1`): a
# valid token (RFC 9110 section 9.1) all the same, so it is a method we do not allow (405),
# not a malformed request (400). The request starts at the beginning of what arrived or
# after the previous request's head.
_UNKNOWN_METHOD_RE = re.compile(rb"(?:^|\r\n\r\n)[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [^ \r\n]")


class _Clock:
    """Date header and access-log timestamps, formatted once per second."""

    second = -1
    http_date = ""
    local_stamp = ""
    utc_prefix = ""

    def tick(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            self.second = second
            self.http_date = _http_date(second)
            self.local_stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second)) + _utc_offset(second)
            self.utc_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(second: int) -> str:
    """RFC 9110 section 5.6.7 IMF-fixdate (English names whatever the locale)."""
    t = time.gmtime(second)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (_DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
                                                    t.tm_hour, t.tm_min, t.tm_sec)


def _utc_offset(second: int) -> str:
    offset = time.localtime(second).tm_gmtoff
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return "%s%02d:%02d" % (sign, offset // 3600, offset % 3600 // 60)


CLOCK = _Clock()


class Request:
    __slots__ = ("method", "target", "version", "keep_alive", "headers", "has_body", "started")

    def __init__(self, method, target, version, keep_alive, headers, has_body, started):
        self.method, self.target, self.version = method, target, version
        self.keep_alive, self.headers, self.has_body, self.started = keep_alive, headers, has_body, started


class Connection:
    """One client connection, from its first byte to its close."""

    def __init__(self, sock, address, server):
        self.socket = sock
        self.client_address = address
        self.server = server
        self.accepted = time.time()
        if isinstance(address, tuple):
            self.client = address[0]
            self.base_environ = dict(server.environ, REMOTE_ADDR=address[0], REMOTE_PORT=str(address[1]))
        else:
            self.client = str(address) or "-"
            self.base_environ = dict(server.environ, REMOTE_ADDR="")
        self.tls = server.ssl_enabled
        self.base_environ["wsgi.file_wrapper"] = FileWrapper
        try:
            # The head and a file leave in separate calls (sendfile cannot carry the head):
            # with Nagle's algorithm the file's first bytes wait for the client's delayed
            # ACK, ~40 ms on every answer. MSG_MORE keeps them in one packet instead.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket in tests): nothing to tune
        self.parser = httptools.HttpRequestParser(self)
        self.ready = []  # parsed request heads not yet answered, in order
        self.in_head = False  # the parser is inside a request head
        self.url = b""
        self.last_url_piece = None
        self.headers = []
        self.head_bytes = 0
        self.head_started = 0.0

    # --- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self):
        self.in_head = True
        self.url = b""
        self.headers = []
        self.head_started = time.time()

    def on_url(self, piece):
        self.url += piece
        self.last_url_piece = piece
        if len(self.url) > MAX_URL:
            raise _BadRequest(414, "request target too long")

    def on_header(self, name, value):
        headers = self.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            raise _BadRequest(400, "too many header fields")

    def on_headers_complete(self):
        parser = self.parser
        self.in_head = False
        self.head_bytes = 0
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _BadRequest(400, "HTTP/%s is not supported" % version)
        hosts = 0
        has_body = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"host":
                hosts += 1
            elif lowered == b"content-length":
                has_body = value.strip() != b"0"
            elif lowered == b"transfer-encoding":
                has_body = True
        # RFC 9112 section 3.2: HTTP/1.1 requires exactly one Host.
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _BadRequest(400, "a request needs exactly one Host header" if hosts else "missing Host header")
        self.ready.append(Request(parser.get_method(), self.url, version, parser.should_keep_alive(),
                                  self.headers, has_body, self.head_started))
        if has_body:
            # Never read: the answer is followed by a close, so stop parsing here.
            raise _HeadComplete()

    # --- the connection's life ----------------------------------------------------------

    def handle(self):
        greenlet = gevent.getcurrent()
        self.greenlet = greenlet
        try:
            self._serve()
        except ConnectionEnded:
            pass
        except OSError:
            pass  # the client went away or stalled while we read: nothing to answer
        finally:
            self.server.table.stop_waiting(greenlet)
            try:
                self.socket.close()
            except OSError:
                pass

    def _serve(self):
        server = self.server
        sock = self.socket
        table = server.table
        greenlet = self.greenlet
        ready = self.ready
        # The first request head must be complete within the header timeout of the accept.
        deadline = self.accepted + server.header_timeout
        first = True
        while True:
            if not ready:
                if self.in_head or first:
                    waiting_timeout = deadline - time.time()
                else:
                    waiting_timeout = server.idle_timeout
                if server.stopping:
                    return
                # Waiting for a request: the table may end this connection to admit another.
                table.start_waiting(greenlet)
                try:
                    sock.settimeout(max(waiting_timeout, 0.001))
                    try:
                        data = sock.recv(RECV_SIZE)
                    except socket.timeout:
                        if self.in_head:
                            self._warn(f"request headers not received within {server.header_timeout:g}s: connection closed")
                        return
                finally:
                    table.stop_waiting(greenlet)
                if not data:
                    return
                if not first and not self.in_head:
                    deadline = time.time() + server.header_timeout
                if not self._feed(data, first):
                    return
                first = False
                # The rest of the head, within the deadline.
                while not ready and self.in_head:
                    sock.settimeout(max(deadline - time.time(), 0.001))
                    try:
                        data = sock.recv(RECV_SIZE)
                    except socket.timeout:
                        self._warn(f"request headers not received within {server.header_timeout:g}s: connection closed")
                        return
                    if not data or not self._feed(data, False):
                        return
            request = ready.pop(0)
            sock.settimeout(server.send_timeout)
            if not self._respond(request):
                return
            if request.has_body:
                self._linger()
                return
            if ready or self.in_head:
                # The next pipelined request: its head started arriving already.
                deadline = time.time() + server.header_timeout
            # Let the other connections run before this one's next request: when that request
            # is already in the socket, recv returns without yielding, and a busy client would
            # otherwise be served again and again while the others wait (wrk's p99: 19 ms
            # with this, 110-240 ms without).
            gevent.sleep(0)

    def _feed(self, data: bytes, first: bool) -> bool:
        """Parse what arrived; False when the connection must end (after answering)."""
        self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or an Upgrade request: answered as HTTP (405 or the resource), then
            # closed, since what follows is not HTTP.
            if self.ready:
                self.ready[-1].keep_alive = False
            return True
        except _BadRequest as error:
            return self._refuse(error.status, error.reason)
        except httptools.HttpParserError as error:
            cause = error.__context__
            if isinstance(cause, _HeadComplete):
                return True
            if isinstance(cause, _BadRequest):
                return self._refuse(cause.status, cause.reason)
            if first and data.startswith(b"\x16\x03"):
                return self._refuse(400, "TLS handshake on a plain-HTTP port", log_reason=(
                    "TLS handshake on a plain-HTTP port: the client wants https://, this listener serves http://"))
            if isinstance(error, httptools.HttpParserInvalidMethodError) and _UNKNOWN_METHOD_RE.search(data):
                return self._refuse(405, "this registry is read-only: only GET and HEAD are supported")
            return self._refuse(400, f"malformed request: {error}")
        if self.in_head:
            if self.head_bytes > MAX_HEAD + MAX_URL:
                return self._refuse(400, "request head too large")
            if self._http09_line(data):
                return self._refuse(400, "HTTP/0.9 requests are not supported: a request line ends with HTTP/1.1")
        return True

    def _http09_line(self, data: bytes) -> bool:
        """True when the head in progress is a request line with no version (`GET /v2/`).

        llhttp takes it as HTTP/0.9 and waits for headers that such a client never sends;
        answer it now instead of at the header deadline.
        """
        piece, self.last_url_piece = self.last_url_piece, None
        if piece is None or self.parser.get_http_version() != "0.0":
            return False
        end = 0
        if piece:
            # The last occurrence is this request's target: only its line end can follow it.
            end = data.rfind(piece)
            if end < 0:
                return False
            end += len(piece)
        return data[end:end + 1] in (b"\r", b"\n")

    def _refuse(self, status: int, reason: str, log_reason: str = "") -> bool:
        """Answer what is ready, then `status` for the request that could not be parsed."""
        ready, self.ready = self.ready, []
        sock = self.socket
        sock.settimeout(self.server.send_timeout)
        for request in ready:
            request.keep_alive = True  # the refusal below closes
            if not self._respond(request):
                return False
        self._warn(log_reason or f"{reason}"[:300])
        answer = error_answer(status, reason)
        started = self.head_started if self.in_head else time.time()
        complete = True
        try:
            self._send_all(answer)
        except OSError:
            complete = False
        self._log("-", self._printable_url(), str(status), len(answer) if complete else 0, started, b"-",
                  None if complete else "client gone")
        if complete:
            self._linger()
        return False

    def _printable_url(self) -> str:
        return _printable(self.url[:200].decode("latin-1")) if self.url else "-"

    # --- answering --------------------------------------------------------------------

    def _respond(self, request: Request) -> bool:
        """Call the app for one request and send its answer; True to keep the connection."""
        server = self.server
        environ = self._environ(request)
        status_headers = []

        def start_response(status, headers, exc_info=None):
            if exc_info and sent_head:
                raise exc_info[1].with_traceback(exc_info[2])
            status_headers[:] = [status, headers]
            return write_unsupported

        sent_head = False
        keep_alive = request.keep_alive and not request.has_body
        incomplete = None
        sent = 0
        status = "500"
        try:
            result = server.application(environ, start_response)
        except Exception:  # noqa: BLE001 - a bug of ours: a 500, a traceback, a closed connection
            log.exception("the app failed on %s %s", request.method.decode("latin-1"), self._target_text(request))
            answer = error_answer_500()
            self._send_all(answer)
            self._log(request.method.decode("latin-1"), self._target_text(request), "500", len(answer),
                      request.started, self._user_agent(request), None)
            return False
        try:
            status, headers = status_headers
            send_body = request.method != b"HEAD" and status[:3].encode() not in NO_BODY_STATUSES
            length = None
            for name, value in headers:
                if name == "Content-Length" or (len(name) == 14 and name.lower() == "content-length"):
                    length = int(value)
            app_lines = "".join(["%s: %s\r\n" % header for header in headers])
            if app_lines.count("\n") != len(headers) or app_lines.count("\r") != len(headers):
                raise ValueError("a header of the app's answer holds a line break")
            lines = ["HTTP/1.1 ", status, "\r\n", app_lines]
            body = None
            if length is None and send_body:
                if isinstance(result, list):
                    body = b"".join(result)
                    length = len(body)
                    lines += ("Content-Length: ", str(length), "\r\n")
                else:
                    # Length unknown: the close ends the body (RFC 9112 section 6.3).
                    keep_alive = False
            if server.stopping:
                keep_alive = False
            CLOCK.tick(time.time())
            lines += ("Date: ", CLOCK.http_date, "\r\n")
            if not keep_alive:
                lines.append("Connection: close\r\n\r\n")
            elif request.version == "1.0":
                lines.append("Connection: keep-alive\r\n\r\n")
            else:
                lines.append("\r\n")
            text = "".join(lines)
            head = text.encode("latin-1")
            sent_head = True
            if not send_body:
                self._send_all(head)
                sent = len(head)
            elif isinstance(result, FileWrapper):
                sent, incomplete = self._send_file(head, result, length)
            else:
                if body is None:
                    body = result[0] if isinstance(result, list) and len(result) == 1 else None
                if body is not None and len(body) <= COALESCE_LIMIT:
                    # One send, one packet, for the head and a small body.
                    self._send_all(head + body)
                    sent = len(head) + len(body)
                    if length is not None and len(body) != length:
                        incomplete, keep_alive = "body length differs from Content-Length", False
                else:
                    self._send_all(head)
                    sent = len(head)
                    for chunk in ([body] if body is not None else result):
                        if chunk:
                            self._send_all(chunk)
                            sent += len(chunk)
                    if length is not None and sent - len(head) != length:
                        incomplete, keep_alive = "body shorter than Content-Length", False
        except socket.timeout:
            incomplete = f"client read nothing for {server.send_timeout:g}s"
            keep_alive = False
        except OSError:
            incomplete = "client went away"
            keep_alive = False
        except ConnectionEnded:
            incomplete = "stopped"
            keep_alive = False
            raise
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            self._log(request.method.decode("latin-1"), self._target_text(request), status[:3], sent,
                      request.started, self._user_agent(request), incomplete)
        if incomplete:
            keep_alive = False
        return keep_alive

    def _send_file(self, head: bytes, wrapper: FileWrapper, length):
        """Send the head and `length` bytes of the wrapper's file from its position:
        (bytes sent, why it is incomplete or None)."""
        file = wrapper.file
        offset = file.tell()
        if length is None:
            length = os.fstat(file.fileno()).st_size - offset
        if self.tls:
            # sendfile writes plain bytes to the socket: through TLS, read and send.
            self._send_all(head)
            sent = len(head)
            left = length
            while left > 0:
                block = file.read(min(wrapper.block_size, left))
                if not block:
                    return sent, "file shrank while sent"
                self._send_all(block)
                sent += len(block)
                left -= len(block)
            return sent, None
        # MSG_MORE: hold the head back so it leaves in the same packet as the file's first
        # bytes (TCP_NODELAY would otherwise send it alone).
        self._send_all(head, socket.MSG_MORE)
        sent = len(head)
        socket_fd = self.socket.fileno()
        file_fd = file.fileno()
        timeout = self.server.send_timeout
        left = length
        while left > 0:
            try:
                count = os.sendfile(socket_fd, file_fd, offset, left)
            except BlockingIOError:
                wait_write(socket_fd, timeout=timeout, timeout_exc=socket.timeout("send stalled"))
                continue
            if count == 0:
                # The file is shorter than when it was looked up: the answer cannot be
                # completed; the close tells the client (its Content-Length is not met).
                return sent, "file shrank while sent"
            offset += count
            left -= count
            sent += count
        return sent, None

    def _send_all(self, data, flags: int = 0) -> None:
        """sendall, each send waiting at most the send timeout (gevent's own sendall asks the
        kernel for the socket's buffer size on every call, which costs more than a small send)."""
        send = self.socket.send
        if self.tls:
            flags = 0  # SSL sockets take no flags
        sent = send(data, flags) if flags else send(data)
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            view = view[send(view, flags) if flags else send(view):]

    def _linger(self) -> None:
        """Half-close, then drop what the client still sends, for a moment, before closing.

        Closing with unread request bytes in the kernel's buffer makes it send a reset, which
        can destroy the answer before the client reads it (RFC 9112 section 9.6).
        """
        sock = self.socket
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.time() + LINGER_SECONDS
            drained = 0
            while drained < LINGER_BYTES:
                left = deadline - time.time()
                if left <= 0:
                    break
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    # --- the environ --------------------------------------------------------------------

    def _environ(self, request: Request) -> dict:
        target = request.target
        if target[:1] != b"/":
            target = _origin_form(target)
        path, _, query = target.partition(b"?")
        path = path.partition(b"#")[0]
        environ = self.base_environ.copy()
        environ["REQUEST_METHOD"] = request.method.decode("latin-1")
        # PEP 3333: PATH_INFO is the decoded path, as bytes in a latin-1 str.
        environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/" + request.version
        environ["wsgi.input"] = io.BytesIO()
        for name, value in request.headers:
            if b"_" in name:
                continue  # X_Forwarded could pose as X-Forwarded: dropped, as most servers do
            key = name.upper().replace(b"-", b"_").decode("latin-1")
            value = value.decode("latin-1")
            if key == "CONTENT_LENGTH" or key == "CONTENT_TYPE":
                environ[key] = value
                continue
            key = "HTTP_" + key
            if key in environ:
                environ[key] += "," + value
            else:
                environ[key] = value
        return environ

    # --- logs ---------------------------------------------------------------------------

    @staticmethod
    def _target_text(request: Request) -> str:
        return _printable(request.target[:2048].decode("latin-1"))

    @staticmethod
    def _user_agent(request: Request) -> bytes:
        for name, value in request.headers:
            if len(name) == 10 and name.lower() == b"user-agent":
                return value
        return b"-"

    def _log(self, method: str, target: str, status: str, sent: int, started: float, user_agent: bytes,
             incomplete) -> None:
        access_log = self.server.access_log
        if access_log is None:
            return
        now = time.time()
        CLOCK.tick(now)
        duration = now - started
        agent = _printable(user_agent.decode("latin-1"))
        if self.server.log_format == "json":
            record = {
                "time": "%s.%03d+00:00" % (CLOCK.utc_prefix, int(now * 1000) % 1000),
                "client": self.client, "method": method, "path": target,
                "status": int(status) if status.isdigit() else status, "bytes": sent,
                "duration_ms": round(duration * 1000, 3), "user_agent": agent, "complete": incomplete is None,
            }
            if incomplete:
                record["incomplete"] = incomplete
            line = json.dumps(record, separators=(",", ":")) + "\n"
        else:
            line = '%s %s "%s %s" %s %d %.3fs "%s"%s\n' % (
                self.client, CLOCK.local_stamp, method, target, status, sent, duration, agent,
                f" INCOMPLETE ({incomplete})" if incomplete else "")
        access_log.write(line)

    def _warn(self, message: str) -> None:
        address = self.client_address
        where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        log.warning("client %s: %s", where, message)


def write_unsupported(data):
    raise NotImplementedError("the registry app returns its body; it never calls write()")


def error_answer_500() -> bytes:
    body = RegistryError(500, "UNKNOWN", "internal error: see the server's log").body()
    return (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def _origin_form(target: bytes) -> bytes:
    """The path and query of an absolute-form target (RFC 9112 section 3.2.2)."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return target  # `*` or an authority: no endpoint has it, the app says 404
    path = url.path or b"/"
    return path + b"?" + url.query if url.query is not None else path


def _printable(text: str) -> str:
    """Client-chosen text as it may go into a log line: printable ASCII, escapes otherwise."""
    return text if text.isascii() and text.isprintable() else ascii(text)[1:-1]

