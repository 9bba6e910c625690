"""Drive the real clients, containerd (through `ctr`) and skopeo, against a registry on 127.0.0.1.

containerd is THE client that matters: it is what K3s embeds. These helpers start a private
containerd daemon, point it at the registry with exactly the `hosts.toml` K3s writes, pull, and
then look at what containerd stored and unpacked. Every subprocess has a timeout.

What was found on Debian 12 with containerd 1.6.20 (apt), as root, rootfs on ext4:

- containerd runs fine without systemd, with its own root, state and sockets in a temp dir and the
  CRI plugin disabled (CRI wants CNI and a pause image; `ctr` needs neither).
- The overlayfs snapshotter loads ("ok" in `ctr plugins ls`); containerd itself test-mounts an
  overlay in its root when the plugin loads, so "ok" means it works. Where it cannot (rootfs on
  overlay, e.g. inside Docker, or no overlay module) the plugin reports "skip" and we fall back
  to the native snapshotter, which copies and works everywhere.
- Unpacking works with both: `ctr images pull` unpacks, `ctr snapshots ls` holds the committed
  chain IDs, `ctr images mount` shows the image's files.
- `ctr images pull` in 1.6 FETCHES IN THE CTR PROCESS, not in the daemon (1.7+ can use the
  daemon's transfer service). So the registry requests, the `trying next host` fallbacks and any
  `hosts.toml` parse errors appear in ctr's own stderr (with `--debug`, every request and response
  header), while the daemon's log only shows content ingestion and unpacking. Both are checked.
- `ctr images rm --sync` runs the garbage collector at once: content and snapshots are gone when
  it returns, so one daemon can serve many tests that each pull from scratch.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit, urlunsplit

CTR_TIMEOUT = 60.0
SKOPEO_TIMEOUT = 120.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# The made-up registry name of K3S-AIRGAP.md (`install.sh --system-default-registry ...`).
MIRRORED_HOST = "bootstrap-registry.airgap"
K8S_NAMESPACE = "k8s.io"  # the containerd namespace kubelet (CRI) uses in K3s

SNAPSHOTTER_PREFERENCE = ("overlayfs", "native")
# Snapshotters that cannot work here and only add noise ("skip"/warning lines) to the log.
_NOISY_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)

# logrus text format, as both containerd and ctr write it when not on a terminal.
_LEVEL_RE = re.compile(r'\blevel=(\w+)')
_BAD_LEVELS = {"warning", "warn", "error", "fatal", "panic"}


class ClientFailure(AssertionError):
    """A real client did something other than succeed; the message carries its output."""


def run(command: Sequence[str], timeout: float, check: bool = False,
        binary: bool = False) -> subprocess.CompletedProcess:
    """Run `command` with a hard timeout (text output unless `binary`). A timeout is a failure."""
    text = {} if binary else {"text": True, "errors": "replace"}
    try:
        result = subprocess.run(list(command), stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=timeout, **text)
    except subprocess.TimeoutExpired as expired:
        raise ClientFailure(f"timed out after {timeout}s: {' '.join(command)}\n"
                            f"stdout:\n{_text(expired.stdout)}\nstderr:\n{_text(expired.stderr)}") from None
    if check and result.returncode != 0:
        raise ClientFailure(describe(result))
    return result


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"`{' '.join(result.args)}` exited {result.returncode}\n"
            f"stdout:\n{_text(result.stdout)}\nstderr:\n{_text(result.stderr)}")


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def problem_lines(log_text: str) -> List[str]:
    """Lines at warning level or worse, and containerd's sign that a mirror failed it."""
    problems = []
    for line in log_text.splitlines():
        level = _LEVEL_RE.search(line)
        if (level and level.group(1).lower() in _BAD_LEVELS) or "trying next host" in line:
            problems.append(line)
    return problems


# ----- hosts.toml --------------------------------------------------------------------------

# K3s turns registries.yaml into certs.d/<registry>/hosts.toml. Two generations exist:
#
# "k3s" (current): k3s-io/k3s pkg/agent/templates `HostsTomlTemplate` rendered from
#   pkg/agent/containerd/config.go `getHostConfigs` and `normalizeEndpointAddress` (since PR
#   k3s-io/k3s#9323, in the January 2024 releases v1.26.13+k3s1, v1.27.10+k3s1, v1.28.6+k3s1,
#   v1.29.1+k3s1, and every release since, through the containerd 2 based ones). Endpoints are
#   normalized: a missing scheme becomes http for localhost/loopback on a port other than 443
#   (https otherwise), the path "", "/" or "/v2" becomes "/v2", and any other path is kept with
#   `override_path = true`. The registry's own default endpoint is written as `server = ...`
#   unless K3s runs with --disable-default-registry-endpoint. Rendered for
#   `bootstrap-registry.airgap: endpoint: ["http://127.0.0.1:9080"]`:
#
#       # File generated by k3s. DO NOT EDIT.
#
#       server = "https://bootstrap-registry.airgap/v2"
#       capabilities = ["pull", "resolve", "push"]
#
#
#       [host]
#       [host."http://127.0.0.1:9080/v2"]
#         capabilities = ["pull", "resolve"]
#
# "k3s-2023": the template of 2023 (v1.26/v1.27 before the releases above): the endpoint exactly as
#   written in registries.yaml, `server = "https://<registry>"` without /v2, and override_path
#   only for a path that does not end in /v2. Its [host] block is the one PROTOCOL.md quotes:
#
#       # File generated by k3s. DO NOT EDIT.
#       server = "https://bootstrap-registry.airgap"
#
#       [host."http://127.0.0.1:9080"]
#         capabilities = ["pull", "resolve"]
#
# (Before that, K3s wrote mirrors into containerd's config.toml for the CRI plugin only: nothing
# `ctr` can read.) containerd appends /v2 to a host path that does not end in it unless
# override_path is set, so both generations ask the registry for /v2/<name>/...
HOSTS_TOML_FORMS = ("k3s", "k3s-2023")


def _is_localhost(host: str) -> bool:
    """containerd's remotes/docker.IsLocalhost, for `host[:port]`."""
    hostname = urlsplit("//" + host).hostname or ""
    return hostname == "localhost" or hostname == "::1" or hostname.startswith("127.")


def _default_host(host: str) -> str:
    """containerd's remotes/docker.DefaultHost: docker.io's API lives at registry-1.docker.io."""
    return "registry-1.docker.io" if host == "docker.io" else host


def normalize_endpoint(endpoint: str) -> Tuple[str, bool]:
    """K3s `normalizeEndpointAddress`: (URL as written in hosts.toml, override_path)."""
    parts = urlsplit(endpoint if "://" in endpoint else "//" + endpoint)
    scheme = parts.scheme
    if not scheme:
        scheme = "http" if _is_localhost(parts.netloc) and parts.port not in (None, 443) else "https"
    netloc = _default_host(parts.netloc)
    if parts.path in ("", "/", "/v2"):
        return urlunsplit((scheme, netloc, "/v2", "", "")), False
    return urlunsplit((scheme, netloc, parts.path, "", "")), True


def hosts_toml_text(registry_host: str, endpoint_url: str, form: str = "k3s",
                    default_endpoint: bool = True, ca_file: Optional[str] = None) -> str:
    """The bytes K3s writes for `mirrors: {registry_host: {endpoint: [endpoint_url]}}`.

    `ca_file`: `configs: {<endpoint host:port>: {tls: {ca_file: ...}}}` in registries.yaml,
    which K3s renders as `ca = [...]` in the endpoint's [host] block.
    """
    header = "# File generated by k3s. DO NOT EDIT.\n"
    # Go's %q of a plain path is JSON's quoting.
    tls = f"\n  ca = [{json.dumps(ca_file)}]\n" if ca_file else ""
    if form == "k3s":
        url, override = normalize_endpoint(endpoint_url)
        text = header
        if default_endpoint:
            server, _ = normalize_endpoint(registry_host)
            text += f'\nserver = "{server}"\ncapabilities = ["pull", "resolve", "push"]\n\n'
        text += "\n[host]\n"
        text += f'[host."{url}"]\n  capabilities = ["pull", "resolve"]'
        if override:
            text += "\n  override_path = true"
        return text + tls + "\n"
    if form == "k3s-2023":
        path = urlsplit(endpoint_url).path
        override = path not in ("", "/") and not path.endswith("/v2")
        text = header
        if default_endpoint:
            text += f'server = "https://{_default_host(registry_host)}"'
        text += f'\n\n[host."{endpoint_url}"]\n  capabilities = ["pull", "resolve"]'
        if override:
            text += "\n  override_path = true"
        return text + tls + "\n"
    raise ValueError(f"unknown hosts.toml form {form!r}; known: {', '.join(HOSTS_TOML_FORMS)}")


def write_hosts_toml(certs_d: Path, registry_host: str, endpoint_url: str, form: str = "k3s",
                     default_endpoint: bool = True, ca_file: Optional[Path] = None) -> Path:
    """Write certs.d/<registry_host>/hosts.toml as K3s does for a registries.yaml mirror."""
    directory = Path(certs_d) / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(hosts_toml_text(registry_host, endpoint_url, form, default_endpoint,
                                    str(ca_file) if ca_file else None))
    return path


def make_self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> Tuple[Path, Path]:
    """(certificate, key) PEM files for `host`, valid for a day: what an operator's CA would sign."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    certificate, key = directory / "registry.crt", directory / "registry.key"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
         "-keyout", str(key), "-out", str(certificate)], timeout=30, check=True)
    return certificate, key


# ----- containerd --------------------------------------------------------------------------

@dataclass
class PullResult:
    ref: str
    result: subprocess.CompletedProcess
    daemon_log: str  # what containerd logged while the pull ran

    @property
    def ok(self) -> bool:
        return self.result.returncode == 0

    def problems(self) -> List[str]:
        """Warnings, errors and mirror fallbacks from ctr (the fetcher) and from the daemon."""
        return problem_lines(self.result.stderr) + problem_lines(self.daemon_log)

    def __str__(self) -> str:
        return f"{describe(self.result)}\ncontainerd log during the pull:\n{self.daemon_log}"


@dataclass
class Containerd:
    """A private containerd daemon: its own root, state, sockets and log."""

    base: Path
    process: subprocess.Popen
    address: str
    log_path: Path
    snapshotter: str = ""
    findings: List[str] = field(default_factory=list)  # what the start-up found, for reports

    # -- commands --

    def ctr(self, *args: str, timeout: float = CTR_TIMEOUT, check: bool = False,
            namespace: str = K8S_NAMESPACE) -> subprocess.CompletedProcess:
        return run(["ctr", "--address", self.address, "--namespace", namespace, *args],
                   timeout=timeout, check=check)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_mark(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(mark)
            return log.read().decode(errors="replace")

    def pull(self, ref: str, hosts_dir: Path, platform: Optional[str] = None,
             all_platforms: bool = False, timeout: float = CTR_TIMEOUT) -> PullResult:
        """`ctr images pull --hosts-dir` as an operator would; --debug logs every request."""
        args = ["--debug", "images", "pull", "--hosts-dir", str(hosts_dir),
                "--snapshotter", self.snapshotter]
        if all_platforms:
            args.append("--all-platforms")
        elif platform:
            args += ["--platform", platform]
        mark = self.log_mark()
        result = run(["ctr", "--address", self.address, "--namespace", K8S_NAMESPACE, *args, ref],
                     timeout=timeout)
        time.sleep(0.05)  # let the daemon flush what the pull made it log
        return PullResult(ref, result, self.log_since(mark))

    # -- what containerd holds --

    def images(self) -> Dict[str, Tuple[str, str]]:
        """ref -> (media type, digest), from `ctr images ls`."""
        listing = self.ctr("images", "ls", check=True).stdout.splitlines()
        images = {}
        for line in listing[1:]:
            parts = line.split()
            if len(parts) >= 3:
                images[parts[0]] = (parts[1], parts[2])
        return images

    def content_digests(self) -> Set[str]:
        return set(self.ctr("content", "ls", "-q", check=True).stdout.split())

    def snapshot_keys(self) -> Set[str]:
        listing = self.ctr("snapshots", "--snapshotter", self.snapshotter, "ls",
                           check=True).stdout.splitlines()
        return {line.split()[0] for line in listing[1:] if line.strip()}

    def ready_images(self) -> Set[str]:
        """Refs fully downloaded AND unpacked (`ctr images check -q`) for THIS machine's platform."""
        return set(self.ctr("images", "check", "-q", "--snapshotter", self.snapshotter,
                            check=True).stdout.split())

    @contextmanager
    def mounted(self, ref: str, platform: str) -> Iterator[Path]:
        """The unpacked image's rootfs, mounted read-only until the block ends."""
        target = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.base))
        try:
            self.ctr("images", "mount", "--snapshotter", self.snapshotter, "--platform", platform,
                     ref, str(target), check=True)
            try:
                yield target
            finally:
                self.ctr("images", "unmount", "--rm", str(target), check=True)
        finally:
            target.rmdir()

    def read_files(self, ref: str, platform: str, paths: Iterable[str]) -> Dict[str, bytes]:
        with self.mounted(ref, platform) as rootfs:
            return {p: (rootfs / p.lstrip("/")).read_bytes() for p in paths}

    def remove_all_images(self) -> None:
        """Remove every image and let GC drop its content and snapshots before returning."""
        refs = sorted(self.images())
        if refs:
            self.ctr("images", "rm", "--sync", *refs, check=True)
        leftover = self.content_digests()
        if leftover:
            raise ClientFailure(f"content left after removing every image: {sorted(leftover)}")

    # -- life cycle --

    def stop(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        _unmount_below(self.base)
        if not _mounts_below(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
        return self.process.returncode


def containerd_missing() -> Optional[str]:
    """Why containerd cannot run here, or None. CI installs it, so a reason means a FAIL."""
    missing = [tool for tool in ("containerd", "ctr") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH: apt-get install containerd"
    if os.geteuid() != 0:
        return "containerd needs root to mount snapshots (run the tests as root, as CI does)"
    return None


def start_containerd(base: Optional[Path] = None,
                     snapshotters: Sequence[str] = SNAPSHOTTER_PREFERENCE) -> Containerd:
    """Start containerd in `base` (a short fresh temp dir by default) and pick the first of
    `snapshotters` that loaded."""
    reason = containerd_missing()
    if reason:
        raise ClientFailure(reason)
    # Unix socket paths are limited to 108 bytes: keep the daemon's sockets in a short path.
    base = Path(base) if base else Path(tempfile.mkdtemp(prefix="mr-ctrd-"))
    base.mkdir(parents=True, exist_ok=True)
    address = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text(_containerd_config(base, address))
    log_path = base / "containerd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    daemon = Containerd(base=base, process=process, address=address, log_path=log_path)
    try:
        _wait_until_serving(daemon)
        daemon.snapshotter = _choose_snapshotter(daemon, snapshotters)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _containerd_config(base: Path, address: str) -> str:
    disabled = ", ".join(f'"{p}"' for p in _NOISY_PLUGINS)
    return f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
temp = "{base / 'tmp'}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"
"""


def _wait_until_serving(daemon: Containerd) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise ClientFailure(f"containerd exited with {daemon.process.returncode}:\n{daemon.log()}")
        if os.path.exists(daemon.address):
            version = run(["ctr", "--address", daemon.address, "version"], timeout=5)
            if version.returncode == 0:
                return
        time.sleep(0.05)
    raise ClientFailure(f"containerd did not serve {daemon.address} in {START_TIMEOUT}s:\n{daemon.log()}")


def _choose_snapshotter(daemon: Containerd, preference: Sequence[str]) -> str:
    """overlayfs when its plugin loaded (containerd test-mounts an overlay first), else native."""
    status = {}
    for line in daemon.ctr("plugins", "ls", check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "io.containerd.snapshotter.v1":
            status[parts[1]] = parts[-1]
    for name in preference:
        if status.get(name) == "ok":
            daemon.findings.append(f"snapshotter {name} (plugin status: {status})")
            return name
        daemon.findings.append(f"snapshotter {name} unusable: status {status.get(name, 'absent')}")
    raise ClientFailure(f"no usable snapshotter among {tuple(preference)}: {status}\n{daemon.log()}")


def _mounts_below(base: Path) -> List[str]:
    prefix = str(Path(base).resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return [p for p in points if p.startswith(prefix)]


def _unmount_below(base: Path) -> None:
    # Deepest first; a leftover mount must never let rmtree reach into a snapshot.
    for point in sorted(_mounts_below(base), key=len, reverse=True):
        run(["umount", point], timeout=10)


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI ChainID of a layer stack: the key of its top snapshot in containerd."""
    current = diff_ids[0]
    for diff_id in diff_ids[1:]:
        current = "sha256:" + hashlib.sha256(f"{current} {diff_id}".encode()).hexdigest()
    return current


def config_chain_id(config_bytes: bytes) -> str:
    return chain_id(json.loads(config_bytes)["rootfs"]["diff_ids"])


# ----- skopeo ------------------------------------------------------------------------------

def skopeo_missing() -> Optional[str]:
    return None if shutil.which("skopeo") else "skopeo not on PATH: apt-get install skopeo"


def skopeo(*args: str, timeout: float = SKOPEO_TIMEOUT, check: bool = False,
           binary: bool = False) -> subprocess.CompletedProcess:
    # --insecure-policy: no dependence on the machine's /etc/containers/policy.json.
    reason = skopeo_missing()
    if reason:
        raise ClientFailure(reason)
    return run(["skopeo", "--insecure-policy", *args], timeout=timeout, check=check, binary=binary)


def docker_ref(host_port: str, repository: str, reference: str) -> str:
    """`docker://HOST:PORT/name:tag` or `...name@sha256:...`."""
    separator = "@" if reference.startswith("sha256:") else ":"
    return f"docker://{host_port}/{repository}{separator}{reference}"


def skopeo_inspect_raw(host_port: str, repository: str, reference: str) -> bytes:
    """The manifest bytes exactly as served."""
    result = skopeo("inspect", "--raw", "--tls-verify=false",
                    docker_ref(host_port, repository, reference), check=True, binary=True)
    return result.stdout


def skopeo_inspect(host_port: str, repository: str, reference: str, tags: bool = True,
                   platform: str = "linux/amd64") -> dict:
    """`skopeo inspect` (config and, unless tags=False, the repository's tag list); for an
    index, of its `platform` instance whatever this machine is."""
    system, architecture, *variant = platform.split("/")
    args = ["--override-os", system, "--override-arch", architecture]
    args += ["--override-variant", variant[0]] if variant else []
    args += ["inspect", "--tls-verify=false"] + ([] if tags else ["--no-tags"])
    result = skopeo(*args, docker_ref(host_port, repository, reference), check=True)
    return json.loads(result.stdout)


def skopeo_copy_all(host_port: str, repository: str, reference: str, destination: str,
                    preserve_digests: bool = False) -> subprocess.CompletedProcess:
    """`skopeo copy --all` to `destination` (`oci:DIR:TAG` or `dir:DIR`); skopeo checks digests."""
    args = ["copy", "--all", "--src-tls-verify=false", "--retry-times", "0"]
    if preserve_digests:
        args.append("--preserve-digests")
    return skopeo(*args, docker_ref(host_port, repository, reference), destination, check=True)


def oci_layout_manifest_digests(layout: Path) -> List[str]:
    """Digests `index.json` of an OCI layout names (one per tag copied)."""
    index = json.loads((Path(layout) / "index.json").read_text())
    return [m["digest"] for m in index["manifests"]]


def oci_layout_blob_digests(layout: Path) -> Set[str]:
    return {"sha256:" + p.name for p in (Path(layout) / "blobs" / "sha256").iterdir()}
