"""Start minimal-registry as a real process on a free port, the way an operator runs it.

The command is the source tree (`python -m minimal_registry`) unless MINIMAL_REGISTRY_BIN
names a built binary, so the same tests prove the one-file executable. `start_registry` is
the one way every test starts a server and waits for its `listening on` line; its options
cover what the tests wrap it in (strace, a seccomp launcher, unshare + chroot, rlimits).
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
from typing import Callable, Iterator, List, Optional, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LISTENING_RE = re.compile(r"listening on (https?)://(\S+?)/?(?:\s|$)")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


class RegistryDidNotStart(AssertionError):
    """The server exited, or never said `listening on`; the message carries its log."""


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
    root: Optional[Path]  # as the server was told (-d), None when it came from the environment
    log_path: Path
    scheme: str
    host_port: str  # "127.0.0.1:PORT", what hosts.toml and skopeo want
    own_session: bool = False  # started as its own process group, killed as one
    signal_child: bool = False  # `process` is a wrapper (strace) whose child is the server

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_port}"

    @property
    def port(self) -> int:
        return int(self.host_port.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig) -> None:
        """To the server: the process started, or under `signal_child` its children (strace
        detaches on SIGTERM and leaves the server running; it exits when the server does)."""
        if not self.signal_child:
            self.process.send_signal(sig)
            return
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in (children.read_text().split() if children.exists() else []):
            try:
                os.kill(int(pid), sig)
            except ProcessLookupError:
                pass

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT) -> int:
        """Signal, wait `timeout`, then SIGKILL (the whole group under `own_session`); the exit
        code, which is then -9: a server that hangs on SIGTERM fails `stop() == 0`."""
        if self.process.poll() is None:
            self.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL to the server and whatever started it (its group under `own_session`)."""
        if self.own_session:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is already gone
        else:
            if self.signal_child:
                self.send_signal(signal.SIGKILL)
            self.process.kill()
        self.process.wait()


def start_registry(root: Optional[Path], *args: str, listen: Optional[str] = "127.0.0.1:0",
                   log_path: Optional[Path] = None, env: Optional[dict] = None, clean_env: bool = False,
                   prefix: Sequence[str] = (), program: Optional[Sequence[str]] = None,
                   own_session: bool = False, signal_child: bool = False,
                   preexec_fn: Optional[Callable[[], None]] = None,
                   start_timeout: float = START_TIMEOUT) -> RunningRegistry:
    """Start `prefix + program -d root -l listen args` and return once it logs `listening on`.

    root:        the -d directory as the server sees it (a path inside a chroot, say); None
                 leaves -d out (MINIMAL_REGISTRY_DIR gives it). listen=None leaves -l out.
    log_path:    stdout and stderr together; required when root is None or not on this host.
    env:         added to this environment minus MINIMAL_REGISTRY_* (command_env); with
                 clean_env the process gets `env` alone, as a unit or `env -i` would give it.
    prefix:      a wrapper that ends by exec'ing the rest (a seccomp launcher, unshare +
                 chroot), or one that stays as its parent (strace: then signal_child).
    program:     the registry command (default: registry_command()), e.g. a path in a chroot.
    own_session: a new session and process group, as systemd starts a unit; stop() ends a
                 hung server's whole group.
    preexec_fn:  runs in the child before exec (rlimits, prctl).
    """
    if log_path is None:
        if root is None:
            raise ValueError("start_registry needs a log_path when root is None")
        log_path = Path(root).parent / f"registry-{os.getpid()}-{time.monotonic_ns()}.log"
    command = list(prefix) + list(program if program is not None else registry_command())
    command += (["-d", str(root)] if root is not None else []) + (["-l", listen] if listen else []) + list(args)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(env or {}) if clean_env else command_env(env),
                                   start_new_session=own_session, preexec_fn=preexec_fn)
    registry = RunningRegistry(process, Path(root) if root is not None else None, log_path, "", "",
                               own_session=own_session, signal_child=signal_child)
    deadline = time.monotonic() + start_timeout
    while True:
        match = LISTENING_RE.search(registry.log())
        if match:
            registry.scheme, registry.host_port = match.group(1), match.group(2)
            return registry
        if process.poll() is not None:
            registry.kill()  # a wrapper's leftovers (strace's child, the process group)
            raise RegistryDidNotStart(f"registry exited with {process.returncode} before listening:\n{registry.log()}")
        if time.monotonic() > deadline:
            registry.kill()
            raise RegistryDidNotStart(f"registry did not listen within {start_timeout}s:\n{registry.log()}")
        time.sleep(0.02)


@contextmanager
def running_registry(root: Optional[Path], *args: str, **options) -> Iterator[RunningRegistry]:
    """start_registry (same arguments) for the length of a `with` block, stopped after it."""
    registry = start_registry(root, *args, **options)
    try:
        yield registry
    finally:
        registry.stop()
