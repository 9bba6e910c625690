"""The registry as an operator runs it: start-up refusals, readiness, logs, limits, shutdown."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from httpraw import connect, request
from imagetree import TreeBuilder
from serverproc import command_env, registry_command, running_registry, start_registry


def run_cli(*args, env=None, timeout=30):
    return subprocess.run(registry_command() + list(args), capture_output=True, text=True,
                          env=command_env(env), timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("minimal-registry: ") and "hint:" in lines[0]
    for word in words:
        assert word in lines[0]


def test_missing_directory_is_refused_in_one_line(tmp_path):
    assert_one_line_error(run_cli("-d", str(tmp_path / "nope"), "-l", "127.0.0.1:0"), "does not exist")


def test_a_file_given_as_the_tree_is_named_as_not_a_directory(tmp_path):
    file = tmp_path / "README.md"
    file.write_text("")
    assert_one_line_error(run_cli("-d", str(file), "-l", "127.0.0.1:0"), "is not a directory")


@pytest.mark.parametrize("flag", ["-p", "--max-connections", "--workers"])
def test_a_number_in_other_digits_is_refused_in_one_line(tmp_path, flag):
    # '\u00b2'.isdigit() is True and int() refuses it: it used to end in a traceback.
    assert_one_line_error(run_cli("-d", str(tmp_path), flag, "\u00b2"), flag if flag != "-p" else "port")


def test_a_hint_reads_without_nested_parentheses(tmp_path):
    result = run_cli("-d", str(tmp_path / "nope"), "-l", "127.0.0.1:0")
    assert "; hint: give the tree with -d DIR or MINIMAL_REGISTRY_DIR" in result.stderr


def test_port_in_use_is_refused_in_one_line(small_tree):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("-d", str(small_tree.root), "-p", str(port)), "in use", str(port))


# Addresses that parse but cannot be bound; those that do not parse: test_serve_config.py.
@pytest.mark.parametrize("address,words", [
    ("not-a-host.invalid:9080", ["cannot listen"]),
    ("192.0.2.1:9080", ["no such local address"]),
])
def test_bad_addresses_are_refused_in_one_line(small_tree, address, words):
    assert_one_line_error(run_cli("-d", str(small_tree.root), "-l", address), *words)


def test_unknown_arguments_exit_2_in_one_line():
    assert_one_line_error(run_cli("--no-such-flag"), "--no-such-flag", "--help")
    assert_one_line_error(run_cli("-p"), "-p")


def test_help_prints_the_usage():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout and "minimal-registry [serve] [-d DIR] [-p PORT]" in result.stdout
    assert "MINIMAL_REGISTRY_DIR" in result.stdout


def test_version_names_architecture_python_and_gevent():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("minimal-registry ") and "Python 3." in result.stdout and "gevent" in result.stdout
    assert os.uname().machine in result.stdout


def test_start_up_line_says_what_is_served(registry, full_tree):
    start_up = [line for line in registry.log().splitlines() if "serving" in line]
    assert len(start_up) == 1
    tags = len(full_tree.all_tagged())
    assert f"serving {full_tree.root}: 9 repositories, {tags} tags, listening on http://{registry.host_port}" in start_up[0]


def test_an_empty_tree_is_served_with_a_warning_on_the_start_up_line(tmp_path):
    with running_registry(tmp_path) as registry:
        start_up = [line for line in registry.log().splitlines() if "serving" in line]
    assert "0 repositories, 0 tags" in start_up[0] and "is -d the content tree?" in start_up[0]


def test_one_repository_is_counted_in_the_singular(tmp_path):
    TreeBuilder(tmp_path / "registry").image("library/only", "v1")
    with running_registry(tmp_path / "registry") as registry:
        start_up = [line for line in registry.log().splitlines() if "serving" in line]
    assert "1 repository, 1 tag, listening on" in start_up[0]


def test_original_command_line_still_works(small_tree):
    """`minimal-registry -d DIR -p PORT` listens on 127.0.0.1:PORT, as the Go tool did."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with running_registry(small_tree.root, "-p", str(port), listen=None) as registry:
        assert registry.host_port == f"127.0.0.1:{port}"
        assert request(registry, "GET", "/v2/")[0] == 200


def test_options_come_from_the_process_environment(small_tree, tmp_path):
    """What systemd's EnvironmentFile gives reaches the server (which variable means what,
    and that the command line wins: test_serve_config.py)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"MINIMAL_REGISTRY_DIR": str(small_tree.root), "MINIMAL_REGISTRY_LISTEN": f"127.0.0.1:{port}",
           "MINIMAL_REGISTRY_LOG_FORMAT": "json"}
    # Neither -d nor -l: both come from the environment.
    with running_registry(None, listen=None, env=env, log_path=tmp_path / "env.log") as registry:
        assert registry.host_port == f"127.0.0.1:{port}"
        assert request(registry, "GET", "/v2/library/hello/manifests/latest")[0] == 200
        time.sleep(0.2)
        access = [json.loads(line) for line in registry.log().splitlines() if line.startswith("{")]
        assert access and access[-1]["path"] == "/v2/library/hello/manifests/latest" and access[-1]["status"] == 200


def test_access_log_has_one_line_per_request_with_the_details(registry, full_tree):
    digest = full_tree.hello.layers[0].digest
    request(registry, "GET", f"/v2/library/hello/blobs/{digest}?ns=docker.io", {"User-Agent": "containerd/v1.7.0"})
    time.sleep(0.2)
    line = [l for l in registry.log().splitlines() if digest in l and "containerd/v1.7.0" in l][-1]
    assert line.startswith("127.0.0.1 ")
    assert f'"GET /v2/library/hello/blobs/{digest}?ns=docker.io" 200' in line
    assert line.endswith('"containerd/v1.7.0"') and "s " in line


def test_quiet_silences_the_access_log(small_tree):
    with running_registry(small_tree.root, "-q") as registry:
        request(registry, "GET", "/v2/")
        time.sleep(0.2)
        assert '"GET /v2/"' not in registry.log()


def test_sigterm_exits_0_after_saying_it_stopped(small_tree):
    # READY=1 and STOPPING=1 themselves: test_systemd_unit.py (source) and test_binary.py.
    registry = start_registry(small_tree.root)
    assert request(registry, "GET", "/v2/")[0] == 200
    assert registry.stop(signal.SIGTERM) == 0
    assert "Traceback" not in registry.log() and "stopped" in registry.log()


def test_sigint_also_stops_gracefully(small_tree):
    registry = start_registry(small_tree.root)
    assert registry.stop(signal.SIGINT) == 0


def test_shutdown_lets_a_running_download_finish_and_ends_idle_connections(full_tree):
    layer = full_tree.big.layers[0]
    registry = start_registry(full_tree.root)
    try:
        idle = connect(registry)
        idle.request("GET", "/v2/")
        idle.getresponse().read()
        slow = connect(registry, timeout=30)
        slow.request("GET", f"/v2/big/blob/blobs/{layer.digest}")
        response = slow.getresponse()
        first = response.read(1 << 20)  # the download is under way
        started = time.monotonic()
        registry.process.send_signal(signal.SIGTERM)
        rest = response.read()  # reading on: it must complete
        assert len(first) + len(rest) == layer.size
        assert registry.process.wait(15) == 0
        assert time.monotonic() - started < 12
        with pytest.raises((ConnectionError, OSError, Exception)):
            idle.request("GET", "/v2/")
            idle.getresponse()
    finally:
        registry.stop()


def test_stalled_half_sent_requests_do_not_delay_others_and_are_dropped(small_tree):
    registry = start_registry(small_tree.root)
    stalled = []
    try:
        host, port = registry.host_port.rsplit(":", 1)
        for _ in range(200):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            stalled.append(sock)
        # A normal client is served while the 200 stall.
        assert request(registry, "GET", "/v2/library/hello/manifests/latest")[0] == 200
        # Each stalled one is dropped at the header deadline (10 s), not kept forever.
        for sock in stalled:
            sock.settimeout(20)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert "request headers not received within" in registry.log()
    finally:
        for sock in stalled:
            sock.close()
        registry.stop()


def test_ipv6_loopback(small_tree):
    if not socket.has_ipv6:
        pytest.fail("this machine's Python has no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        pytest.fail(f"no IPv6 loopback here ({error}); CI machines must have ::1")
    with running_registry(small_tree.root, listen="[::1]:0") as registry:
        assert registry.host_port.startswith("[::1]:")
        assert request(registry, "GET", "/v2/library/hello/manifests/latest")[0] == 200


def test_several_listen_addresses(small_tree):
    with running_registry(small_tree.root, "-l", "127.0.0.2:0") as registry:
        assert request(registry, "GET", "/v2/")[0] == 200
        assert f"listening on {registry.url} http://127.0.0.2:" in registry.log()


def test_tls_serves_blobs_byte_for_byte(small_tree, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    import ssl
    import http.client

    with running_registry(small_tree.root, "--tls-cert", str(cert), "--tls-key", str(key)) as registry:
        assert registry.scheme == "https"
        context = ssl.create_default_context(cafile=str(cert))
        connection = http.client.HTTPSConnection("127.0.0.1", registry.port, context=context, timeout=10)
        layer = small_tree.hello.layers[0]
        connection.request("GET", f"/v2/library/hello/blobs/{layer.digest}")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == layer.data
        connection.close()
