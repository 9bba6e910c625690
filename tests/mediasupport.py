"""Drive make-airgap-media.sh and install-node.sh as an operator would, with stand-ins only for
what cannot be had offline: `k3s` is a real ELF file of the right architecture (a copy of
/usr/bin/true for amd64, a crafted header for arm64), `install.sh` records its arguments and
environment. minimal-registry is the one-file binary when MINIMAL_REGISTRY_BIN names it, else a
two-line wrapper running `python -m minimal_registry` from this checkout (passed with
--allow-script, as a developer would).

Used by test_media.py, test_script_inputs.py and test_journey.py.
"""

import hashlib
import os
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from imagetree import build_standard_tree
from serverproc import PROJECT_ROOT

MAKE_MEDIA = PROJECT_ROOT / "scripts/make-airgap-media.sh"
INSTALL_NODE = PROJECT_ROOT / "scripts/install-node.sh"
MEDIA_FILES = ["README.txt", "SHA256SUMS", "install-node.sh", "install.sh", "k3s",
               "minimal-registry", "minimal-registry.service", "registries.yaml", "registry.tar.gz"]
K3S_VERSION = "v1.31.4+k3s1"
SCRIPT_TIMEOUT = 180
ELF_MACHINES = {"amd64": 0x3E, "arm64": 0xB7}



def run(command: List[str], env: Optional[dict] = None, timeout: float = SCRIPT_TIMEOUT,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def elf_file(path: Path, arch: str) -> Path:
    """A file whose ELF header says `arch`: /usr/bin/true when it is that, else a crafted one."""
    true = Path("/usr/bin/true")
    if arch == "amd64" and true.read_bytes()[18:20] == struct.pack("<H", ELF_MACHINES["amd64"]):
        shutil.copyfile(true, path)
    else:
        header = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
                  + struct.pack("<HHIQQQIHHHHHH", 2, ELF_MACHINES[arch], 1, 0x400000, 64, 0, 0,
                                64, 56, 0, 64, 0, 0))
        path.write_bytes(header + hashlib.sha256(arch.encode()).digest() * 64)
    path.chmod(0o755)
    return path


def standin_install_sh(path: Path, record: Path) -> Path:
    """K3s's install.sh stand-in: writes `ARG:<arg>` and `ENV:<K3S_*/INSTALL_K3S_*>` lines."""
    path.write_text(
        "#!/bin/sh\n"
        "# Stand-in for K3s's install.sh: records how it was called.\n"
        f"{{ printf 'ARG:%s\\n' \"$@\"; env | grep -E '^(INSTALL_K3S|K3S)_' | sort | sed 's/^/ENV:/'; }}"
        f" > '{record}'\n")
    path.chmod(0o755)
    return path


def read_record(record: Path) -> Dict[str, List[str]]:
    lines = record.read_text().splitlines()
    return {"args": [line[4:] for line in lines if line.startswith("ARG:")],
            "env": [line[4:] for line in lines if line.startswith("ENV:")]}


def registry_binary(directory: Path) -> Path:
    """The minimal-registry that goes on the media: the built binary, or a source wrapper."""
    built = os.environ.get("MINIMAL_REGISTRY_BIN")
    if built:
        return Path(built).resolve()
    wrapper = directory / "minimal-registry-source"
    wrapper.write_text("#!/bin/sh\n"
                       "# minimal-registry from the source checkout (tests)\n"
                       f"PYTHONPATH='{PROJECT_ROOT}' exec '{sys.executable}' -m minimal_registry \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def script_env(tool: Path, home: Path, extra: Optional[dict] = None) -> dict:
    """The scripts' environment: no inherited MINIMAL_REGISTRY_* settings, a private cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MINIMAL_REGISTRY", "K3S_", "INSTALL_K3S_")) and k != "NOTIFY_SOCKET"}
    env.update({"MINIMAL_REGISTRY_BIN": str(tool), "XDG_CACHE_HOME": str(home / "cache"),
                "HOME": str(home), "LC_ALL": "C"})
    env.update(extra or {})
    return env


@dataclass
class Inputs:
    """What make-airgap-media.sh is given for one architecture."""
    work: Path
    arch: str
    k3s: Path
    install_sh: Path
    record: Path
    registry: Path      # the minimal-registry that goes on the media
    tool: Path          # the minimal-registry that runs here (verify)

    def args(self) -> List[str]:
        args = ["--arch", self.arch, "-k", self.k3s, "-i", self.install_sh, "-m", self.registry,
                "-v", K3S_VERSION]
        if self.registry.read_bytes()[:2] == b"#!":
            args.append("--allow-script")  # the source wrapper stands in for the binary
        return args

    def env(self, extra: Optional[dict] = None) -> dict:
        return script_env(self.tool, self.work, extra)


def make_inputs(work: Path, arch: str = "amd64") -> Inputs:
    work.mkdir(parents=True, exist_ok=True)
    tool = registry_binary(work)
    registry = tool if arch == "amd64" else elf_file(work / "minimal-registry-linux-arm64", arch)
    record = work / "install-record.txt"
    return Inputs(work=work, arch=arch, k3s=elf_file(work / f"k3s-{arch}", arch),
                  install_sh=standin_install_sh(work / "install.sh", record), record=record,
                  registry=registry, tool=tool)


def make_media(inputs: Inputs, tree: Path, media: Path, *extra: str,
               env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return run([MAKE_MEDIA, "-o", media, "-r", tree, *inputs.args(), *extra],
               env=env or inputs.env())


def install_node(media: Path, root: Path, *args: str, env: Optional[dict] = None,
                 passthrough: List[str] = ()) -> subprocess.CompletedProcess:
    command = ["bash", media / "install-node.sh", "--root", root, "--no-start", *args]
    if passthrough:
        command += ["--", *passthrough]
    return run(command, env=env)


def file_states(directory: Path) -> Dict[str, tuple]:
    """name -> (inode, mtime_ns, sha256) of every file below `directory`."""
    states = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            states[str(path.relative_to(directory))] = (
                stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return states


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----- fixtures shared by the media and script-input tests (imported by name) ------------------

@pytest.fixture
def inputs(tmp_path) -> Inputs:
    return make_inputs(tmp_path / "inputs")


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small real tree of this test's own, free to change."""
    return build_standard_tree(tmp_path / "src" / "registry", with_big=False).root


@pytest.fixture
def media(inputs, tree, tmp_path) -> Path:
    media = tmp_path / "media"
    result = make_media(inputs, tree, media)
    assert result.returncode == 0, describe(result)
    return media


@contextmanager
def small_tmpfs(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted at `path` (root only): media that cannot fit."""
    path.mkdir()
    mounted = run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path])
    if mounted.returncode != 0:
        pytest.fail(f"this test mounts a 64 KiB tmpfs and needs root: {mounted.stderr}", pytrace=False)
    try:
        yield path
    finally:
        run(["umount", path])
