"""The operator's whole journey on one machine: connected host -> media -> node -> containerd.

1. "The internet": minimal-registry on 127.0.0.1 serving a tree built by imagetree.
2. The connected host: scripts/download-system-images.sh fills a tree from it (with skopeo,
   from a local k3s-images.txt), and writes a registries.yaml beside it.
3. make-airgap-media.sh writes the media (a stand-in install.sh, a real amd64 ELF as k3s).
4. The node: install-node.sh --root ROOT --no-start installs it.
5. The installed minimal-registry serves the installed tree, and containerd pulls every image
   through the hosts.toml K3s derives from the installed registries.yaml, with the digests the
   internet had.

Only the port differs from a real node: the installed registries.yaml says 127.0.0.1:9080, and
the installed server listens on a free port here, so the endpoint's port is replaced by it.
"""

import json
import re
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import clients
from httpraw import sha256_of_body
from imagetree import TreeBuilder, build_standard_tree
from serverproc import PROJECT_ROOT, running_registry
from mediasupport import (K3S_VERSION, describe, install_node, make_inputs, make_media, read_record,
                          run)

DOWNLOAD_SCRIPT = PROJECT_ROOT / "scripts/download-system-images.sh"
INSTALLED_CONTENT = "var/lib/rancher/k3s/agent/registry"
INSTALLED_BINARY = "usr/local/bin/minimal-registry"
INSTALLED_REGISTRIES = "etc/rancher/k3s/registries.yaml"
DEFAULT_ENDPOINT = "127.0.0.1:9080"
AMD64 = "linux/amd64"


# ----- registries.yaml the way K3s reads it --------------------------------------------------

def mirror_endpoints(text: str) -> Dict[str, List[str]]:
    """`mirrors.<host>.endpoint[]` of a registries.yaml (the block-style subset K3s docs use;
    anything else under `mirrors` fails loudly rather than being misread)."""
    mirrors: Dict[str, List[str]] = {}
    section = host = key = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        item = line.strip()
        if indent == 0:
            section = item.rstrip(":")
            continue
        if section != "mirrors":
            continue
        if item.startswith("- "):
            assert host and key == "endpoint", f"line {number}: list item outside endpoint: {raw!r}"
            mirrors[host].append(item[2:].strip().strip('"').strip("'"))
        elif item.endswith(":") and indent == 2:
            host = item[:-1].strip().strip('"').strip("'")
            mirrors[host] = []
            key = None
        elif item.endswith(":") and indent == 4:
            key = item[:-1]
        elif indent == 4 and ":" in item:
            key = item.split(":")[0]  # rewrite: etc. on one line
        elif key != "endpoint":
            continue  # inside rewrite:
        else:
            raise AssertionError(f"line {number}: not understood: {raw!r}")
    return mirrors


def k3s_certs_d(registries_yaml: Path, certs_d: Path, actual_endpoint: str) -> Dict[str, List[str]]:
    """Write certs.d/<host>/hosts.toml as K3s does, the default endpoint moved to this test's port."""
    mirrors = mirror_endpoints(registries_yaml.read_text())
    assert mirrors, f"{registries_yaml} has no mirrors"
    for host, endpoints in mirrors.items():
        assert len(endpoints) == 1, f"one endpoint per mirror expected, {host} has {endpoints}"
        endpoint = endpoints[0]
        assert DEFAULT_ENDPOINT in endpoint, f"{host}'s endpoint {endpoint} is not this node's registry"
        clients.write_hosts_toml(certs_d, host, endpoint.replace(DEFAULT_ENDPOINT, actual_endpoint))
    return mirrors


def test_mirror_endpoints_reads_the_shipped_registries_yaml():
    mirrors = mirror_endpoints((PROJECT_ROOT / "packaging/registries.yaml").read_text())
    assert mirrors == {"bootstrap-registry.airgap": ["http://127.0.0.1:9080"]}
    text = ('mirrors:\n  "docker.io":\n    endpoint:\n      - "http://127.0.0.1:9080"\n'
            '    rewrite:\n      "^rancher/(.*)": "mirror/$1"\n'
            'configs:\n  docker.io:\n    tls:\n      insecure_skip_verify: true\n')
    assert mirror_endpoints(text) == {"docker.io": ["http://127.0.0.1:9080"]}


# ----- the node ---------------------------------------------------------------------------------

def install_from_tree(tmp_path: Path, tree: Path, *media_args: str) -> Tuple[Path, Path, object]:
    """make-airgap-media.sh from `tree`, then install-node.sh --root; returns (root, media, inputs)."""
    inputs = make_inputs(tmp_path / "inputs")
    media = tmp_path / "media"
    made = make_media(inputs, tree, media, *media_args)
    assert made.returncode == 0, describe(made)
    root = tmp_path / "node"
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    record = read_record(inputs.record)
    assert record["args"][:3] == ["server", "--system-default-registry", "bootstrap-registry.airgap"]
    assert "INSTALL_K3S_SKIP_DOWNLOAD=true" in record["env"]
    return root, media, inputs


def pull_everything(containerd, root: Path, tmp_path: Path, monkeypatch,
                    wanted: List[Tuple[str, str]]) -> None:
    """Serve ROOT's tree with ROOT's binary; pull each (ref, digest) through K3s's hosts.toml."""
    monkeypatch.setenv("MINIMAL_REGISTRY_BIN", str(root / INSTALLED_BINARY))
    with running_registry(root / INSTALLED_CONTENT, log_path=tmp_path / "node-registry.log") as node:
        certs_d = tmp_path / "certs.d"
        mirrors = k3s_certs_d(root / INSTALLED_REGISTRIES, certs_d, node.host_port)
        for reference, digest in wanted:
            host = reference.split("/")[0]
            assert host in mirrors, f"{reference}: registries.yaml mirrors no {host}"
            pulled = containerd.pull(reference, certs_d, platform=AMD64)
            assert pulled.ok, str(pulled)
            assert not pulled.problems(), "\n".join(pulled.problems()) + "\n\n" + str(pulled)
            assert containerd.images()[reference][1] == digest, reference
        log = node.log()
    assert "Traceback" not in log, log
    for reference, _ in wanted:
        host, _, name_tag = reference.partition("/")
        name, _, tag = name_tag.rpartition(":")
        # containerd asked the installed server, through the mirror K3s set up for `host`.
        assert f"HEAD /v2/{name}/manifests/{tag}?ns={host}" in log, f"{reference} not pulled from the node:\n{log}"


def test_node_serves_the_media_tree_to_containerd(containerd, small_tree, tmp_path, monkeypatch):
    """Media -> node -> containerd, from a tree as it is, with a second mirror for docker.io."""
    yaml = tmp_path / "registries.yaml"
    yaml.write_text((PROJECT_ROOT / "packaging/registries.yaml").read_text()
                    + '  docker.io:\n    endpoint:\n      - "http://127.0.0.1:9080"\n')
    root, _, _ = install_from_tree(tmp_path, small_tree.root, "-y", yaml)
    wanted = []
    for item in small_tree.tagged_items():
        if item.namespace == "docker.io":
            wanted.append((f"docker.io/{item.name}:{item.tag}", item.digest))  # ?ns=docker.io
        else:
            wanted.append((f"{clients.MIRRORED_HOST}/{item.name}:{item.tag}", item.digest))
    pull_everything(containerd, root, tmp_path, monkeypatch, wanted)


def test_whole_journey_from_the_internet_to_containerd(containerd, tmp_path, monkeypatch):
    if not DOWNLOAD_SCRIPT.exists():
        pytest.fail(f"{DOWNLOAD_SCRIPT.relative_to(PROJECT_ROOT)} (issue 3) is not there yet: "
                    "the journey starts with it", pytrace=False)
    if clients.skopeo_missing():
        pytest.fail(f"cannot download with skopeo: {clients.skopeo_missing()}", pytrace=False)
    internet_tree = build_standard_tree(tmp_path / "internet" / "registry", with_big=False)
    system_images = [internet_tree.multiarch, internet_tree.docker_list, internet_tree.hello,
                     internet_tree.deep]
    with running_registry(internet_tree.root, log_path=tmp_path / "internet.log") as internet:
        images_txt = tmp_path / "k3s-images.txt"
        images_txt.write_text("".join(f"{internet.host_port}/{item.name}:{item.tag}\n"
                                      for item in system_images))
        download_dir = tmp_path / "connected-host" / "registry"
        tool = make_inputs(tmp_path / "tool")
        downloaded = run([DOWNLOAD_SCRIPT, "-v", K3S_VERSION, "-l", images_txt, "-d", download_dir,
                          "-p", AMD64, "--tool", "skopeo"],
                         env=tool.env({"MINIMAL_REGISTRY_CMD": str(tool.tool),
                                       "PLAIN_HTTP_REGISTRIES": internet.host_port,
                                       "TMPDIR": str(tmp_path),
                                       "PULL_RETRIES": "2", "RETRY_DELAY": "1"}),
                         timeout=600)
        assert downloaded.returncode == 0, describe(downloaded)
    assert (download_dir.parent / "registries.yaml").is_file(), "the download script writes registries.yaml beside the tree"

    root, media, _ = install_from_tree(tmp_path, download_dir)
    assert (media / "registries.yaml").read_bytes() == (download_dir.parent / "registries.yaml").read_bytes()
    installed = root / INSTALLED_CONTENT
    assert re.fullmatch(r"[0-9a-f]{64}\n", (installed.parent / ".registry.sha256").read_text())
    wanted = [(f"{clients.MIRRORED_HOST}/{item.name}:{item.tag}", item.digest) for item in system_images]
    pull_everything(containerd, root, tmp_path, monkeypatch, wanted)


# ----- a node's lifetime: upgrade K3s, add an application, remove the old release -------------

K3S_LIKE = ("rancher/mirrored-pause", "rancher/mirrored-coredns-coredns", "rancher/klipper-helm",
            "rancher/local-path-provisioner")
RELEASES = {  # tag of each image in each release: pause is in both, the others move on
    "v1.30.8+k3s1": ("3.6", "1.10.1", "v0.8.0", "v0.0.24"),
    "v1.31.4+k3s1": ("3.6", "1.11.3", "v0.9.3", "v0.0.30"),
}


class Poller:
    """GETs every manifest (by tag and digest) and blob of `items` in a loop on a thread, and
    records every answer that is not a 200 with the expected digest: what a kubelet pulling
    during the upgrade would have seen."""

    def __init__(self, server, items):
        self.server, self.items = server, items
        self.failures: List[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self.first_round = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the poller did not stop"

    def _check(self, path: str, digest: str) -> None:
        try:
            status, actual, _ = sha256_of_body(self.server, path)
        except OSError as error:
            self.failures.append(f"{path}: {error}")
            return
        if status != 200 or actual != digest:
            self.failures.append(f"{path}: {status} {actual}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            for item in self.items:
                self._check(f"/v2/{item.name}/manifests/{item.tag}", item.digest)
                self._check(f"/v2/{item.name}/manifests/{item.digest}", item.digest)
                for blob in item.blobs:
                    self._check(f"/v2/{item.name}/blobs/{blob.digest}", blob.digest)
            self.rounds += 1
            self.first_round.set()


def download_release(tmp_path: Path, internet, version: str, images_txt: Path, tool) -> Path:
    """download-system-images.sh for one release's list, from the stand-in internet."""
    local_list = tmp_path / f"pull-{version}.txt"
    local_list.write_text(images_txt.read_text().replace("docker.io/", f"{internet.host_port}/"))
    tree = tmp_path / f"host-{version}" / "registry"
    downloaded = run([DOWNLOAD_SCRIPT, "-v", version, "-l", local_list, "-d", tree, "-p", AMD64,
                      "--tool", "skopeo"],
                     env=tool.env({"MINIMAL_REGISTRY_CMD": str(tool.tool),
                                   "PLAIN_HTTP_REGISTRIES": internet.host_port, "TMPDIR": str(tmp_path),
                                   "PULL_RETRIES": "2", "RETRY_DELAY": "1"}),
                     timeout=600)
    assert downloaded.returncode == 0, describe(downloaded)
    return tree


def test_upgrade_k3s_add_an_application_and_remove_the_old_release(tmp_path, monkeypatch):
    """Two media from two releases' k3s-images.txt; the node installed from the first, the
    second merged in while a server on the node's tree is polled (no request may fail),
    then an images-only media for an application, then `rm -f` + `prune` of the old release."""
    if clients.skopeo_missing():
        pytest.fail(f"cannot download with skopeo: {clients.skopeo_missing()}", pytrace=False)
    builder = TreeBuilder(tmp_path / "internet" / "registry")
    release_items = {version: [builder.image(name, tag, files={"id": f"{name}:{tag}\n".encode()})
                               for name, tag in zip(K3S_LIKE, tags)]
                     for version, tags in RELEASES.items()}
    app = builder.image("example/shop", "2.1", files={"shop": b"the operator's application\n"})
    old_version, new_version = RELEASES
    lists = {}
    for version, items in release_items.items():
        lists[version] = tmp_path / f"k3s-images-{version}.txt"
        lists[version].write_text("".join(f"docker.io/{i.name}:{i.tag}\n" for i in items))
    app_list = tmp_path / "shop-images.txt"
    app_list.write_text(f"docker.io/{app.name}:{app.tag}\n")

    tool = make_inputs(tmp_path / "tool")
    with running_registry(builder.root, log_path=tmp_path / "internet.log") as internet:
        trees = {v: download_release(tmp_path, internet, v, lists[v], tool) for v in RELEASES}
        app_tree = download_release(tmp_path, internet, "app", app_list, tool)

    inputs = make_inputs(tmp_path / "inputs")
    media = {}
    for version, tree in trees.items():
        media[version] = tmp_path / f"media-{version}"
        made = make_media(inputs, tree, media[version])
        assert made.returncode == 0, describe(made)
    app_media = tmp_path / "media-shop"
    made = run([PROJECT_ROOT / "scripts/make-airgap-media.sh", "-o", app_media, "-r", app_tree,
                "--images-only", "--arch", "amd64", "-m", inputs.registry]
               + (["--allow-script"] if inputs.registry.read_bytes()[:2] == b"#!" else []), env=inputs.env())
    assert made.returncode == 0, describe(made)

    root = tmp_path / "node"
    first = install_node(media[old_version], root, env=inputs.env())
    assert first.returncode == 0, describe(first)
    content = root / INSTALLED_CONTENT
    monkeypatch.setenv("MINIMAL_REGISTRY_BIN", str(root / INSTALLED_BINARY))
    with running_registry(content, "-q", log_path=tmp_path / "node.log") as node:
        with Poller(node, release_items[old_version]) as poller:
            assert poller.first_round.wait(60), "the poller never finished a round"
            rounds_before = poller.rounds
            upgrade = install_node(media[new_version], root, env=inputs.env())
            rounds_during = poller.rounds - rounds_before
        assert upgrade.returncode == 0, describe(upgrade)
        assert poller.failures == [], poller.failures[:10]
        assert rounds_during >= 1, "no poll ran while the second media was merged in"
        for item in release_items[new_version][1:]:
            assert f"added {item.name}:{item.tag}" in upgrade.stderr, upgrade.stderr

        with Poller(node, release_items[old_version] + release_items[new_version]) as poller:
            added = install_node(app_media, root, env=inputs.env())
        assert added.returncode == 0, describe(added)
        assert poller.failures == [], poller.failures[:10]
        assert f"added {app.name}:{app.tag}" in added.stderr

        # Removing the old release: the one documented command pair.
        blobs_before = {p.name: p.stat().st_size for p in (content / "blobs").iterdir()}
        removed = run([root / INSTALLED_BINARY, "rm", "-d", content, "-f", lists[old_version],
                       "--keep", lists[new_version]])
        assert removed.returncode == 0, describe(removed)
        with Poller(node, release_items[new_version] + [app]) as poller:
            pruned = run([root / INSTALLED_BINARY, "prune", "--json", "-d", content])
        assert pruned.returncode == 0, describe(pruned)
        assert poller.failures == [], poller.failures[:10]
        kept_blobs = {b.digest for item in release_items[new_version] + [app] for b in item.blobs}
        old_only = {b.digest for item in release_items[old_version] for b in item.blobs} - kept_blobs
        blobs_after = {p.name for p in (content / "blobs").iterdir()}
        assert set(blobs_before) - blobs_after == old_only
        assert kept_blobs <= blobs_after
        report = json.loads(pruned.stdout)
        assert report["blobs"] == {"count": len(old_only), "bytes": sum(blobs_before[d] for d in old_only)}
        for item in release_items[new_version] + [app]:
            assert sha256_of_body(node, f"/v2/{item.name}/manifests/{item.tag}")[:2] == (200, item.digest)
        for item in release_items[old_version][1:]:
            assert sha256_of_body(node, f"/v2/{item.name}/manifests/{item.tag}")[0] == 404
    verified = run([root / INSTALLED_BINARY, "verify", "-d", content])
    assert verified.returncode == 0, describe(verified)
