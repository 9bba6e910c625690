"""minimal-registry.service: systemd accepts it, it is hardened, and the server keeps its side.

No systemd runs here (nor in CI), so each promise of the unit is checked the way it can be:
- `systemd-analyze verify` in a root holding the unit, the system's units and an executable at
  ExecStart's path (verify checks that the command exists);
- `systemd-analyze security --offline=true` for the exposure score, which may not get worse;
- the settings the issue asks for, read from the file;
- Type=notify: a socket stands in for systemd's NOTIFY_SOCKET and receives READY=1 once the
  server listens, and STOPPING=1 on SIGTERM (from the source tree, or from the one-file binary
  when MINIMAL_REGISTRY_BIN names it: it notifies from a child, hence NotifyAccess=all);
- the sandbox: the server serves under the unit's own SystemCallFilter=, SystemCallErrorNumber=,
  RestrictAddressFamilies= (installed with libseccomp, as systemd does) and
  MemoryDenyWriteExecute= (the kernel's PR_SET_MDWE, which systemd uses where it can).

Needs: systemd (systemd-analyze), python3-seccomp for /usr/bin/python3, Linux >= 6.3 for MDWE.
A missing tool fails the test with the reason; CI installs them.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from serverproc import LISTENING_RE, PROJECT_ROOT, command_env, registry_command

UNIT = PROJECT_ROOT / "minimal-registry.service"
# The exposure `systemd-analyze security` gave when the unit was written (systemd 252). A
# change that raises it must say why here.
MAX_EXPOSURE = 1.6
SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 60


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (CI: apt-get install systemd)", pytrace=False)
    return path


def run(command: List[str], timeout: float = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def unit_settings(path: Path = UNIT) -> Dict[str, List[str]]:
    """`Section.Key` -> every value, in order (systemd keys may repeat)."""
    settings: Dict[str, List[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: Dict[str, List[str]], key: str) -> str:
    values = settings.get(key)
    assert values, f"the unit does not set {key}"
    return values[-1]


def verify_root(tmp_path: Path, unit_text: str, name: str = "minimal-registry.service") -> Path:
    """A root for `systemd-analyze verify --root`: the system's units, ours, and ExecStart."""
    root = tmp_path / "root"
    system_units = Path("/lib/systemd/system")
    if not system_units.is_dir():
        pytest.fail("no /lib/systemd/system: install systemd", pytrace=False)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / name).write_text(unit_text)
    for command in ("/usr/local/bin/minimal-registry", "/bin/sh"):
        executable = root / command.lstrip("/")
        executable.parent.mkdir(parents=True, exist_ok=True)
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    return root


def systemd_verify(root: Path, name: str) -> subprocess.CompletedProcess:
    need_tool("systemd-analyze")
    return run(["systemd-analyze", "verify", "--man=no", f"--root={root}", name])


# ----- systemd accepts it ------------------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(tmp_path):
    root = verify_root(tmp_path, UNIT.read_text())
    result = systemd_verify(root, "minimal-registry.service")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"verify printed warnings:\n{result.stderr}"


def test_verify_fails_when_the_binary_is_missing(tmp_path):
    """The check above has teeth: verify does look for ExecStart's command."""
    root = verify_root(tmp_path, UNIT.read_text())
    (root / "usr/local/bin/minimal-registry").unlink()
    result = systemd_verify(root, "minimal-registry.service")
    assert result.returncode != 0
    assert "/usr/local/bin/minimal-registry" in result.stderr


def exposure(unit: Path) -> float:
    need_tool("systemd-analyze")
    result = run(["systemd-analyze", "security", "--offline=true", "--json=short", str(unit)])
    # --json lists the checks; the overall figure is only in the text form.
    text = run(["systemd-analyze", "security", "--offline=true", str(unit)])
    assert text.returncode == 0, text.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", text.stdout)
    assert match, text.stdout
    assert result.returncode == 0 and json.loads(result.stdout), result.stderr
    return float(match.group(1))


def test_security_exposure_does_not_regress():
    score = exposure(UNIT)
    print(f"systemd-analyze security --offline=true: exposure {score}")
    assert score <= MAX_EXPOSURE, f"exposure {score} is worse than the recorded {MAX_EXPOSURE}"


# ----- the settings the issue asks for -------------------------------------------------------

def test_unit_is_type_notify_with_notify_access_all():
    settings = unit_settings()
    assert one(settings, "Service.Type") == "notify"
    assert one(settings, "Service.NotifyAccess") == "all"


def test_unit_orders_itself_before_k3s_and_restarts():
    settings = unit_settings()
    before = " ".join(settings["Unit.Before"]).split()
    assert {"k3s.service", "k3s-agent.service"} <= set(before)
    assert one(settings, "Service.Restart") == "always"
    assert "-/etc/default/%N" in settings["Service.EnvironmentFile"]
    assert "multi-user.target" in " ".join(settings["Install.WantedBy"]).split()


def test_unit_start_timeout_is_bounded():
    timeout = one(unit_settings(), "Service.TimeoutStartSec")
    assert timeout not in ("0", "infinity")
    seconds = int(timeout.rstrip("s"))
    assert 10 <= seconds <= 120


def test_unit_has_no_k3s_settings_that_do_not_belong():
    settings = unit_settings()
    for key in ("Service.Delegate", "Service.KillMode", "Service.TasksMax", "Service.LimitCORE"):
        assert key not in settings, f"{key} is K3s's, not this service's"


def test_unit_serves_the_tree_install_node_writes():
    settings = unit_settings()
    assert one(settings, "Service.ExecStart").startswith("/usr/local/bin/minimal-registry -d ")
    assert "MINIMAL_REGISTRY_DIR=/var/lib/rancher/k3s/agent/registry" in settings["Service.Environment"]
    install_node = (PROJECT_ROOT / "scripts/install-node.sh").read_text()
    assert "readonly CONTENT_DIR=${AGENT_DIR}/registry" in install_node
    assert "readonly AGENT_DIR=/var/lib/rancher/k3s/agent" in install_node


def test_unit_is_hardened():
    settings = unit_settings()
    expected = {
        "Service.NoNewPrivileges": "yes",
        "Service.ProtectSystem": "strict",
        "Service.PrivateTmp": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.AmbientCapabilities": "",
        "Service.PrivateDevices": "yes",
        "Service.ProtectHome": "yes",
        "Service.MemoryDenyWriteExecute": "yes",
        "Service.SystemCallArchitectures": "native",
        "Service.RestrictNamespaces": "yes",
    }
    for key, value in expected.items():
        assert one(settings, key) == value, key
    # ProtectSystem=strict makes everything read-only, the content tree too; nothing may
    # reopen it for writing.
    assert "Service.ReadWritePaths" not in settings
    assert "Service.User" not in settings  # root, without any capability: see the unit's comment


def test_unit_points_tmpdir_at_its_own_exec_capable_cache():
    """The one-file binary unpacks itself into TMPDIR; /tmp and /run may be noexec."""
    settings = unit_settings()
    assert one(settings, "Service.CacheDirectory") == "minimal-registry"
    assert "TMPDIR=%C/minimal-registry" in settings["Service.Environment"]


def test_leftover_cleanup_command_removes_only_unpacked_copies(tmp_path):
    """ExecStartPre= with %C expanded: _MEI*/staticx-* go, anything else stays."""
    command = one(unit_settings(), "Service.ExecStartPre")
    cache = tmp_path / "cache"
    (cache / "minimal-registry/_MEI12345").mkdir(parents=True)
    (cache / "minimal-registry/staticx-AbCd").mkdir()
    (cache / "minimal-registry/keep").write_text("x")
    argv = command.replace("%C", str(cache))
    program, _, script = argv.partition(" -c ")
    assert program == "/bin/sh"
    result = run(["/bin/sh", "-c", script.strip("'")])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (cache / "minimal-registry").iterdir()) == ["keep"]


# ----- Type=notify: READY=1 and STOPPING=1 ---------------------------------------------------

def start_server(tree: Path, log_path: Path, env: dict, prefix: List[str] = ()) -> subprocess.Popen:
    command = list(prefix) + registry_command() + ["-d", str(tree), "-l", "127.0.0.1:0"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=command_env(env))


def wait_listening(process: subprocess.Popen, log_path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING_RE.search(log_path.read_text(errors="replace"))
        if match:
            return f"{match.group(1)}://{match.group(2)}"
        if process.poll() is not None:
            pytest.fail(f"server exited {process.returncode}:\n{log_path.read_text()}", pytrace=False)
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"server did not listen within {timeout}s:\n{log_path.read_text()}", pytrace=False)


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def receive(sock: socket.socket, timeout: float) -> List[str]:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode().split("\n")
    except socket.timeout:
        return []


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_server_notifies_ready_then_stopping(small_tree, tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"minimal-registry-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        notify_socket = "@" + name
    else:
        notify_socket = str(tmp_path / "notify.sock")
        sock.bind(notify_socket)
    log_path = tmp_path / "server.log"
    process = start_server(small_tree.root, log_path, {"NOTIFY_SOCKET": notify_socket})
    try:
        ready = receive(sock, 30)
        assert "READY=1" in ready, f"no READY=1 (got {ready}):\n{log_path.read_text()}"
        # READY=1 means serving: /v2/ answers at once.
        url = wait_listening(process, log_path)
        with urllib.request.urlopen(url + "/v2/", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        stopping = receive(sock, 20)
        assert "STOPPING=1" in stopping, f"no STOPPING=1 (got {stopping}):\n{log_path.read_text()}"
        assert process.wait(20) == 0, log_path.read_text()
    finally:
        stop(process)
        sock.close()


# ----- the sandbox ---------------------------------------------------------------------------

def syscall_group(name: str, seen=None) -> set:
    """A systemd syscall group, nested groups expanded (`systemd-analyze syscall-filter`)."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    result = run(["systemd-analyze", "syscall-filter", name])
    assert result.returncode == 0, result.stderr
    calls = set()
    for line in result.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= syscall_group(item, seen) if item.startswith("@") else {item}
    return calls


def unit_syscalls() -> set:
    """What the unit's SystemCallFilter= lines allow, with systemd's semantics: the first line
    is an allow list, later `~` lines take away."""
    allowed = None
    for value in unit_settings()["Service.SystemCallFilter"]:
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= syscall_group(item) if item.startswith("@") else {item}
        if allowed is None:
            assert not deny, "the unit's first SystemCallFilter= is expected to be an allow list"
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    return allowed


SANDBOX = textwrap.dedent("""
    import ctypes, errno, json, os, socket, sys
    import seccomp

    spec = json.loads(os.environ.pop("SANDBOX_SPEC"))
    error = getattr(errno, spec["errno"])
    filt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(error))
    for name in spec["allow"]:
        if name == "socket":
            continue
        try:
            filt.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a syscall on this architecture
    # RestrictAddressFamilies=: socket() only for the listed families.
    for family in spec["families"]:
        filt.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, getattr(socket, family)))
    # MemoryDenyWriteExecute=yes: PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (kept across exec).
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()) + " (Linux >= 6.3 needed)")
    filt.load()
    os.execv(sys.argv[1], sys.argv[1:])
""")


def test_server_serves_under_the_units_sandbox(small_tree, tmp_path):
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail(f"{SYSTEM_PYTHON} is needed to install the seccomp filter", pytrace=False)
    probe = run([SYSTEM_PYTHON, "-c", "import seccomp"])
    if probe.returncode != 0:
        pytest.fail("python3-seccomp is not installed (CI: apt-get install python3-seccomp)", pytrace=False)
    settings = unit_settings()
    spec = {
        "allow": sorted(unit_syscalls()),
        "errno": one(settings, "Service.SystemCallErrorNumber"),
        "families": one(settings, "Service.RestrictAddressFamilies").split(),
    }
    assert one(settings, "Service.MemoryDenyWriteExecute") == "yes"
    cache = tmp_path / "cache"  # the unit's TMPDIR
    cache.mkdir(mode=0o700)
    notify_socket = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_socket))
    log_path = tmp_path / "server.log"
    env = {"SANDBOX_SPEC": json.dumps(spec), "TMPDIR": str(cache), "NOTIFY_SOCKET": str(notify_socket)}
    process = start_server(small_tree.root, log_path, env, prefix=[SYSTEM_PYTHON, "-c", SANDBOX])
    try:
        assert "READY=1" in receive(sock, 30), log_path.read_text()
        url = wait_listening(process, log_path)
        image = small_tree.hello
        request = urllib.request.Request(f"{url}/v2/{image.name}/manifests/{image.tag}",
                                         headers={"Accept": image.media_type})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == image.data
        layer = image.layers[0]
        with urllib.request.urlopen(f"{url}/v2/{image.name}/blobs/{layer.digest}", timeout=10) as response:
            assert response.read() == layer.data
        assert stop(process) == 0, log_path.read_text()
    finally:
        stop(process)
        sock.close()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()
    assert list(cache.iterdir()) == [], "the one-file binary left its unpacked copy behind"


def test_sandbox_has_teeth(tmp_path):
    """The emulation really filters: a syscall the unit denies fails with its errno."""
    if run([SYSTEM_PYTHON, "-c", "import seccomp"]).returncode != 0:
        pytest.fail("python3-seccomp is not installed (CI: apt-get install python3-seccomp)", pytrace=False)
    settings = unit_settings()
    spec = {
        "allow": sorted(unit_syscalls()),
        "errno": one(settings, "Service.SystemCallErrorNumber"),
        "families": one(settings, "Service.RestrictAddressFamilies").split(),
    }
    assert "setuid" not in spec["allow"] and "setrlimit" not in spec["allow"]
    probe = ("import os, socket\n"
             "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('setuid denied')\n"
             "try:\n    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\nexcept OSError:\n"
             "    print('netlink denied')\n")
    env = dict(os.environ, SANDBOX_SPEC=json.dumps(spec))
    result = run([SYSTEM_PYTHON, "-c", SANDBOX, sys.executable, "-c", probe], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["setuid denied", "netlink denied"]
