"""The shipped one-file executable: static, portable, and well-behaved under systemd.

Runs against `MINIMAL_REGISTRY_BIN` (default `dist/minimal-registry-linux-<this arch>`) and,
for the arm64 tests, `MINIMAL_REGISTRY_BIN_ARM64` (default `dist/minimal-registry-linux-arm64`),
both made by `scripts/build-binary.sh`. A binary that is absent skips its tests on a
developer's machine; under CI (`CI=true`), or when the variable names a missing file, it FAILS:
a build that silently produced nothing must not pass. The same holds for what the tests need:
root (chroot, mount), debootstrap, and qemu-aarch64 registered with binfmt_misc.

The Debian 11 root (glibc 2.31) is made once with debootstrap and kept in
`build/cache/rootfs-bullseye-<arch>` (git-ignored; `MINIMAL_REGISTRY_TEST_CACHE` moves it).
Every server listens on 127.0.0.1 only.
"""

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from notifysocket import bind_notify_socket
from serverproc import RunningRegistry, running_registry

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MINIMAL_REGISTRY_TEST_CACHE") or PROJECT_ROOT / "build" / "cache")
DEBIAN_MIRROR = os.environ.get("MINIMAL_REGISTRY_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IN_CI = os.environ.get("CI", "").lower() == "true"
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
HOST_MACHINE = platform.machine()
NAME = "library/tiny"
TAG = "v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# Straight to 127.0.0.1, whatever http_proxy says.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def need(condition, reason):
    """Skip on a developer's machine, fail under CI: CI must prove the binary, not skip it."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def locate(variable, default):
    given = os.environ.get(variable)
    if given:
        path = Path(given).resolve()
        if not path.is_file():
            pytest.fail(f"{variable}={given} names no file")
        return path
    need(default.is_file(), f"{default} not built: run scripts/build-binary.sh (or set {variable})")
    return default


@pytest.fixture(scope="module")
def binary():
    need(HOST_MACHINE in DEB_ARCH, f"no binary is built for {HOST_MACHINE}")
    return locate("MINIMAL_REGISTRY_BIN", PROJECT_ROOT / "dist" / f"minimal-registry-linux-{DEB_ARCH[HOST_MACHINE]}")


@pytest.fixture(scope="module")
def arm64_binary():
    path = locate("MINIMAL_REGISTRY_BIN_ARM64", PROJECT_ROOT / "dist" / "minimal-registry-linux-arm64")
    if HOST_MACHINE != "aarch64":
        entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
        need(entry.exists() and entry.read_text().startswith("enabled") and "F" in _flags(entry),
             "qemu-aarch64 is not registered with binfmt_misc (F flag): install qemu-user-static, "
             "mount binfmt_misc, update-binfmts --enable qemu-aarch64")
    return path


@pytest.fixture
def root_only():
    need(os.geteuid() == 0, "needs root (chroot, mount)")


def _flags(entry: Path) -> str:
    for line in entry.read_text().splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1]
    return ""


# --- a tiny content tree (see minimal_registry/layout.py) ---------------------------------

def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tree(root: Path) -> dict:
    """ROOT/blobs/sha256:<hex> for a config and a layer, one manifest, a tag symlink."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    layer = hashlib.sha512(b"layer").digest() * 4096 + b"tail"  # 256 KiB + 4 bytes, not aligned
    config = json.dumps({"architecture": "amd64", "os": "linux"}, sort_keys=True).encode()
    for data in (layer, config):
        (blobs / _digest(data)).write_bytes(data)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    manifests = root / NAME / "manifests"
    manifests.mkdir(parents=True)
    (manifests / _digest(manifest)).write_bytes(manifest)
    (manifests / TAG).symlink_to(_digest(manifest))
    return {"layer": layer, "manifest": manifest}


# --- running the binary ----------------------------------------------------------------------

def serving(program, root, log_path: Path, prefix=(), env=None, start_timeout=30.0, **options):
    """serverproc.running_registry for the built binary: `program` under `prefix` (unshare +
    chroot), serving `root` as the server sees it, with `env` alone (default: a PATH) and in
    its own process group, as systemd starts it."""
    return running_registry(root, program=[str(program)], prefix=prefix, log_path=log_path, clean_env=True,
                            env=env if env is not None else {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                            own_session=True, start_timeout=start_timeout, **options)


def http_get(server: RunningRegistry, path: str):
    with HTTP.open(urllib.request.Request(server.url + path), timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def in_chroot(root: Path, *argv: str):
    """Run argv in `root` with /proc mounted, in a private mount namespace that vanishes with
    it. Every step execs the next, so the returned process's pid is the binary's own. Without
    argv: the prefix to put before a command."""
    script = 'mount -t proc proc "$1/proc" && root="$1" && shift && exec chroot "$root" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", str(root), *argv]


def empty_root(tmp_path: Path, executable: Path) -> Path:
    """Only the executable, /tmp, /proc (mounted at run time) and the content tree."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(executable, root / "minimal-registry")
    return root


def assert_serves(server: RunningRegistry, tree: dict):
    status, headers, body = http_get(server, "/v2/")
    assert (status, body) == (200, b"{}")
    status, headers, body = http_get(server, f"/v2/{NAME}/manifests/{TAG}")
    assert (status, body) == (200, tree["manifest"])
    assert headers["Content-Type"] == OCI_MANIFEST
    assert headers["Docker-Content-Digest"] == _digest(tree["manifest"])
    status, headers, body = http_get(server, f"/v2/{NAME}/blobs/{_digest(tree['layer'])}")
    assert status == 200 and headers["Content-Length"] == str(len(tree["layer"]))
    assert body == tree["layer"], "the blob must arrive byte for byte"


def leftovers(tmpdir: Path):
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith(("_MEI", "staticx")))


# --- the native binary -------------------------------------------------------------------------

def test_has_no_dynamic_dependency(binary):
    need(shutil.which("ldd") is not None, "ldd (libc-bin) is not installed")
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    assert "not a dynamic executable" in result.stdout + result.stderr


def test_version_names_the_architecture_python_and_gevent(binary):
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, env={})
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"minimal-registry \S+ \({HOST_MACHINE}; Python 3\.\d+\.\d+; gevent \d+\.\S+\)\n",
                        result.stdout), result.stdout


def test_serves_a_blob_byte_for_byte_in_an_empty_chroot(binary, root_only, tmp_path):
    root = empty_root(tmp_path, binary)
    tree = make_tree(root / "registry")
    with serving("/minimal-registry", "/registry", tmp_path / "log", prefix=in_chroot(root)) as server:
        assert_serves(server, tree)
        assert server.stop() == 0, server.log()
    assert leftovers(root / "tmp") == []


@pytest.fixture(scope="module")
def bullseye_root():
    """Debian 11 (glibc 2.31), made once and cached: an older libc than the build's 2.36."""
    need(os.geteuid() == 0, "needs root (debootstrap, chroot)")
    need(HOST_MACHINE in DEB_ARCH, f"no Debian root for {HOST_MACHINE}")
    root = CACHE / f"rootfs-bullseye-{DEB_ARCH[HOST_MACHINE]}"
    if not (root / ".complete").exists():
        need(shutil.which("debootstrap") is not None, "debootstrap is not installed (apt-get install debootstrap)")
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["debootstrap", "--variant=minbase", "bullseye", str(root), DEBIAN_MIRROR],
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"debootstrap bullseye failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        (root / ".complete").touch()
    return root


def test_serves_a_blob_on_debian_11_with_glibc_2_31(binary, bullseye_root, tmp_path):
    libc = subprocess.run(in_chroot(bullseye_root, "ldd", "--version"), capture_output=True, text=True)
    assert "2.31" in libc.stdout.splitlines()[0], libc.stdout
    work = bullseye_root / "srv" / f"test-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        shutil.copy2(binary, work / "minimal-registry")
        tree = make_tree(work / "registry")
        inside = Path("/") / work.relative_to(bullseye_root)
        prefix = in_chroot(bullseye_root, "/usr/bin/env", "-i", f"TMPDIR={inside}")
        with serving(inside / "minimal-registry", inside / "registry", tmp_path / "log", prefix=prefix) as server:
            assert_serves(server, tree)
            assert server.stop() == 0, server.log()
        assert leftovers(work) == []
    finally:
        shutil.rmtree(work)


@pytest.mark.parametrize("whole_group", [False, True], ids=["main-pid", "control-group"])
def test_sigterm_stops_gracefully_and_leaves_nothing_in_tmpdir(binary, tmp_path, whole_group):
    """SIGTERM to the bootloader is forwarded down to Python; systemd's default KillMode also
    sends it to every process of the unit at once. Either way: exit 0, temp dirs removed."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    tree = make_tree(tmp_path / "registry")
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmpdir)}
    with serving(binary, tmp_path / "registry", tmp_path / "log", env=env) as server:
        assert_serves(server, tree)
        assert leftovers(tmpdir), "a running one-file binary unpacks into $TMPDIR"
        if whole_group:
            os.killpg(server.process.pid, signal.SIGTERM)
        assert server.stop() == 0, server.log()
    assert leftovers(tmpdir) == [], server.log()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_and_stopping_reach_notify_socket_from_a_child_process(binary, tmp_path, abstract):
    """The bootloaders run Python in a child: systemd needs NotifyAccess=all to accept it."""
    tree_root = tmp_path / "registry"
    make_tree(tree_root)
    listener, notify_socket = bind_notify_socket(tmp_path, abstract)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    listener.settimeout(60)
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "NOTIFY_SOCKET": notify_socket}

    def receive():
        data, ancillary, _flags, _address = listener.recvmsg(4096, socket.CMSG_SPACE(12))
        sender = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = int.from_bytes(payload[:4], "little")
        return data.decode(), sender

    try:
        with serving(binary, tree_root, tmp_path / "log", env=env) as server:
            state, sender = receive()
            assert "READY=1" in state.split("\n")
            assert sender is not None and sender != server.process.pid, \
                "READY=1 comes from a child of the bootloader: the unit needs NotifyAccess=all"
            server.process.send_signal(signal.SIGTERM)
            state, _sender = receive()
            assert "STOPPING=1" in state.split("\n")
            assert server.stop() == 0, server.log()
    finally:
        listener.close()


def _refuse_exec_gain():
    """prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): the kernel's MemoryDenyWriteExecute=,
    inherited across fork and exec. Runs in the child before exec."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
        os._exit(97)


def test_runs_under_memory_deny_write_execute(binary, tmp_path):
    """The unit sets MemoryDenyWriteExecute=yes: no bundled library may need W+X memory, an
    executable stack or text relocations."""
    probe = subprocess.run(["/bin/true"], preexec_fn=_refuse_exec_gain)
    if probe.returncode == 97:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    tree = make_tree(tmp_path / "registry")
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    with serving(binary, tmp_path / "registry", tmp_path / "log", env=env, preexec_fn=_refuse_exec_gain) as server:
        assert_serves(server, tree)
        assert server.stop() == 0, server.log()


@pytest.fixture
def noexec_tmpdir(root_only, tmp_path):
    mountpoint = tmp_path / "noexec"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,nosuid,nodev,size=64m", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_noexec_tmpdir_fails_in_one_line_that_names_the_fix(binary, noexec_tmpdir, tmp_path):
    """A hardened node mounts /tmp noexec, where a one-file binary cannot run what it unpacks."""
    make_tree(tmp_path / "registry")
    result = subprocess.run([str(binary), "-d", str(tmp_path / "registry"), "-l", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "TMPDIR": str(noexec_tmpdir)})
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "noexec" in lines[0] and "TMPDIR" in lines[0] and "exec-capable" in lines[0], lines[0]
    assert str(noexec_tmpdir) in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(noexec_tmpdir.iterdir()) == []


def test_build_script_is_shellcheck_clean():
    need(shutil.which("shellcheck") is not None, "shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(PROJECT_ROOT / "scripts" / "build-binary.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the arm64 binary, through qemu-user on another architecture ---------------------------------

def test_arm64_binary_serves_in_an_empty_chroot_and_reports_aarch64(arm64_binary, root_only, tmp_path):
    root = empty_root(tmp_path, arm64_binary)
    tree = make_tree(root / "registry")
    version = subprocess.run(in_chroot(root, "/minimal-registry", "--version"),
                             capture_output=True, text=True, timeout=120, env={})
    assert version.returncode == 0, version.stderr
    assert "(aarch64; Python 3." in version.stdout, version.stdout
    with serving("/minimal-registry", "/registry", tmp_path / "log", prefix=in_chroot(root),
                 start_timeout=120) as server:
        assert_serves(server, tree)
        assert server.stop(timeout=60) == 0, server.log()
    assert leftovers(root / "tmp") == []
