"""minimal-registry: serve a directory of container images, read-only, to containerd and K3s.

Usage:
  minimal-registry [serve] [-d DIR] [-p PORT] [-l ADDR]... [--tls-cert FILE --tls-key FILE]
                   [--max-connections N] [--workers N] [--log-format FORMAT] [-q]
  minimal-registry import SOURCE... [-d DIR] [--name NAME] [--tag TAG] [--keep-domain]
                          [--platform LIST] [-q]
  minimal-registry verify [-d DIR] [--fast] [-q]
  minimal-registry ls [-d DIR] [--json]
  minimal-registry rm [-d DIR] [--json] [-q] [-f FILE]... [--keep FILE]... [REF...]
  minimal-registry prune [-d DIR] [--dry-run] [--json] [-q]
  minimal-registry normalize REF...
  minimal-registry (-h | --help)
  minimal-registry --version

Commands:
  serve     Serve the content tree over HTTP (the default).
  import    Lay images from OCI layouts, OCI archives, docker-save archives or
            another content tree (plain, .gz or .zst) into the content tree.
  verify    Check every blob, manifest and tag of the content tree.
  ls        List repositories, tags, digests, platforms and sizes.
  rm        Remove tags (NAME:TAG) or manifests (NAME@sha256:...); the space is
            freed by prune.
  prune     Delete the manifests no tag reaches and the blobs no kept manifest
            references; say how much that freed.
  normalize Print each image reference as docker and containerd read it,
            `DOMAIN PATH TAG` (busybox: docker.io library/busybox latest),
            for scripts.

Options:
  -d DIR, --dir DIR       The content tree to serve or fill
                          (default: /var/lib/rancher/k3s/agent/registry).
  -p PORT, --port PORT    Port of the default address 127.0.0.1, as in the original
                          tool; with -l it is the port of addresses that name none.
  -l ADDR, --listen ADDR  Address to listen on: HOST:PORT, [IPV6]:PORT, or HOST;
                          repeat for several (default: 127.0.0.1:9080).
  --tls-cert FILE         Serve HTTPS with this PEM certificate (with --tls-key).
  --tls-key FILE          The certificate's PEM private key.
  --max-connections N     Connections served at once, per worker; at the cap, idle
                          ones make room, else newcomers wait (default: 1000).
  --workers N             Processes serving the same sockets: 2 on a node where many
                          clients pull at once uses a second core, for about 40 MiB
                          more resident memory, 11 MiB of it not shared (default: 1).
  --log-format FORMAT     Access log as `text` or `json` (default: text).
  -q, --quiet             No access log (serve); only problems (import, verify,
                          rm), only the total (prune).
  --name NAME             Import: repository name for a source that names none.
  --tag TAG               Import: tag for a source that names none.
  --keep-domain           Import: file images under their registry domain
                          (docker.io/rancher/x) for containerd's ?ns= lookup,
                          instead of trimming it (rancher/x).
  --platform LIST         Import: of an index, keep only these platforms
                          (os/arch[/variant], comma-separated) or all [default: all].
  --fast                  Verify: check sizes and references, not hashes.
  --json                  ls, rm, prune: print JSON.
  -f FILE, --file FILE    rm: also the references in FILE, one per line, as in
                          K3s's k3s-images.txt (# comments; - reads stdin).
  --keep FILE             rm: spare the references FILE lists (the next release's
                          k3s-images.txt: images both releases use stay).
  --dry-run               prune: say what would be deleted, delete nothing.
  -h, --help              Show this help.
  --version               Show the version, architecture, Python and gevent.

Every serve option can also come from the environment, for systemd's EnvironmentFile
(the command line wins): MINIMAL_REGISTRY_DIR, MINIMAL_REGISTRY_PORT,
MINIMAL_REGISTRY_LISTEN (space-separated addresses), MINIMAL_REGISTRY_TLS_CERT,
MINIMAL_REGISTRY_TLS_KEY, MINIMAL_REGISTRY_MAX_CONNECTIONS, MINIMAL_REGISTRY_WORKERS,
MINIMAL_REGISTRY_LOG_FORMAT,
MINIMAL_REGISTRY_QUIET (1 to silence the access log).
"""

import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import docopt

from minimal_registry import __version__
from minimal_registry.fatal import Fatal

DEFAULT_DIR = "/var/lib/rancher/k3s/agent/registry"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9080
DEFAULT_MAX_CONNECTIONS = 1000
MAX_WORKERS = 64
LOG_FORMATS = ("text", "json")


def main(argv=None) -> int:
    try:
        args = docopt.docopt(__doc__, argv=argv, version=version_text(), default_help=True)
    except docopt.DocoptExit:
        given = " ".join(sys.argv[1:] if argv is None else argv)
        print(f"minimal-registry: these arguments do not fit the usage: {given}"
              "; hint: `minimal-registry --help` shows every command and option", file=sys.stderr)
        return 2
    try:
        if args["import"]:
            from minimal_registry.content import importer, lock

            with lock.exclusive(_directory(args, must_exist=False), "import"):
                return importer.run(
                    sources=[Path(s) for s in args["SOURCE"]],
                    tree=_directory(args, must_exist=False),
                    name=args["--name"],
                    tag=args["--tag"],
                    keep_domain=args["--keep-domain"],
                    platform=args["--platform"],
                    quiet=args["--quiet"],
                )
        if args["verify"]:
            from minimal_registry.content import verify

            return verify.run(tree=_directory(args), fast=args["--fast"], quiet=args["--quiet"])
        if args["ls"]:
            from minimal_registry.content import listing

            return listing.run(tree=_directory(args), as_json=args["--json"])
        if args["rm"]:
            from minimal_registry.content import lock, remove

            with lock.exclusive(_directory(args), "rm"):
                return remove.run(tree=_directory(args), arguments=args["REF"],
                                  files=[Path(f) for f in args["--file"]],
                                  keep_files=[Path(f) for f in args["--keep"]],
                                  as_json=args["--json"], quiet=args["--quiet"])
        if args["prune"]:
            from minimal_registry.content import lock, prune

            with lock.exclusive(_directory(args), "prune"):
                return prune.run(tree=_directory(args), dry_run=args["--dry-run"],
                                 as_json=args["--json"], quiet=args["--quiet"])

        if args["normalize"]:
            from minimal_registry.content import names

            return names.run(args["REF"])

        from minimal_registry import server

        return server.serve(serve_config(args, os.environ))
    except Fatal as failure:
        print(f"minimal-registry: {failure}", file=sys.stderr)
        return failure.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `minimal-registry verify | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def version_text() -> str:
    import platform  # only for --version: not on the serving path

    try:
        import gevent

        gevent_version = gevent.__version__
    except ImportError:
        gevent_version = "not installed"
    return (
        f"minimal-registry {__version__} ({platform.machine()}; "
        f"Python {platform.python_version()}; gevent {gevent_version})"
    )


def serve_config(args, environ) -> "ServeConfig":
    """Turn docopt's dict (and the environment) into a checked ServeConfig, once."""
    from minimal_registry.server import ServeConfig  # gevent: only when serving

    def option(flag, variable):
        given = args[flag]
        if given not in (None, [], False):
            return given
        return environ.get(variable) or None

    port_text = option("--port", "MINIMAL_REGISTRY_PORT")
    default_port = _port(port_text) if port_text is not None else DEFAULT_PORT
    listen_given = args["--listen"] or (environ.get("MINIMAL_REGISTRY_LISTEN") or "").split()
    addresses = [parse_address(a, default_port) for a in listen_given] or [(DEFAULT_HOST, default_port)]

    tls_cert = option("--tls-cert", "MINIMAL_REGISTRY_TLS_CERT")
    tls_key = option("--tls-key", "MINIMAL_REGISTRY_TLS_KEY")
    if bool(tls_cert) != bool(tls_key):
        raise Fatal("TLS needs both a certificate and a key", "give --tls-cert FILE and --tls-key FILE together")
    for path in (tls_cert, tls_key):
        if path and not os.access(path, os.R_OK):
            raise Fatal(f"cannot read {path}", "check the TLS file's path and permissions")

    max_text = option("--max-connections", "MINIMAL_REGISTRY_MAX_CONNECTIONS")
    max_connections = DEFAULT_MAX_CONNECTIONS
    if max_text is not None:
        if not _is_number(max_text) or int(max_text) < 1:
            raise Fatal(f"--max-connections {max_text!r} is not a positive number", "for example --max-connections 1000")
        max_connections = int(max_text)

    workers_text = option("--workers", "MINIMAL_REGISTRY_WORKERS")
    workers = 1
    if workers_text is not None:
        if not _is_number(workers_text) or not 1 <= int(workers_text) <= MAX_WORKERS:
            raise Fatal(f"--workers {workers_text!r} is not a number from 1 to {MAX_WORKERS}",
                        "for example --workers 2 (one per core at most)")
        workers = int(workers_text)

    log_format = option("--log-format", "MINIMAL_REGISTRY_LOG_FORMAT") or "text"
    if log_format not in LOG_FORMATS:
        raise Fatal(f"--log-format {log_format!r} is unknown", "use --log-format text or --log-format json")

    quiet = bool(args["--quiet"]) or environ.get("MINIMAL_REGISTRY_QUIET", "").strip().lower() not in ("", "0", "false", "no", "off")
    return ServeConfig(
        directory=_directory(args, environ=environ),
        listen=tuple(addresses),
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
        max_connections=max_connections,
        log_format=log_format,
        quiet=quiet,
        workers=workers,
    )


def parse_address(text: str, default_port: int) -> Tuple[str, int]:
    """`host:port`, `[v6]:port`, `[v6]`, `host` or `:port` -> (host, port)."""
    hint = "write HOST:PORT, [IPV6]:PORT or HOST, for example 127.0.0.1:9080 or [::1]:9080"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise Fatal(f"bad listen address {text!r}", hint)
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise Fatal(f"bad listen address {text!r}: an IPv6 address needs brackets", hint)
    else:
        host, port_text = text, None
    host = host or DEFAULT_HOST
    return host, (_port(port_text) if port_text is not None else default_port)


def _is_number(text: str) -> bool:
    """ASCII digits of a sane length: `str.isdigit()` is also true for '²', which int() refuses."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def _port(text: str) -> int:
    if not _is_number(text) or int(text) > 65535:
        raise Fatal(f"bad port {text!r}", "a port is a number from 0 to 65535, for example -p 9080")
    return int(text)


def _directory(args, environ=None, must_exist=True) -> Path:
    text = args["--dir"] or (environ or os.environ).get("MINIMAL_REGISTRY_DIR") or DEFAULT_DIR
    path = Path(text)
    if must_exist:
        if not path.exists():
            raise Fatal(f"content directory {path} does not exist", "give the tree with -d DIR or MINIMAL_REGISTRY_DIR")
        if not path.is_dir():
            raise Fatal(f"content directory {path} is not a directory", "give the tree with -d DIR or MINIMAL_REGISTRY_DIR")
        if not os.access(path, os.R_OK | os.X_OK):
            raise Fatal(f"content directory {path} is not readable", "check its permissions")
    return path
