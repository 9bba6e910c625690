"""Run the registry: bind, announce, serve, and stop gracefully. The only module that
sets up gevent's server; the per-connection behaviour lives in `connection`.

Start-up refuses what cannot work (a missing tree, a bad address, a port in use) with one
line and exit code 2. Once every socket is bound it logs what it serves and tells systemd
READY=1. SIGTERM or SIGINT: STOPPING=1, stop accepting, close idle keep-alive connections,
let running downloads finish for up to SHUTDOWN_GRACE seconds, exit 0.
"""

import errno
import logging
import signal
import socket
import sys

import gevent
import gevent.event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from minimal_registry import layout
from minimal_registry.app import RegistryApp
from minimal_registry.cli import ServeConfig
from minimal_registry.connection import RegistryHandler
from minimal_registry.fatal import Fatal
from minimal_registry.notify import notify
from minimal_registry.storage import ContentTree

log = logging.getLogger("minimal_registry")

# containerd keeps idle connections for 30 s (IdleConnTimeout in its HTTP transport);
# holding ours a little longer means the client, not us, closes them.
IDLE_TIMEOUT = 75.0
HEADER_TIMEOUT = 10.0  # from a request's first byte to the end of its headers
SEND_TIMEOUT = 60.0  # a client that reads nothing for this long is dropped
SHUTDOWN_GRACE = 10.0


class RegistryServer(WSGIServer):
    """A WSGIServer whose handlers share the timeouts, the log settings and shutdown state."""

    handler_class = RegistryHandler
    idle_timeout = IDLE_TIMEOUT
    header_timeout = HEADER_TIMEOUT
    send_timeout = SEND_TIMEOUT

    def __init__(self, *args, log_format="text", access_log=sys.stderr, shared_state=None, **kwargs):
        # pywsgi's own `log` is replaced by the handler's access log.
        super().__init__(*args, log=None, error_log=sys.stderr, **kwargs)
        self.log_format = log_format
        self.access_log = access_log
        self._state = shared_state if shared_state is not None else ShutdownState()

    @property
    def stopping(self) -> bool:
        return self._state.stopping

    @property
    def idle(self) -> set:
        return self._state.idle_handlers


class ShutdownState:
    def __init__(self):
        self.stopping = False
        self.idle_handlers = set()


def serve(config: ServeConfig) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s minimal-registry %(levelname)s %(message)s")
    tree = ContentTree(config.directory)
    app = RegistryApp(tree)
    pool = Pool(config.max_connections)
    state = ShutdownState()
    servers = [_bind(address, app, pool, state, config) for address in config.listen]

    repositories = tree.repository_names()
    tag_count = sum(len(layout.tags(layout.manifests_dir(config.directory, name))) for name in repositories)
    for server in servers:
        server.start()
    log.info("serving %s: %d repositories, %d tags, listening on %s", config.directory, len(repositories),
             tag_count, " ".join(_url(server) for server in servers))
    sys.stderr.flush()
    notify("READY=1")

    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    stop.wait()

    notify("STOPPING=1")
    log.info("stopping: finishing downloads in progress (at most %ss)", SHUTDOWN_GRACE)
    state.stopping = True
    for server in servers:
        server.close()
    for handler in list(state.idle_handlers):
        # Idle keep-alive connections have nothing to finish: end them now.
        if handler.socket is not None:
            handler.socket.close()
    pool.join(timeout=SHUTDOWN_GRACE)
    unfinished = len(pool)
    if unfinished:
        log.warning("%d connections still busy after %ss: closing them", unfinished, SHUTDOWN_GRACE)
        pool.kill(block=True, timeout=1)
    log.info("stopped")
    return 0


def _bind(address, app, pool, state, config: ServeConfig) -> RegistryServer:
    host, port = address
    ssl_args = {}
    if config.tls_cert:
        ssl_args = {"certfile": str(config.tls_cert), "keyfile": str(config.tls_key)}
    server = RegistryServer((host, port), app, spawn=pool, log_format=config.log_format,
                            access_log=None if config.quiet else sys.stderr, shared_state=state, **ssl_args)
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
