"""Start minimal-registry as a real process on a free port, the way an operator runs it.

The command is the source tree (`python -m minimal_registry`) unless MINIMAL_REGISTRY_BIN
names a built binary, so the same tests prove the one-file executable.
"""

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LISTENING_RE = re.compile(r"listening on (https?)://(\S+?)/?(?:\s|$)")
START_TIMEOUT = 20.0


def registry_command() -> List[str]:
    binary = os.environ.get("MINIMAL_REGISTRY_BIN")
    if binary:
        return [str(Path(binary).resolve())]
    return [sys.executable, "-m", "minimal_registry"]


def command_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key in [k for k in env if k.startswith("MINIMAL_REGISTRY_") and k != "MINIMAL_REGISTRY_BIN"]:
        del env[key]
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


@dataclass
class RunningRegistry:
    process: subprocess.Popen
    root: Path
    log_path: Path
    scheme: str
    host_port: str  # "127.0.0.1:PORT", what hosts.toml and skopeo want

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_port}"

    @property
    def port(self) -> int:
        return int(self.host_port.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextmanager
def running_registry(root: Path, *args: str, log_path: Optional[Path] = None,
                     env: Optional[dict] = None, listen: str = "127.0.0.1:0") -> Iterator[RunningRegistry]:
    """Serve `root` on `listen` (a free port by default) until the block ends."""
    registry = start_registry(root, *args, log_path=log_path, env=env, listen=listen)
    try:
        yield registry
    finally:
        registry.stop()


def start_registry(root: Path, *args: str, log_path: Optional[Path] = None,
                   env: Optional[dict] = None, listen: str = "127.0.0.1:0",
                   preexec_fn: Optional[Callable[[], None]] = None) -> RunningRegistry:
    """Start the registry; `preexec_fn` runs in the child before it (e.g. to set rlimits)."""
    log_path = log_path or Path(root).parent / f"registry-{os.getpid()}-{time.monotonic_ns()}.log"
    command = registry_command() + ["-d", str(root)] + (["-l", listen] if listen else []) + list(args)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=command_env(env), preexec_fn=preexec_fn)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = LISTENING_RE.search(log_path.read_text(errors="replace"))
        if match:
            return RunningRegistry(process, Path(root), log_path, match.group(1), match.group(2))
        if process.poll() is not None:
            raise RuntimeError(f"registry exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"registry did not start in {START_TIMEOUT}s:\n{log_path.read_text()}")
