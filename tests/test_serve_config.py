"""The serve command line and environment -> the checked configuration, or the one refusal.

`cli.serve_config` (docopt's dict and an environment) and `cli.parse_address` are pure: they
are tested here as tables, in-process. What only a started process shows stays in
test_lifecycle.py: a port in use, an address this host does not have, the exit code and the
single stderr line, options read from the real environment.

In the tables `{tree}` is a content directory, `{file}` a regular file, `{cert}` and `{key}`
readable files and `{missing}` a path that does not exist; every row runs in a fresh tmp_path.
"""

from pathlib import Path

import docopt
import pytest

from minimal_registry import cli
from minimal_registry.fatal import Fatal

DEFAULTS = {
    "directory": "{tree}",
    "listen": (("127.0.0.1", 9080),),
    "tls_cert": None,
    "tls_key": None,
    "max_connections": 1000,
    "log_format": "text",
    "quiet": False,
    "workers": 1,
}


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "tree").mkdir()
    for name in ("file", "cert", "key"):
        (tmp_path / name).write_text("x")
    return {name: str(tmp_path / name) for name in ("tree", "file", "cert", "key", "missing")}


def fill(value, paths):
    """The row's placeholders replaced by this test's paths, inside tuples too."""
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, tuple):
        return tuple(fill(item, paths) for item in value)
    return value


def serve_config(argv, environ, paths):
    args = docopt.docopt(cli.__doc__, argv=[fill(a, paths) for a in argv])
    return cli.serve_config(args, {key: fill(value, paths) for key, value in environ.items()})


def fields(config) -> dict:
    """The configuration as plain values (paths as strings), whatever class holds it."""
    return {name: str(getattr(config, name)) if isinstance(getattr(config, name), Path) else getattr(config, name)
            for name in DEFAULTS}


TREE = ["-d", "{tree}"]
CONFIGS = [
    # (what the row shows, argv, environment, the fields that differ from DEFAULTS)
    ("defaults", TREE, {}, {}),
    ("the original tool's -d DIR -p PORT", TREE + ["-p", "5000"], {}, {"listen": (("127.0.0.1", 5000),)}),
    ("-p 0: a free port", TREE + ["-p", "0"], {}, {"listen": (("127.0.0.1", 0),)}),
    ("the highest port", TREE + ["-p", "65535"], {}, {"listen": (("127.0.0.1", 65535),)}),
    ("-l repeated, in order", TREE + ["-l", "127.0.0.1:0", "-l", "[::1]:9443"], {},
     {"listen": (("127.0.0.1", 0), ("::1", 9443))}),
    ("-p is the port of -l addresses that name none", TREE + ["-p", "5000", "-l", "10.0.0.1", "-l", "[::1]",
                                                             "-l", "127.0.0.1:7000", "-l", ":7001"], {},
     {"listen": (("10.0.0.1", 5000), ("::1", 5000), ("127.0.0.1", 7000), ("127.0.0.1", 7001))}),
    ("-l without a port and without -p", TREE + ["-l", "0.0.0.0"], {}, {"listen": (("0.0.0.0", 9080),)}),
    ("TLS", TREE + ["--tls-cert", "{cert}", "--tls-key", "{key}"], {}, {"tls_cert": "{cert}", "tls_key": "{key}"}),
    ("limits and formats", TREE + ["--max-connections", "1", "--workers", "64", "--log-format", "json", "-q"], {},
     {"max_connections": 1, "workers": 64, "log_format": "json", "quiet": True}),
    ("everything from the environment (systemd's EnvironmentFile)", [], {
        "MINIMAL_REGISTRY_DIR": "{tree}", "MINIMAL_REGISTRY_PORT": "5000",
        "MINIMAL_REGISTRY_LISTEN": "127.0.0.2 [::1]:5001", "MINIMAL_REGISTRY_TLS_CERT": "{cert}",
        "MINIMAL_REGISTRY_TLS_KEY": "{key}", "MINIMAL_REGISTRY_MAX_CONNECTIONS": "10",
        "MINIMAL_REGISTRY_WORKERS": "2", "MINIMAL_REGISTRY_LOG_FORMAT": "json", "MINIMAL_REGISTRY_QUIET": "1"},
     {"listen": (("127.0.0.2", 5000), ("::1", 5001)), "tls_cert": "{cert}", "tls_key": "{key}",
      "max_connections": 10, "workers": 2, "log_format": "json", "quiet": True}),
    ("MINIMAL_REGISTRY_PORT alone", TREE, {"MINIMAL_REGISTRY_PORT": "5000"}, {"listen": (("127.0.0.1", 5000),)}),
    ("the command line wins over the environment",
     TREE + ["-l", "127.0.0.1:6000", "--log-format", "text", "--max-connections", "7", "--workers", "3"],
     {"MINIMAL_REGISTRY_DIR": "{missing}", "MINIMAL_REGISTRY_LISTEN": "127.0.0.1:5000",
      "MINIMAL_REGISTRY_LOG_FORMAT": "json", "MINIMAL_REGISTRY_MAX_CONNECTIONS": "10",
      "MINIMAL_REGISTRY_WORKERS": "2"},
     {"listen": (("127.0.0.1", 6000),), "max_connections": 7, "workers": 3}),
    ("-p wins over MINIMAL_REGISTRY_PORT", TREE + ["-p", "6000"], {"MINIMAL_REGISTRY_PORT": "5000"},
     {"listen": (("127.0.0.1", 6000),)}),
    ("-q wins over MINIMAL_REGISTRY_QUIET=0", TREE + ["-q"], {"MINIMAL_REGISTRY_QUIET": "0"}, {"quiet": True}),
    ("an empty variable is an unset one", TREE, {
        "MINIMAL_REGISTRY_PORT": "", "MINIMAL_REGISTRY_LISTEN": "", "MINIMAL_REGISTRY_TLS_CERT": "",
        "MINIMAL_REGISTRY_TLS_KEY": "", "MINIMAL_REGISTRY_MAX_CONNECTIONS": "", "MINIMAL_REGISTRY_WORKERS": "",
        "MINIMAL_REGISTRY_LOG_FORMAT": "", "MINIMAL_REGISTRY_QUIET": ""}, {}),
] + [
    (f"MINIMAL_REGISTRY_QUIET={value}", TREE, {"MINIMAL_REGISTRY_QUIET": value}, {"quiet": quiet})
    for value, quiet in (("0", False), ("false", False), ("no", False), ("False", False), ("off", False),
                         ("1", True), ("yes", True), ("true", True))
]


@pytest.mark.parametrize("argv,environ,expected", [row[1:] for row in CONFIGS], ids=[row[0] for row in CONFIGS])
def test_serve_config(paths, argv, environ, expected):
    want = {name: fill(value, paths) for name, value in {**DEFAULTS, **expected}.items()}
    assert fields(serve_config(argv, environ, paths)) == want


REFUSALS = [
    # (what the row shows, argv, environment, the Fatal's message)
    ("-d names nothing", ["-d", "{missing}"], {}, "content directory {missing} does not exist"),
    ("-d names a file", ["-d", "{file}"], {}, "content directory {file} is not a directory"),
    ("MINIMAL_REGISTRY_DIR names nothing", [], {"MINIMAL_REGISTRY_DIR": "{missing}"},
     "content directory {missing} does not exist"),
    ("a port past 65535", TREE + ["-p", "65536"], {}, "bad port '65536'"),
    ("a port that is no number", TREE + ["-p", "http"], {}, "bad port 'http'"),
    ("a negative port", TREE + ["--port=-1"], {}, "bad port '-1'"),
    ("a bad MINIMAL_REGISTRY_PORT", TREE, {"MINIMAL_REGISTRY_PORT": "x"}, "bad port 'x'"),
    ("a bad port in -l", TREE + ["-l", "127.0.0.1:99999"], {}, "bad port '99999'"),
    ("IPv6 without brackets", TREE + ["-l", "::1:9080"], {},
     "bad listen address '::1:9080': an IPv6 address needs brackets"),
    ("a bad address in MINIMAL_REGISTRY_LISTEN", TREE, {"MINIMAL_REGISTRY_LISTEN": "127.0.0.1:0 [::1"},
     "bad listen address '[::1'"),
    ("a certificate without its key", TREE + ["--tls-cert", "{cert}"], {}, "TLS needs both a certificate and a key"),
    ("a key without its certificate", TREE, {"MINIMAL_REGISTRY_TLS_KEY": "{key}"},
     "TLS needs both a certificate and a key"),
    ("a certificate that is not there", TREE + ["--tls-cert", "{missing}", "--tls-key", "{key}"], {},
     "cannot read {missing}"),
    ("--max-connections zero", TREE + ["--max-connections", "zero"], {}, "--max-connections 'zero' is not a positive number"),
    ("--max-connections 0", TREE + ["--max-connections", "0"], {}, "--max-connections '0' is not a positive number"),
    ("a negative MINIMAL_REGISTRY_MAX_CONNECTIONS", TREE, {"MINIMAL_REGISTRY_MAX_CONNECTIONS": "-5"},
     "--max-connections '-5' is not a positive number"),
    ("--workers 0", TREE + ["--workers", "0"], {}, "--workers '0' is not a number from 1 to 64"),
    ("--workers 65", TREE + ["--workers", "65"], {}, "--workers '65' is not a number from 1 to 64"),
    ("--workers many", TREE + ["--workers", "many"], {}, "--workers 'many' is not a number from 1 to 64"),
    ("--log-format xml", TREE + ["--log-format", "xml"], {}, "--log-format 'xml' is unknown"),
    ("MINIMAL_REGISTRY_LOG_FORMAT=JSON", TREE, {"MINIMAL_REGISTRY_LOG_FORMAT": "JSON"}, "--log-format 'JSON' is unknown"),
]
# str.isdigit() also accepts '²' and '٩', which int() refuses or reads as 9: ASCII digits only.
REFUSALS += [
    ("-p with a superscript digit", TREE + ["-p", "²"], {}, "bad port '²'"),
    ("-p in Arabic-Indic digits", TREE + ["-p", "٩٠٨٠"], {}, "bad port '٩٠٨٠'"),
    ("--max-connections with a superscript digit", TREE + ["--max-connections", "²"], {},
     "--max-connections '²' is not a positive number"),
    ("--workers with a superscript digit", TREE + ["--workers", "²"], {}, "--workers '²' is not a number from 1 to 64"),
]


@pytest.mark.parametrize("argv,environ,message", [row[1:] for row in REFUSALS], ids=[row[0] for row in REFUSALS])
def test_serve_config_refuses(paths, argv, environ, message):
    with pytest.raises(Fatal) as refused:
        serve_config(argv, environ, paths)
    assert refused.value.message == fill(message, paths)
    assert refused.value.hint and refused.value.exit_code == 2


ADDRESSES = [
    # (-l's text, its port when it names none) -> (host, port)
    ("127.0.0.1:9080", 1, ("127.0.0.1", 9080)),
    ("0.0.0.0:0", 1, ("0.0.0.0", 0)),
    ("localhost", 5000, ("localhost", 5000)),
    (":5000", 1, ("127.0.0.1", 5000)),
    ("[::1]:9080", 1, ("::1", 9080)),
    ("[::1]", 5000, ("::1", 5000)),
    ("[::]:0", 1, ("::", 0)),
    ("[fe80::1%eth0]:9080", 1, ("fe80::1%eth0", 9080)),
]


@pytest.mark.parametrize("text,default_port,expected", ADDRESSES, ids=[row[0] for row in ADDRESSES])
def test_parse_address(text, default_port, expected):
    assert cli.parse_address(text, default_port) == expected


BAD_ADDRESSES = [
    ("::1:9080", "bad listen address '::1:9080': an IPv6 address needs brackets"),
    ("10.0.0.1:80:90", "bad listen address '10.0.0.1:80:90': an IPv6 address needs brackets"),
    ("[::1", "bad listen address '[::1'"),
    ("[::1]9080", "bad listen address '[::1]9080'"),
    ("[::1]:http", "bad port 'http'"),
    ("127.0.0.1:", "bad port ''"),
    ("127.0.0.1:65536", "bad port '65536'"),
    ("127.0.0.1:-1", "bad port '-1'"),
]


@pytest.mark.parametrize("text,message", BAD_ADDRESSES, ids=[row[0] for row in BAD_ADDRESSES])
def test_parse_address_refuses(text, message):
    with pytest.raises(Fatal) as refused:
        cli.parse_address(text, 9080)
    assert refused.value.message == message and refused.value.hint
