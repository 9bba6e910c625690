"""make-airgap-media.sh writes the media; install-node.sh installs from it, under --root.

Everything runs the real scripts as subprocesses (mediasupport.py says with which stand-ins);
K3s's release server is a local HTTP server on 127.0.0.1.
"""

import http.server
import os
import shutil
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from imagetree import TreeBuilder
from mediasupport import (ELF_MACHINES, INSTALL_NODE, K3S_VERSION, MAKE_MEDIA, MEDIA_FILES, Inputs, describe,
                          elf_file, file_states, inputs, install_node, make_inputs, make_media, media, read_record,
                          run, sha256_file, small_tmpfs, tree)  # noqa: F401 (fixtures by name)
from serverproc import PROJECT_ROOT


# ----- shellcheck -----------------------------------------------------------------------------

def test_every_script_passes_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is not installed (CI: apt-get install shellcheck)", pytrace=False)
    scripts = sorted((PROJECT_ROOT / "scripts").glob("*.sh"))
    scripts += sorted(p for p in (PROJECT_ROOT / ".ci").glob("*") if p.is_file()
                      and p.read_bytes()[:2] == b"#!" and b"sh" in p.read_bytes().split(b"\n")[0])
    assert MAKE_MEDIA in scripts and INSTALL_NODE in scripts
    result = run(["shellcheck", "--external-sources", *scripts], cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_document_usage_in_help():
    for script, words in ((MAKE_MEDIA, ["-o DIR", "--download", "K3S_RELEASE_URL", "--zstd",
                                        "--arch ARCHES", "amd64,arm64", "--images-only"]),
                          (INSTALL_NODE, ["--root DIR", "--no-start", "--dummy-route", "--agent",
                                          "--replace", "--registry", "INSTALL_NODE_ARCH"])):
        result = run(["bash", script, "--help"])
        assert result.returncode == 0, describe(result)
        for word in words:
            assert word in result.stdout, f"{script.name} --help does not mention {word}"


# ----- make-airgap-media.sh -------------------------------------------------------------------

def test_media_holds_every_file_with_matching_checksums(media, inputs):
    assert sorted(p.name for p in media.iterdir()) == MEDIA_FILES
    check = run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=media)
    assert check.returncode == 0, describe(check)
    listed = sorted(line.split()[1] for line in (media / "SHA256SUMS").read_text().splitlines())
    assert listed == sorted(set(MEDIA_FILES) - {"SHA256SUMS"})
    assert (media / "k3s").read_bytes() == inputs.k3s.read_bytes()
    assert (media / "minimal-registry.service").read_bytes() == (PROJECT_ROOT / "minimal-registry.service").read_bytes()
    assert (media / "install-node.sh").read_bytes() == INSTALL_NODE.read_bytes()
    assert (media / "registries.yaml").read_bytes() == (PROJECT_ROOT / "packaging/registries.yaml").read_bytes()
    readme = (media / "README.txt").read_text()
    assert K3S_VERSION in readme and "linux/amd64" in readme and "install-node.sh" in readme
    assert "@" not in readme.replace("@-", ""), "a template placeholder was left in README.txt"


def test_archive_is_the_tree_under_registry(media, tree, tmp_path):
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    result = run(["tar", "-xzf", media / "registry.tar.gz", "-C", unpacked])
    assert result.returncode == 0, describe(result)
    assert [p.name for p in unpacked.iterdir()] == ["registry"]
    original = {str(p.relative_to(tree)): (p.is_symlink() and os.readlink(p)) or (p.is_file() and p.read_bytes())
                for p in tree.rglob("*")}
    copied = {str(p.relative_to(unpacked / "registry")): (p.is_symlink() and os.readlink(p)) or (p.is_file() and p.read_bytes())
              for p in (unpacked / "registry").rglob("*")}
    assert copied == original


def test_archive_is_deterministic(inputs, tree, tmp_path):
    """Same tree, same bytes: sorted names, owner 0, mtime 0, gzip without name or time."""
    first, second = tmp_path / "first", tmp_path / "second"
    for media in (first, second):
        result = make_media(inputs, tree, media)
        assert result.returncode == 0, describe(result)
    # Touching the tree's files (mtimes, atimes) changes nothing either.
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (1_700_000_000, 1_700_000_000))
    third = tmp_path / "third"
    assert make_media(inputs, tree, third).returncode == 0
    archive = (first / "registry.tar.gz").read_bytes()
    assert archive == (second / "registry.tar.gz").read_bytes() == (third / "registry.tar.gz").read_bytes()
    assert archive[3] & 0x08 == 0, "gzip header records a file name (use gzip -n)"
    assert archive[4:8] == bytes(4), "gzip header records a time (use gzip -n)"
    listing = run(["tar", "--numeric-owner", "-tvzf", first / "registry.tar.gz"]).stdout.splitlines()
    assert all(" 0/0 " in line and " 1970-01-01 00:00 " in line for line in listing), listing[:3]
    assert listing[0].split()[5] == "registry/"
    assert (first / "SHA256SUMS").read_bytes() == (third / "SHA256SUMS").read_bytes()


def test_rerun_changes_nothing_and_says_so(media, inputs, tree):
    before = file_states(media)
    result = make_media(inputs, tree, media)
    assert result.returncode == 0, describe(result)
    assert "nothing to do" in result.stderr
    assert file_states(media) == before
    assert not [p for p in media.iterdir() if p.name.startswith(".")], "staging left behind"


def test_rerun_replaces_only_what_changed(media, inputs, tree, tmp_path):
    before = file_states(media)
    other_yaml = tmp_path / "other-registries.yaml"
    other_yaml.write_text((PROJECT_ROOT / "packaging/registries.yaml").read_text()
                          + "  docker.io:\n    endpoint:\n      - \"http://127.0.0.1:9080\"\n")
    result = make_media(inputs, tree, media, "-y", other_yaml)
    assert result.returncode == 0, describe(result)
    after = file_states(media)
    changed = sorted(name for name in after if after[name] != before.get(name))
    assert changed == ["SHA256SUMS", "registries.yaml"]
    assert run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=media).returncode == 0


def test_registries_yaml_beside_the_tree_is_used(inputs, tree, tmp_path):
    """download-system-images.sh writes one beside the tree; it matches the tree."""
    beside = tree.parent / "registries.yaml"
    beside.write_text("mirrors:\n  bootstrap-registry.airgap:\n    endpoint:\n"
                      "      - \"http://127.0.0.1:9080\"\n  ghcr.io:\n    endpoint:\n"
                      "      - \"http://127.0.0.1:9080\"\n")
    media = tmp_path / "media"
    result = make_media(inputs, tree, media)
    assert result.returncode == 0, describe(result)
    assert (media / "registries.yaml").read_bytes() == beside.read_bytes()


def test_zstd_archive_replaces_the_gzip_one(media, inputs, tree):
    if not shutil.which("zstd"):
        pytest.fail("zstd is not installed (CI: apt-get install zstd)", pytrace=False)
    result = make_media(inputs, tree, media, "--zstd")
    assert result.returncode == 0, describe(result)
    names = sorted(p.name for p in media.iterdir())
    assert "registry.tar.zst" in names and "registry.tar.gz" not in names
    assert run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=media).returncode == 0
    listing = run(["tar", "--zstd", "-tf", media / "registry.tar.zst"])
    assert listing.returncode == 0 and "registry/blobs/" in listing.stdout.split()


def test_arm64_media(tree, tmp_path):
    inputs = make_inputs(tmp_path / "arm64", arch="arm64")
    media = tmp_path / "media"
    result = make_media(inputs, tree, media)
    assert result.returncode == 0, describe(result)
    assert (media / "k3s").read_bytes()[18:20] == struct.pack("<H", ELF_MACHINES["arm64"])
    assert (media / "minimal-registry").read_bytes() == inputs.registry.read_bytes()
    assert "for linux/arm64, with" in (media / "README.txt").read_text()


@pytest.mark.parametrize("which", ["k3s", "minimal-registry"])
def test_wrong_architecture_is_refused_before_writing(inputs, tree, tmp_path, which):
    wrong = elf_file(tmp_path / f"{which}-arm64", "arm64")
    if which == "k3s":
        inputs.k3s = wrong
    else:
        inputs.registry = wrong
    media = tmp_path / "media"
    result = make_media(inputs, tree, media)
    assert result.returncode != 0
    assert f"{wrong} is arm64, not amd64" in result.stderr, result.stderr
    assert not media.exists()


def test_a_script_as_minimal_registry_needs_allow_script(inputs, tree, tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    args = [a for a in inputs.args() if a != "--allow-script"]
    args[args.index("-m") + 1] = script
    result = run([MAKE_MEDIA, "-o", tmp_path / "media", "-r", tree, *args], env=inputs.env())
    assert result.returncode == 1
    assert f"{script} is a script, not the one-file binary (--allow-script" in result.stderr
    assert not (tmp_path / "media").exists()


@pytest.mark.parametrize("flag", ["-k", "-i", "-m", "-r"])
def test_a_missing_input_is_named(inputs, tree, tmp_path, flag):
    missing = tmp_path / "no-such-file"
    args = [MAKE_MEDIA, "-o", tmp_path / "media", "-r", tree, *inputs.args()]
    args[args.index(flag) + 1] = missing
    result = run(args, env=inputs.env())
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and str(missing) in errors[0], result.stderr
    assert not (tmp_path / "media").exists()


def test_install_script_that_is_not_a_script_is_refused(inputs, tree, tmp_path):
    inputs.install_sh.write_text("<html>404 Not Found</html>\n")
    result = make_media(inputs, tree, tmp_path / "media")
    assert result.returncode == 1
    assert "is not a shell script" in result.stderr


def test_a_tree_that_fails_verify_is_refused(inputs, tree, tmp_path):
    blob = next(p for p in (tree / "blobs").iterdir() if p.stat().st_size > 100)
    with open(blob, "r+b") as handle:
        handle.truncate(10)
    result = make_media(inputs, tree, tmp_path / "media")
    assert result.returncode == 1, describe(result)
    assert "fails minimal-registry verify --fast" in result.stderr
    assert blob.name in result.stdout + result.stderr, "verify's report should name the blob"
    assert not (tmp_path / "media" / "registry.tar.gz").exists()


def test_not_enough_space_is_refused(inputs, tree, tmp_path):
    with small_tmpfs(tmp_path / "small") as small:
        result = make_media(inputs, tree, small)
        assert result.returncode == 1, describe(result)
        assert "not enough space on" in result.stderr and "MiB needed" in result.stderr
        assert list(small.iterdir()) == []



def test_not_enough_space_for_images_only_media_is_refused(inputs, tree, tmp_path):
    """Images-only media has no k3s: the space check still runs, on what it does carry."""
    with small_tmpfs(tmp_path / "small") as small:
        args = ["--images-only", "--arch", "amd64", "-m", inputs.registry]
        if inputs.registry.read_bytes()[:2] == b"#!":
            args.append("--allow-script")
        result = run([MAKE_MEDIA, "-o", small, "-r", tree, *args], env=inputs.env())
        assert result.returncode == 1, describe(result)
        errors = [line for line in result.stderr.splitlines() if not line.startswith(("[INFO]", "[WARN]"))]
        assert len(errors) == 1 and errors[0].startswith("[ERROR] not enough space on"), result.stderr
        assert list(small.iterdir()) == []


# ----- bundles --------------------------------------------------------------------------------

def test_bundle_is_copied_as_is(media, inputs, tmp_path):
    bundle = tmp_path / "bundle" / "registry.tar.gz"
    bundle.parent.mkdir()
    shutil.copyfile(media / "registry.tar.gz", bundle)
    other = tmp_path / "other"
    result = run([MAKE_MEDIA, "-o", other, "-b", bundle, *inputs.args()], env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert (other / "registry.tar.gz").read_bytes() == bundle.read_bytes()
    assert (other / "SHA256SUMS").read_bytes() == (media / "SHA256SUMS").read_bytes()


def test_truncated_bundle_is_refused(media, inputs, tmp_path):
    bundle = tmp_path / "registry.tar.gz"
    data = (media / "registry.tar.gz").read_bytes()
    bundle.write_bytes(data[: len(data) // 2])
    result = run([MAKE_MEDIA, "-o", tmp_path / "other", "-b", bundle, *inputs.args()], env=inputs.env())
    assert result.returncode == 1
    assert "is not a complete archive" in result.stderr


# ----- --download against a local release server ----------------------------------------------

class ReleaseHandler(http.server.SimpleHTTPRequestHandler):
    """Files from the directory; /channels/<name> redirects like update.k3s.io does."""

    def do_GET(self):
        if self.path.startswith("/channels/"):
            self.send_response(302)
            self.send_header("Location", "/releases/tag/" + K3S_VERSION.replace("+", "%2B"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@dataclass
class ReleaseServer:
    root: Path
    url: str
    requests: List[str]

    def env(self) -> dict:
        return {"K3S_RELEASE_URL": f"{self.url}/releases/download",
                "K3S_CHANNEL_URL": f"{self.url}/channels",
                "K3S_INSTALL_SCRIPT_URL": f"{self.url}/install.sh"}


@contextmanager
def release_server(root: Path) -> Iterator[ReleaseServer]:
    handler = lambda *a, **k: ReleaseHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ReleaseServer(root, f"http://127.0.0.1:{server.server_address[1]}", server.requests)
    finally:
        server.shutdown()
        server.server_close()


def publish_release(root: Path, inputs: Inputs, checksum: Optional[str] = None) -> None:
    """Lay out a K3s release as github.com serves it: releases/download/<version>/<file>."""
    release = root / "releases/download" / K3S_VERSION
    release.mkdir(parents=True, exist_ok=True)
    asset = "k3s" if inputs.arch == "amd64" else f"k3s-{inputs.arch}"
    shutil.copyfile(inputs.k3s, release / asset)
    digest = checksum or sha256_file(inputs.k3s)
    (release / f"sha256sum-{inputs.arch}.txt").write_text(
        f"{'0' * 64}  k3s-airgap-images-{inputs.arch}.tar.zst\n{digest}  {asset}\n")
    (root / "releases/tag").mkdir(parents=True, exist_ok=True)
    (root / "releases/tag" / K3S_VERSION).write_text("release page\n")
    shutil.copyfile(inputs.install_sh, root / "install.sh")


def download_args(inputs: Inputs, cache: Path, version: str = K3S_VERSION) -> List[str]:
    args = inputs.args()
    for flag in ("-k", "-i", "-v"):
        at = args.index(flag)
        del args[at:at + 2]
    return args + ["--download", "--cache", cache, "-v", version]


@pytest.mark.parametrize("version", [K3S_VERSION, "stable"])
def test_download_fetches_checks_and_caches(inputs, tree, tmp_path, version):
    site, cache, media = tmp_path / "site", tmp_path / "k3s-cache", tmp_path / "media"
    publish_release(site, inputs)
    with release_server(site) as server:
        result = run([MAKE_MEDIA, "-o", media, "-r", tree, *download_args(inputs, cache, version)],
                     env=inputs.env(server.env()))
        assert result.returncode == 0, describe(result)
        assert f"k3s {K3S_VERSION} amd64 matches sha256sum-amd64.txt" in result.stderr
        assert "/releases/download/v1.31.4%2Bk3s1/k3s" in server.requests
    assert (media / "k3s").read_bytes() == inputs.k3s.read_bytes()
    assert (media / "install.sh").read_bytes() == inputs.install_sh.read_bytes()
    assert (cache / K3S_VERSION / "amd64" / "k3s").is_file()
    assert K3S_VERSION in (media / "README.txt").read_text()
    # A second run needs no network: the cache holds checked files.
    again = run([MAKE_MEDIA, "-o", media, "-r", tree, *download_args(inputs, cache)],
                env=inputs.env({"K3S_RELEASE_URL": "http://127.0.0.1:9/nowhere",
                                "K3S_INSTALL_SCRIPT_URL": "http://127.0.0.1:9/nowhere"}))
    assert again.returncode == 0, describe(again)
    assert "nothing to do" in again.stderr


def test_download_with_a_wrong_checksum_fails_and_keeps_nothing(inputs, tree, tmp_path):
    site, cache, media = tmp_path / "site", tmp_path / "k3s-cache", tmp_path / "media"
    publish_release(site, inputs, checksum="ab" * 32)
    with release_server(site) as server:
        result = run([MAKE_MEDIA, "-o", media, "-r", tree, *download_args(inputs, cache)],
                     env=inputs.env(server.env()))
    assert result.returncode == 1, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and "checksum mismatch" in errors[0] and "ab" * 32 in errors[0], result.stderr
    assert not (cache / K3S_VERSION / "amd64" / "k3s").exists()
    assert not media.exists()


def test_download_of_a_missing_release_names_the_url(inputs, tree, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    with release_server(site) as server:
        result = run([MAKE_MEDIA, "-o", tmp_path / "media", "-r", tree,
                      *download_args(inputs, tmp_path / "cache")], env=inputs.env(server.env()))
    assert result.returncode == 1
    assert "download failed: " + server.url + "/releases/download/v1.31.4%2Bk3s1/sha256sum-amd64.txt" in result.stderr


# ----- install-node.sh ------------------------------------------------------------------------

def installed(root: Path) -> Dict[str, Path]:
    return {
        "binary": root / "usr/local/bin/minimal-registry",
        "unit": root / "etc/systemd/system/minimal-registry.service",
        "content": root / "var/lib/rancher/k3s/agent/registry",
        "registries": root / "etc/rancher/k3s/registries.yaml",
        "k3s": root / "usr/local/bin/k3s",
    }


def test_install_node_installs_everything_under_root(media, inputs, tree, tmp_path):
    root = tmp_path / "root"
    result = install_node(media, root, env=inputs.env(), passthrough=["--disable=traefik"])
    assert result.returncode == 0, describe(result)
    paths = installed(root)
    assert paths["binary"].read_bytes() == (media / "minimal-registry").read_bytes()
    assert paths["binary"].stat().st_mode & 0o777 == 0o755
    assert paths["unit"].read_bytes() == (media / "minimal-registry.service").read_bytes()
    assert paths["registries"].read_bytes() == (media / "registries.yaml").read_bytes()
    assert paths["k3s"].read_bytes() == inputs.k3s.read_bytes()
    tree_files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    assert sorted(str(p.relative_to(paths["content"])) for p in paths["content"].rglob("*")) == tree_files
    wants = root / "etc/systemd/system/multi-user.target.wants/minimal-registry.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/minimal-registry.service"
    assert (root / "etc/systemd/system/k3s.service.wants/minimal-registry.service").is_symlink()
    record = read_record(inputs.record)
    assert record["args"] == ["server", "--system-default-registry", "bootstrap-registry.airgap",
                              "--disable=traefik"]
    assert "INSTALL_K3S_SKIP_DOWNLOAD=true" in record["env"]
    assert "INSTALL_K3S_SKIP_START=true" in record["env"]
    assert "INSTALL_K3S_SKIP_ENABLE=true" in record["env"]
    assert f"INSTALL_K3S_BIN_DIR={root}/usr/local/bin" in record["env"]
    assert f"INSTALL_K3S_SYSTEMD_DIR={root}/etc/systemd/system" in record["env"]
    leftovers = [p.name for p in (root / "var/lib/rancher/k3s/agent").iterdir() if p.name.startswith(".registry.")]
    assert leftovers == [".registry.sha256"]


def test_install_node_second_run_changes_nothing(media, inputs, tmp_path):
    root = tmp_path / "root"
    assert install_node(media, root, env=inputs.env()).returncode == 0
    before = file_states(root)
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert "nothing to do" in result.stderr
    assert file_states(root) == before


@pytest.mark.parametrize("name", ["registry.tar.gz", "k3s", "minimal-registry", "install.sh"])
def test_install_node_refuses_a_corrupt_file_before_installing_anything(media, inputs, tmp_path, name):
    path = media / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    root = tmp_path / "root"
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 1, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and f"{name} on the media is corrupt" in errors[0], result.stderr
    assert list(root.rglob("*")) == [], "something was installed from corrupt media"
    assert not inputs.record.exists()


def test_install_node_refuses_media_with_a_file_missing(media, inputs, tmp_path):
    (media / "minimal-registry.service").unlink()
    root = tmp_path / "root"
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 1
    assert "minimal-registry.service is listed in SHA256SUMS but missing" in result.stderr
    assert list(root.rglob("*")) == []


def test_install_node_refuses_a_tree_that_fails_verify(inputs, tree, tmp_path):
    """A tree broken before packing (so SHA256SUMS matches) still never reaches the node."""
    media = tmp_path / "media"
    assert make_media(inputs, tree, media).returncode == 0
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    run(["tar", "-xzf", media / "registry.tar.gz", "-C", unpacked])
    blob = next(p for p in (unpacked / "registry/blobs").iterdir() if p.stat().st_size > 100)
    blob.unlink()
    archive = media / "registry.tar.gz"
    packed = run(["sh", "-c", f"tar -C '{unpacked}' -cf - registry | gzip -n > '{archive}'"])
    assert packed.returncode == 0
    sums = (media / "SHA256SUMS").read_text().splitlines()
    (media / "SHA256SUMS").write_text("".join(
        f"{sha256_file(archive)}  registry.tar.gz\n" if line.endswith(" registry.tar.gz") else line + "\n"
        for line in sums))
    root = tmp_path / "root"
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 1, describe(result)
    assert "does not import cleanly (see above); nothing was installed" in result.stderr
    assert not installed(root)["binary"].exists() and not installed(root)["content"].exists()
    agent = root / "var/lib/rancher/k3s/agent"
    assert [p.name for p in agent.iterdir()] == [], "the unpacked tree was left behind"


def test_install_node_merges_new_media_into_the_content(media, inputs, tree, tmp_path):
    root = tmp_path / "root"
    assert install_node(media, root, env=inputs.env()).returncode == 0
    TreeBuilder(tree).image("extra/image", "v2", files={"new.txt": b"new\n"})
    assert make_media(inputs, tree, media).returncode == 0
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    content = installed(root)["content"]
    assert (content / "extra/image/manifests/v2").exists()
    assert "added extra/image:v2" in result.stderr
    assert "merged registry.tar.gz into /var/lib/rancher/k3s/agent/registry: 1 added, 0 re-pointed" in result.stderr
    assert "installed /usr/local/bin/minimal-registry" not in result.stderr
    assert sorted(p.name for p in content.parent.iterdir()) == [".registry.sha256", "registry"]


def node_tags(content: Path) -> Dict[str, str]:
    tags = {}
    for tag in content.rglob("manifests/*"):
        if not tag.name.startswith("sha256:") and tag.is_symlink():
            tags[f"{tag.parent.parent.relative_to(content)}:{tag.name}"] = os.readlink(tag)
    return tags


@pytest.fixture
def two_media(inputs, tmp_path):
    """Media A (pause, app) and media B (pause re-built, dns): B lacks the app, moves pause."""
    first = TreeBuilder(tmp_path / "a" / "registry")
    old_pause = first.image("rancher/mirrored-pause", "3.6", files={"pause": b"a\n"})
    app = first.image("example/app", "1.0", files={"app": b"operator's own\n"})
    second = TreeBuilder(tmp_path / "b" / "registry")
    new_pause = second.image("rancher/mirrored-pause", "3.6", files={"pause": b"b\n"})
    dns = second.image("rancher/mirrored-coredns-coredns", "1.11.3", files={"dns": b"b\n"})
    media_a, media_b = tmp_path / "media-a", tmp_path / "media-b"
    for tree, media in ((first.root, media_a), (second.root, media_b)):
        made = make_media(inputs, tree, media)
        assert made.returncode == 0, describe(made)
    return media_a, media_b, old_pause, new_pause, app, dns


def test_install_node_merge_keeps_what_the_media_lacks_and_lists_a_moved_tag(two_media, inputs, tmp_path):
    media_a, media_b, old_pause, new_pause, app, dns = two_media
    root = tmp_path / "root"
    assert install_node(media_a, root, env=inputs.env()).returncode == 0
    result = install_node(media_b, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert (f"re-pointed rancher/mirrored-pause:3.6: {old_pause.digest} -> {new_pause.digest}"
            in result.stderr), result.stderr
    assert "added rancher/mirrored-coredns-coredns:1.11.3" in result.stderr
    content = installed(root)["content"]
    assert node_tags(content) == {"rancher/mirrored-pause:3.6": new_pause.digest, "example/app:1.0": app.digest,
                                  "rancher/mirrored-coredns-coredns:1.11.3": dns.digest}
    assert run([inputs.tool, "verify", "-q", "-d", content]).returncode == 0


def test_install_node_replace_lists_what_it_deletes_first(two_media, inputs, tmp_path):
    media_a, media_b, old_pause, new_pause, app, dns = two_media
    root = tmp_path / "root"
    assert install_node(media_a, root, env=inputs.env()).returncode == 0
    result = install_node(media_b, root, "--replace", env=inputs.env())
    assert result.returncode == 0, describe(result)
    lines = result.stderr.splitlines()
    warning = next(i for i, line in enumerate(lines) if "--replace deletes these 1 images" in line)
    assert lines[warning + 1].strip() == "[WARN]    example/app:1.0"
    installed_at = next(i for i, line in enumerate(lines) if "installed /var/lib/rancher/k3s/agent/registry" in line)
    assert warning < installed_at
    assert node_tags(installed(root)["content"]) == {"rancher/mirrored-pause:3.6": new_pause.digest,
                                                     "rancher/mirrored-coredns-coredns:1.11.3": dns.digest}


def test_install_node_rerun_on_an_intact_node_checks_the_tree_and_changes_nothing(media, inputs, tmp_path):
    root = tmp_path / "root"
    assert install_node(media, root, env=inputs.env()).returncode == 0
    before = file_states(root)
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert "checking the installed content tree" in result.stderr
    assert "content tree intact" in result.stderr and "nothing to do" in result.stderr
    assert file_states(root) == before


def test_install_node_repairs_a_node_whose_tree_lost_a_blob(media, inputs, tree, tmp_path):
    root = tmp_path / "root"
    assert install_node(media, root, env=inputs.env()).returncode == 0
    content = installed(root)["content"]
    lost = sorted((content / "blobs").iterdir())[0]
    lost.unlink()
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert "the installed content tree is damaged" in result.stderr
    assert f"repaired: /var/lib/rancher/k3s/agent/registry/blobs/{lost.name}" in result.stderr, result.stderr
    assert "nothing to do" not in result.stderr
    assert lost.exists()
    assert run([inputs.tool, "verify", "-q", "-d", content]).returncode == 0


def test_install_node_repairs_a_blob_damaged_in_place(media, inputs, tree, tmp_path):
    """Same size, other bytes (issue 8 item 11): relies on `import` re-hashing existing blobs."""
    root = tmp_path / "root"
    assert install_node(media, root, env=inputs.env()).returncode == 0
    content = installed(root)["content"]
    damaged = sorted((content / "blobs").iterdir())[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert f"repaired: /var/lib/rancher/k3s/agent/registry/blobs/{damaged.name}" in result.stderr, result.stderr
    assert run([inputs.tool, "verify", "-q", "-d", content]).returncode == 0


def test_install_node_checks_free_space_before_unpacking(media, inputs, tmp_path):
    root = tmp_path / "root"
    agent = root / "var/lib/rancher/k3s/agent"
    agent.mkdir(parents=True)
    mounted = run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", agent])
    if mounted.returncode != 0:
        pytest.fail(f"this test mounts a 64 KiB tmpfs and needs root: {mounted.stderr}", pytrace=False)
    try:
        result = install_node(media, root, env=inputs.env())
        assert result.returncode == 1, describe(result)
        errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
        assert len(errors) == 1 and "not enough space in /var/lib/rancher/k3s/agent" in errors[0], result.stderr
        assert "MiB unpacked" in errors[0]
        assert list(agent.iterdir()) == []
        assert not installed(root)["binary"].exists()
    finally:
        run(["umount", agent])


def test_install_node_keeps_an_existing_registries_yaml_unless_forced(media, inputs, tmp_path):
    root = tmp_path / "root"
    mine = installed(root)["registries"]
    mine.parent.mkdir(parents=True)
    mine.write_text("mirrors:\n  docker.io:\n    endpoint:\n      - \"https://mirror.example\"\n")
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert "keeping the existing /etc/rancher/k3s/registries.yaml" in result.stderr
    assert "mirror.example" in mine.read_text()
    forced = install_node(media, root, "--force", env=inputs.env())
    assert forced.returncode == 0, describe(forced)
    assert mine.read_bytes() == (media / "registries.yaml").read_bytes()
    assert "mirror.example" in (mine.parent / "registries.yaml.bak").read_text()


def test_install_node_agent_passes_server_and_token(media, inputs, tmp_path):
    root = tmp_path / "root"
    no_url = install_node(media, root, "--agent", env=inputs.env())
    assert no_url.returncode == 1 and "K3S_URL" in no_url.stderr
    assert list(root.rglob("*")) == []
    env = inputs.env({"K3S_URL": "https://10.0.0.1:6443", "K3S_TOKEN": "secret"})
    result = install_node(media, root, "--agent", env=env, passthrough=["--node-label=a=b"])
    assert result.returncode == 0, describe(result)
    record = read_record(inputs.record)
    # `k3s agent` has no --system-default-registry: agents take it from their server.
    assert record["args"] == ["agent", "--node-label=a=b"]
    assert "K3S_URL=https://10.0.0.1:6443" in record["env"] and "K3S_TOKEN=secret" in record["env"]


def test_install_node_does_not_repeat_a_given_system_default_registry(media, inputs, tmp_path):
    result = install_node(media, tmp_path / "root", env=inputs.env(),
                          passthrough=["server", "--system-default-registry=registry.local"])
    assert result.returncode == 0, describe(result)
    assert read_record(inputs.record)["args"] == ["server", "--system-default-registry=registry.local"]


def test_install_node_skip_k3s_runs_no_installer(media, inputs, tmp_path):
    root = tmp_path / "root"
    result = install_node(media, root, "--skip-k3s", env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert not inputs.record.exists() and not installed(root)["k3s"].exists()
    assert installed(root)["binary"].exists()


def test_install_node_dummy_route_installs_a_boot_unit(media, inputs, tmp_path):
    root = tmp_path / "root"
    result = install_node(media, root, "--dummy-route", env=inputs.env())
    assert result.returncode == 0, describe(result)
    unit = root / "etc/systemd/system/airgap-default-route.service"
    text = unit.read_text()
    assert "Before=k3s.service k3s-agent.service" in text
    assert "169.254.255.255 dev dummy0" in text
    assert (root / "etc/systemd/system/multi-user.target.wants/airgap-default-route.service").is_symlink()
    # systemd accepts both installed units (verify looks for their commands inside the root).
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is not installed (CI: apt-get install systemd)", pytrace=False)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir()
    shutil.copy("/bin/sh", root / "bin/sh")
    verify = run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                  "airgap-default-route.service", "minimal-registry.service"])
    assert verify.returncode == 0 and verify.stderr.strip() == "", describe(verify)


def test_install_node_unzstd_media(media, inputs, tree, tmp_path):
    assert make_media(inputs, tree, media, "--zstd").returncode == 0
    root = tmp_path / "root"
    result = install_node(media, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert (installed(root)["content"] / "blobs").is_dir()


# ----- media for several architectures, and images-only media ---------------------------------

def two_arch_media(tmp_path: Path, tree: Path) -> tuple:
    amd64, arm64 = make_inputs(tmp_path / "amd64"), make_inputs(tmp_path / "arm64", arch="arm64")
    media = tmp_path / "media-both"
    args = ["--arch", "amd64,arm64", "-k", amd64.k3s, "-k", arm64.k3s, "-m", arm64.registry,
            "-m", amd64.registry, "-i", amd64.install_sh, "-v", K3S_VERSION]
    if amd64.registry.read_bytes()[:2] == b"#!":
        args.append("--allow-script")
    result = run([MAKE_MEDIA, "-o", media, "-r", tree, *args], env=amd64.env())
    assert result.returncode == 0, describe(result)
    return media, amd64, arm64


def test_media_for_two_architectures_holds_both_under_release_names(tree, tmp_path):
    media, amd64, arm64 = two_arch_media(tmp_path, tree)
    assert sorted(p.name for p in media.iterdir()) == sorted([
        "README.txt", "SHA256SUMS", "install-node.sh", "install.sh", "k3s", "k3s-arm64",
        "minimal-registry-linux-amd64", "minimal-registry-linux-arm64", "minimal-registry.service",
        "registries.yaml", "registry.tar.gz"])
    assert (media / "k3s").read_bytes() == amd64.k3s.read_bytes()
    assert (media / "k3s-arm64").read_bytes() == arm64.k3s.read_bytes()
    assert (media / "minimal-registry-linux-arm64").read_bytes() == arm64.registry.read_bytes()
    assert (media / "minimal-registry-linux-amd64").read_bytes() == amd64.registry.read_bytes()
    checked = run(["sha256sum", "-c", "SHA256SUMS"], cwd=media)
    assert checked.returncode == 0, describe(checked)
    assert len(checked.stdout.splitlines()) == 10
    assert "for linux/amd64, linux/arm64, with" in (media / "README.txt").read_text()


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_install_node_picks_its_architecture_from_media_for_both(tree, tmp_path, arch):
    media, amd64, arm64 = two_arch_media(tmp_path, tree)
    chosen = {"amd64": amd64, "arm64": arm64}[arch]
    root = tmp_path / "root"
    env = amd64.env({"INSTALL_NODE_ARCH": {"amd64": "x86_64", "arm64": "aarch64"}[arch]})
    result = install_node(media, root, env=env)
    assert result.returncode == 0, describe(result)
    paths = installed(root)
    assert paths["k3s"].read_bytes() == chosen.k3s.read_bytes()
    assert paths["binary"].read_bytes() == chosen.registry.read_bytes()
    assert (paths["content"] / "blobs").is_dir()


def test_install_node_refuses_an_architecture_the_media_lacks(tree, tmp_path):
    media, amd64, _ = two_arch_media(tmp_path, tree)
    root = tmp_path / "root"
    result = install_node(media, root, env=amd64.env({"INSTALL_NODE_ARCH": "riscv64"}))
    assert result.returncode == 1, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and "this node is riscv64 and the media holds only amd64 arm64" in errors[0]
    assert list(root.rglob("*")) == []


def test_single_architecture_media_written_over_two_architecture_media_leaves_no_stale_file(tree, tmp_path):
    media, amd64, _ = two_arch_media(tmp_path, tree)
    result = make_media(amd64, tree, media)
    assert result.returncode == 0, describe(result)
    assert sorted(p.name for p in media.iterdir()) == sorted(MEDIA_FILES)


def images_only_media(tmp_path: Path, tree: Path, registry: Path, inputs: Inputs) -> Path:
    media = tmp_path / "images-only"
    args = ["--images-only", "--arch", "amd64", "-m", registry]
    if registry.read_bytes()[:2] == b"#!":
        args.append("--allow-script")
    result = run([MAKE_MEDIA, "-o", media, "-r", tree, *args], env=inputs.env())
    assert result.returncode == 0, describe(result)
    return media


def test_images_only_media_holds_no_k3s(inputs, tree, tmp_path):
    media = images_only_media(tmp_path, tree, inputs.registry, inputs)
    assert sorted(p.name for p in media.iterdir()) == [
        "README.txt", "SHA256SUMS", "install-node.sh", "minimal-registry", "registry.tar.gz"]
    assert run(["sha256sum", "-c", "SHA256SUMS"], cwd=media).returncode == 0
    assert "Nothing of K3s is on it" in (media / "README.txt").read_text()


def test_images_only_media_merges_images_and_touches_nothing_of_k3s(media, inputs, tmp_path):
    root = tmp_path / "root"
    assert install_node(media, root, env=inputs.env()).returncode == 0
    inputs.record.unlink()
    app_tree = TreeBuilder(tmp_path / "app" / "registry")
    app = app_tree.image("example/app", "2.0", files={"app": b"application\n"})
    newer = tmp_path / "minimal-registry-newer"
    newer.write_bytes(inputs.registry.read_bytes() + b"# a newer build\n")
    newer.chmod(0o755)
    images = images_only_media(tmp_path, app_tree.root, newer, inputs)
    paths = installed(root)
    untouched = {name: paths[name].read_bytes() for name in ("unit", "registries", "k3s", "binary")}

    result = install_node(images, root, env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert "added example/app:2.0" in result.stderr
    assert "K3s, install.sh, registries.yaml and the units not touched" in result.stderr
    assert "minimal-registry not touched (--registry installs it)" in result.stderr
    assert not inputs.record.exists(), "install.sh ran from images-only media"
    assert {name: paths[name].read_bytes() for name in untouched} == untouched
    assert os.readlink(paths["content"] / "example/app/manifests/2.0") == app.digest
    assert (paths["content"] / "rancher/mirrored-pause/manifests/3.6").exists(), "the system images stay"

    upgraded = install_node(images, root, "--registry", env=inputs.env())
    assert upgraded.returncode == 0, describe(upgraded)
    assert paths["binary"].read_bytes() == newer.read_bytes()
    assert "installed /usr/local/bin/minimal-registry" in upgraded.stderr
    assert not inputs.record.exists()


def test_download_for_two_architectures_fetches_both_k3s(tree, tmp_path):
    amd64, arm64 = make_inputs(tmp_path / "amd64"), make_inputs(tmp_path / "arm64", arch="arm64")
    site, cache, media = tmp_path / "site", tmp_path / "k3s-cache", tmp_path / "media"
    publish_release(site, amd64)
    publish_release(site, arm64)
    args = ["--arch", "amd64,arm64", "-m", amd64.registry, "-m", arm64.registry, "--download",
            "--cache", cache, "-v", K3S_VERSION]
    if amd64.registry.read_bytes()[:2] == b"#!":
        args.append("--allow-script")
    with release_server(site) as server:
        result = run([MAKE_MEDIA, "-o", media, "-r", tree, *args], env=amd64.env(server.env()))
        assert result.returncode == 0, describe(result)
    for arch in ("amd64", "arm64"):
        assert f"k3s {K3S_VERSION} {arch} matches sha256sum-{arch}.txt" in result.stderr
    assert (media / "k3s").read_bytes() == amd64.k3s.read_bytes()
    assert (media / "k3s-arm64").read_bytes() == arm64.k3s.read_bytes()
    assert run(["sha256sum", "-c", "SHA256SUMS"], cwd=media).returncode == 0


def test_images_only_media_for_two_architectures_installs_on_each(tree, tmp_path):
    amd64, arm64 = make_inputs(tmp_path / "amd64"), make_inputs(tmp_path / "arm64", arch="arm64")
    media = tmp_path / "images-both"
    args = ["--images-only", "--arch", "amd64,arm64", "-m", amd64.registry, "-m", arm64.registry]
    if amd64.registry.read_bytes()[:2] == b"#!":
        args.append("--allow-script")
    result = run([MAKE_MEDIA, "-o", media, "-r", tree, *args], env=amd64.env())
    assert result.returncode == 0, describe(result)
    assert sorted(p.name for p in media.iterdir()) == [
        "README.txt", "SHA256SUMS", "install-node.sh", "minimal-registry-linux-amd64",
        "minimal-registry-linux-arm64", "registry.tar.gz"]
    for arch, machine in (("amd64", "x86_64"), ("arm64", "aarch64")):
        root = tmp_path / f"root-{arch}"
        installed_here = install_node(media, root, "--registry", env=amd64.env({"INSTALL_NODE_ARCH": machine}))
        assert installed_here.returncode == 0, describe(installed_here)
        chosen = {"amd64": amd64, "arm64": arm64}[arch]
        assert installed(root)["binary"].read_bytes() == chosen.registry.read_bytes()
        assert not installed(root)["k3s"].exists() and not installed(root)["unit"].exists()
