"""Run the registry: bind, announce, serve, and stop gracefully. The only module that
sets up gevent's server; the per-connection behaviour lives in `connection`.

Start-up refuses what cannot work (a missing tree, a bad address, a port in use) with one
line and exit code 2. It raises the open-file limit to its hard limit (as Go's runtime does)
and lowers --max-connections if that still cannot fit them, saying so. Once every socket is
bound it logs what it serves and tells systemd READY=1. SIGTERM or SIGINT: STOPPING=1, stop
accepting, end connections waiting for a request at once, let running downloads finish for
up to SHUTDOWN_GRACE seconds, exit 0.
"""

import errno
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import gevent
import gevent.event
import gevent.os
import gevent.socket
from gevent.pywsgi import WSGIServer

from minimal_registry.app import RegistryApp
from minimal_registry.content.formatting import counted
from minimal_registry.connection import AccessLog, Connection, ConnectionEnded
from minimal_registry.fatal import Fatal
from minimal_registry.notify import notify
from minimal_registry.storage import ContentTree

log = logging.getLogger("minimal_registry")

# containerd keeps idle connections for 30 s (IdleConnTimeout in its HTTP transport);
# holding ours a little longer means the client, not us, closes them.
IDLE_TIMEOUT = 75.0
# A new connection's first request head must be complete this long after the accept; a later
# request's head, this long after its first byte (slowloris).
HEADER_TIMEOUT = 10.0
SEND_TIMEOUT = 60.0  # a client that reads nothing for this long is dropped
SHUTDOWN_GRACE = 10.0
# File descriptors: a connection holds its socket and, while sending a blob, the blob's file.
FDS_PER_CONNECTION = 2
# Listening sockets, the log, the notify socket, libev's own, a directory being listed.
FDS_RESERVED = 32
# Accept failing for want of descriptors (EMFILE): pause accepting this long, doubling.
ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_MAX = 0.05, 1.0
ACCEPT_SHORTAGE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


@dataclass(frozen=True)
class ServeConfig:
    """What `serve` needs, checked once by the command line (`cli.serve_config`)."""

    directory: Path
    listen: Tuple[Tuple[str, int], ...]
    tls_cert: Optional[Path]
    tls_key: Optional[Path]
    max_connections: int
    log_format: str
    quiet: bool
    workers: int = 1


class ConnectionTable:
    """Every connection of every listening socket: the cap, and who may be ended at once.

    A connection waiting for a request (a new one that has not spoken yet, or a kept-alive
    one between requests) is listed, oldest first. At the cap, the oldest of them is ended to
    admit a new connection; when none waits, accepting pauses until a connection ends or
    starts waiting. At shutdown all of them are ended at once.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.connections = set()  # their greenlets (not a gevent Pool: the cap is ours, to evict)
        self.waiting = {}  # greenlet -> None, in the order they started waiting
        self.ending = set()  # taken out of `waiting` to be ended, unless a request comes first
        self.servers = []
        self.paused = False
        self.stopping = False

    def spawn(self, function, *args):
        greenlet = gevent.Greenlet.spawn(function, *args)
        self.connections.add(greenlet)
        greenlet.rawlink(self._ended)
        return greenlet

    def join(self, timeout: float) -> None:
        gevent.joinall(list(self.connections), timeout=timeout)

    def kill_all(self) -> None:
        gevent.killall(list(self.connections), block=True, timeout=1)

    def start_waiting(self, greenlet) -> None:
        self.waiting[greenlet] = None
        if self.paused:
            self.resume()

    def stop_waiting(self, greenlet) -> None:
        self.waiting.pop(greenlet, None)
        self.ending.discard(greenlet)

    def _ended(self, greenlet) -> None:
        self.connections.discard(greenlet)
        if self.paused:
            self.resume()

    def resume(self) -> None:
        self.paused = False
        if not self.stopping:
            for server in self.servers:
                server.start_accepting()

    def evict_oldest(self) -> bool:
        """End the connection that has waited longest for a request; False if none waits."""
        for greenlet in self.waiting:
            self._end(greenlet)
            return True
        return False

    def end_waiting(self) -> None:
        for greenlet in list(self.waiting):
            self._end(greenlet)

    def _end(self, greenlet) -> None:
        del self.waiting[greenlet]
        self.ending.add(greenlet)
        # Thrown from the loop, and only if the connection still waits by then: a request
        # that arrived in the meantime is answered, not cut.
        gevent.get_hub().loop.run_callback(self._end_if_still_waiting, greenlet)

    def _end_if_still_waiting(self, greenlet) -> None:
        if greenlet in self.ending:
            self.ending.discard(greenlet)
            greenlet.throw(ConnectionEnded)

    def __len__(self) -> int:
        return len(self.connections)


class RegistryServer(WSGIServer):
    """gevent's WSGIServer driving our own handler class (`connection.Connection`, which
    parses with llhttp and calls the WSGI app), with the connection table's cap and the
    accept hooks below. pywsgi's own WSGIHandler is never used."""

    handler_class = Connection
    # gevent's default of 128 drops the SYNs of a burst (500 nodes' pulls at once), which
    # clients retry only after a second; the kernel caps this at net.core.somaxconn, as Go does.
    backlog = 4096
    idle_timeout = IDLE_TIMEOUT
    header_timeout = HEADER_TIMEOUT
    send_timeout = SEND_TIMEOUT

    def __init__(self, listener, application, *, log_format="text", access_log=None, table=None,
                 multiprocess=False, **ssl_args):
        self.table = table if table is not None else ConnectionTable(1000)
        # `log=None`: the access log is ours (`access_log`); `error_log` is wsgi.errors.
        super().__init__(listener, application, spawn=self.table.spawn, log=None, error_log=sys.stderr,
                         environ={"wsgi.multiprocess": multiprocess}, **ssl_args)
        self.multiprocess = multiprocess
        self.log_format = log_format
        self.access_log = access_log
        self._poll = None
        self._accept_backoff = ACCEPT_BACKOFF_FIRST
        self._shortage_logged = 0.0
        self.table.servers.append(self)

    def update_environ(self):
        # PEP 3333's SERVER_NAME and SERVER_PORT from the bound address, as given: pywsgi
        # would ask the resolver (socket.getfqdn), which in an air gap may wait for a DNS
        # server that is not there.
        host, port = self.address[:2]
        self.environ["SERVER_NAME"] = host
        self.environ["SERVER_PORT"] = str(port)

    def handle(self, sock, address):  # pylint: disable=method-hidden
        self.handler_class(sock, address, self).handle()

    @property
    def stopping(self) -> bool:
        return self.table.stopping

    def full(self) -> bool:  # pylint: disable=method-hidden
        # Called by gevent before each accept.
        table = self.table
        if len(table) < table.limit:
            return False
        if not table.waiting:
            # Every connection is busy: leave new ones in the listen queue until one ends
            # or starts waiting.
            table.paused = True
            return True
        if self._pending():
            table.evict_oldest()
        return False

    def _pending(self) -> bool:
        """A connection is in the listen queue (without accepting it)."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.socket.fileno(), select.POLLIN)
        return bool(self._poll.poll(0))

    def do_read(self):
        try:
            result = super().do_read()
        except OSError as error:
            if error.errno not in ACCEPT_SHORTAGE:
                raise
            self._accept_shortage(error)
            return None
        self._accept_backoff = ACCEPT_BACKOFF_FIRST
        return result

    def _accept_shortage(self, error: OSError) -> None:
        """Out of descriptors: accepting again at once would spin (the queue stays readable).
        End the connection waiting longest, if any, and pause accepting for a moment."""
        now = time.monotonic()
        if now - self._shortage_logged > 10:
            self._shortage_logged = now
            log.warning("cannot accept connections: %s (%d open); pausing accepts, ending idle ones",
                        error.strerror or error, len(self.table))
        self.table.evict_oldest()
        self.stop_accepting()
        delay = self._accept_backoff
        self._accept_backoff = min(delay * 2, ACCEPT_BACKOFF_MAX)
        gevent.spawn_later(delay, self._resume_after_shortage)

    def _resume_after_shortage(self) -> None:
        if not self.stopping and self.started:
            self.start_accepting()

    def wrap_socket_and_handle(self, client_socket, address):
        # The TLS handshake is the first thing a client sends: the header deadline bounds it,
        # and shutdown or a new connection at the cap may end it.
        greenlet = gevent.getcurrent()
        client_socket.settimeout(self.header_timeout)
        self.table.start_waiting(greenlet)
        try:
            ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except OSError as error:  # ssl.SSLError and socket.timeout included
            log.warning("client %s: TLS handshake failed: %s", _where(address), error)
            return None
        finally:
            self.table.stop_waiting(greenlet)
        try:
            return self.handle(ssl_socket, address)
        finally:
            ssl_socket.close()


def _where(address) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def raise_open_file_limit(max_connections: int):
    """Raise the soft RLIMIT_NOFILE to the hard limit; (connections that fit, soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard
        if target == resource.RLIM_INFINITY:
            target = 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. above the kernel's nr_open: keep the soft limit
    fits = max(1, (soft - FDS_RESERVED) // FDS_PER_CONNECTION)
    return min(max_connections, fits), soft


def serve(config: ServeConfig) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s minimal-registry %(levelname)s %(message)s")
    tree = ContentTree(config.directory)
    app = RegistryApp(tree)
    max_connections, open_files = raise_open_file_limit(config.max_connections)
    table = ConnectionTable(max_connections)
    access_log = AccessLog(sys.stderr)
    servers = [_bind(address, app, table, config, access_log) for address in config.listen]

    repositories = tree.repository_names()
    tag_count = tree.tag_count(repositories)
    notes = []
    if not repositories:
        notes.append("no repositories: is -d the content tree?")
    if max_connections < config.max_connections:
        notes.append(f"--max-connections lowered from {config.max_connections} to {max_connections}:"
                     f" the open-file limit is {open_files}; raise LimitNOFILE to serve more")
    if config.workers > 1:
        notes.append(f"{config.workers} worker processes, each up to {max_connections} connections")
    start_line = "serving %s: %s, %s, listening on %s%s" % (
        config.directory, counted(len(repositories), "repository", "repositories"), counted(tag_count, "tag"),
        " ".join(_url(server) for server in servers), "".join(f" ({note})" for note in notes))
    if config.workers > 1:
        return _supervise(config.workers, servers, table, start_line)

    def announce():
        log.info("%s", start_line)
        sys.stderr.flush()
        notify("READY=1")

    return _serve_until_stopped(servers, table, announce, announce_stop=True)


def _serve_until_stopped(servers, table: ConnectionTable, on_listening, announce_stop: bool) -> int:
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    for server in servers:
        server.start()
    on_listening()
    stop.wait()

    if announce_stop:
        notify("STOPPING=1")
        log.info("stopping: finishing downloads in progress (at most %ss)", SHUTDOWN_GRACE)
    table.stopping = True
    for server in servers:
        server.close()
    # Connections waiting for a request have nothing to finish: end them now.
    table.end_waiting()
    table.join(timeout=SHUTDOWN_GRACE)
    unfinished = len(table)
    if unfinished:
        log.warning("%d connections still busy after %ss: closing them", unfinished, SHUTDOWN_GRACE)
        table.kill_all()
    for server in servers[:1]:  # one access log, shared
        if server.access_log is not None:
            server.access_log.flush()
    if announce_stop:
        log.info("stopped")
    return 0


# --- several worker processes ---------------------------------------------------------------

WORKER_START_TIMEOUT = 30.0
WORKER_RESTART_DELAY = 1.0


def _supervise(count: int, servers, table: ConnectionTable, start_line: str) -> int:
    """Fork `count` workers sharing the bound sockets (the kernel spreads the accepts), tell
    systemd READY=1 once every one listens, forward SIGTERM/SIGINT, restart a worker that dies.
    """
    ready_read, ready_write = os.pipe()
    first_start = [True]  # workers started later (restarts) report nothing on the pipe
    workers = {}  # pid -> worker number
    stop = gevent.event.Event()
    signal_handlers = []

    def start_worker(number: int) -> None:
        pid = gevent.os.fork_and_watch(callback=lambda watcher: exited(watcher.pid, watcher.rstatus))
        if pid == 0:  # the worker
            # A restarted worker inherits the parent's signal handlers: only its own may run.
            for handler in signal_handlers:
                handler.cancel()
            workers.clear()
            reports = first_start[0]
            if reports:
                os.close(ready_read)

            def listening():
                if reports:
                    os.write(ready_write, b"r")
                    os.close(ready_write)

            code = 1
            try:
                code = _serve_until_stopped(servers, table, listening, announce_stop=False)
            finally:
                sys.stderr.flush()
                os._exit(code)
        workers[pid] = number

    def exited(pid: int, status: int) -> None:
        number = workers.pop(pid, None)
        if number is None or stop.is_set():
            return
        log.warning("worker %d (pid %d) ended unexpectedly (%s): starting another",
                    number, pid, _wait_status(status))
        gevent.spawn_later(WORKER_RESTART_DELAY, lambda: stop.is_set() or start_worker(number))

    for number in range(1, count + 1):
        start_worker(number)
    os.close(ready_write)
    first_start[0] = False
    # The parent never accepts: its copies of the listening sockets only serve restarts.
    ready = b""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while len(ready) < count and time.monotonic() < deadline:
        try:
            gevent.socket.wait_read(ready_read, timeout=max(deadline - time.monotonic(), 0.01))
        except socket.timeout:
            break
        chunk = os.read(ready_read, count)
        if not chunk:
            break
        ready += chunk
    os.close(ready_read)
    if len(ready) < count:
        log.error("only %d of %d workers started", len(ready), count)
    log.info("%s", start_line)
    sys.stderr.flush()
    notify("READY=1")

    signal_handlers.extend(gevent.signal_handler(signum, stop.set) for signum in (signal.SIGTERM, signal.SIGINT))
    # Signal and child watchers do not keep gevent's loop alive: a timed wait does.
    while not stop.wait(timeout=1.0):
        pass
    notify("STOPPING=1")
    log.info("stopping: finishing downloads in progress (at most %ss)", SHUTDOWN_GRACE)
    for pid in list(workers):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + SHUTDOWN_GRACE + 5
    while workers and time.monotonic() < deadline:
        gevent.sleep(0.02)
    for pid in list(workers):
        os.kill(pid, signal.SIGKILL)
    log.info("stopped")
    return 0


def _wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _bind(address, app, table, config: ServeConfig, access_log: AccessLog) -> RegistryServer:
    host, port = address
    ssl_args = {}
    if config.tls_cert:
        ssl_args = {"certfile": str(config.tls_cert), "keyfile": str(config.tls_key)}
    server = RegistryServer((host, port), app, log_format=config.log_format,
                            access_log=None if config.quiet else access_log, table=table,
                            multiprocess=config.workers > 1, **ssl_args)
    try:
        server.init_socket()
    except socket.gaierror as error:
        raise Fatal(f"cannot listen on {host}:{port}: {error.strerror}",
                    "give an IP address or a resolvable host name with -l") from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise Fatal(f"cannot listen on {host}:{port}: the port is in use",
                        "stop the other process or choose another port with -p PORT or -l HOST:PORT") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise Fatal(f"cannot listen on {host}:{port}: no such local address",
                        "listen on an address of this machine, for example -l 127.0.0.1:9080") from None
        if error.errno == errno.EACCES:
            raise Fatal(f"cannot listen on {host}:{port}: permission denied",
                        "ports below 1024 need privileges; the default 9080 needs none") from None
        raise Fatal(f"cannot listen on {host}:{port}: {error.strerror or error}", "check the -l address") from None
    except Exception as error:  # noqa: BLE001 - e.g. ssl.SSLError from a bad certificate
        raise Fatal(f"cannot listen on {host}:{port}: {error}", "check --tls-cert and --tls-key") from None
    return server


def _url(server: RegistryServer) -> str:
    host, port = server.address[:2]
    scheme = "https" if server.ssl_enabled else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
