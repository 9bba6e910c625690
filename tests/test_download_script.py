"""scripts/download-system-images.sh end to end, against a local registry standing in for the
internet: our own server on 127.0.0.1 serving images built by `imagetree`, named like
`127.0.0.1:PORT/rancher/mirrored-pause:3.6` in a local k3s-images.txt, pulled with skopeo."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import clients
import imagetree
from serverproc import PROJECT_ROOT, command_env, registry_command, running_registry
from contentsupport import snapshot

SCRIPT = PROJECT_ROOT / "scripts" / "download-system-images.sh"
SUMMARY_RE = re.compile(r"summary: pulled (\d+), skipped (\d+), failed (\d+)")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    tree = imagetree.build_standard_tree(tmp_path_factory.mktemp("upstream") / "registry", with_big=False)
    with running_registry(tree.root) as registry:
        yield tree, registry


@pytest.fixture
def lists(tmp_path, upstream):
    tree, registry = upstream
    host = registry.host_port
    k3s_images = tmp_path / "k3s-images.txt"
    k3s_images.write_text(f"{host}/{tree.multiarch.name}:{tree.multiarch.tag}\n"
                          f"{host}/{tree.docker_list.name}:{tree.docker_list.tag}\n")
    extra = tmp_path / "extra-images.txt"
    extra.write_text(f"# our own images\n{host}/{tree.hello.name}:{tree.hello.tag}\n")
    return k3s_images, extra


def run_script(tmp_path, registry, *args, env=None, prefix=()):
    environment = command_env({
        "MINIMAL_REGISTRY_CMD": " ".join(registry_command()),
        "PLAIN_HTTP_REGISTRIES": registry.host_port,
        "RETRY_DELAY": "0",
        "PULL_RETRIES": "2",
        "TMPDIR": str(tmp_path),
        **(env or {}),
    })
    tool = [] if "--tool" in args else ["--tool", "skopeo"]
    done = subprocess.run([*prefix, "bash", str(SCRIPT), *tool, *args], capture_output=True, text=True,
                          env=environment, timeout=180, stdin=subprocess.DEVNULL)
    match = SUMMARY_RE.search(done.stderr)
    counts = tuple(int(n) for n in match.groups()) if match else None
    return done, counts


def tag_digest(root: Path, repository: str, tag: str) -> str:
    return os.readlink(root / repository / "manifests" / tag)


def manifests_in(root: Path, repository: str):
    return set(os.listdir(root / repository / "manifests"))


def blob_requests(log: str):
    return [line for line in log.splitlines() if "/blobs/sha256:" in line]


def test_one_platform_keeps_upstream_digests_and_a_second_run_pulls_nothing(tmp_path, upstream, lists):
    tree, registry = upstream
    k3s_images, extra = lists
    target = tmp_path / "media" / "registry"

    done, counts = run_script(tmp_path, registry, "-l", str(k3s_images), "-f", str(extra), "-d", str(target),
                              "-p", "linux/arm64")

    assert done.returncode == 0, done.stderr
    assert counts == (3, 0, 0)
    for index in (tree.multiarch, tree.docker_list):
        assert tag_digest(target, index.name, index.tag) == index.digest  # the upstream index
        stored = manifests_in(target, index.name)
        arm64 = [c for c in index.children if c.platform.startswith("linux/arm64")][0]
        assert arm64.digest in stored and index.child("linux/amd64").digest not in stored
    assert tag_digest(target, tree.hello.name, tree.hello.tag) == tree.hello.digest
    registries = (target.parent / "registries.yaml").read_text()
    assert '"bootstrap-registry.airgap":\n    endpoint:\n      - "http://127.0.0.1:9080"' in registries
    assert registry.host_port not in registries
    verified = subprocess.run(registry_command() + ["verify", "-d", str(target)], capture_output=True,
                              text=True, env=command_env())
    assert verified.returncode == 0, verified.stdout

    before, mark = snapshot(target.parent), len(registry.log())
    again, counts = run_script(tmp_path, registry, "-l", str(k3s_images), "-f", str(extra), "-d", str(target),
                               "-p", "linux/arm64")
    assert again.returncode == 0, again.stderr
    assert counts == (0, 3, 0)
    assert snapshot(target.parent) == before
    assert blob_requests(registry.log()[mark:]) == []
    assert not list(tmp_path.glob("download-system-images.*")), "temporary directory left behind"


def test_two_platforms_widen_a_one_platform_tree_and_containerd_pulls_it(tmp_path, upstream, lists, containerd):
    tree, registry = upstream
    k3s_images, _ = lists
    target = tmp_path / "registry"
    assert run_script(tmp_path, registry, "-l", str(k3s_images), "-d", str(target), "-p", "linux/arm64")[1] == (2, 0, 0)

    done, counts = run_script(tmp_path, registry, "-l", str(k3s_images), "-d", str(target),
                              "-p", "linux/amd64,linux/arm64")

    assert done.returncode == 0, done.stderr
    assert counts == (2, 0, 0)
    for index in (tree.multiarch, tree.docker_list):
        assert {c.digest for c in index.children} <= manifests_in(target, index.name)
    with running_registry(target) as node_registry:
        certs_d = tmp_path / "certs.d"
        clients.write_hosts_toml(certs_d, clients.MIRRORED_HOST, node_registry.url)
        for index in (tree.multiarch, tree.docker_list):
            reference = f"{clients.MIRRORED_HOST}/{index.name}:{index.tag}"
            pulled = containerd.pull(reference, certs_d, platform="linux/amd64")
            assert pulled.ok and not pulled.problems(), str(pulled)
            assert containerd.images()[reference][1] == index.digest
            amd64 = index.child("linux/amd64")
            assert containerd.read_files(reference, "linux/amd64", amd64.files) == amd64.files


def test_all_platforms_with_no_trim_keeps_the_domain_and_mirrors_it(tmp_path, upstream, lists):
    tree, registry = upstream
    k3s_images, _ = lists
    target = tmp_path / "registry"

    done, counts = run_script(tmp_path, registry, "-l", str(k3s_images), "-d", str(target), "-p", "all", "-n")

    assert done.returncode == 0, done.stderr
    assert counts == (2, 0, 0)
    for index in (tree.multiarch, tree.docker_list):
        repository = f"{registry.host_port}/{index.name}"
        assert tag_digest(target, repository, index.tag) == index.digest
        assert {c.digest for c in index.children} <= manifests_in(target, repository)
    assert not (target / "rancher").exists()
    registries = (tmp_path / "registries.yaml").read_text()
    assert f'"{registry.host_port}":\n    endpoint:\n      - "http://127.0.0.1:9080"' in registries
    assert '"bootstrap-registry.airgap"' in registries


def test_a_missing_image_fails_the_run_and_is_named(tmp_path, upstream, lists):
    tree, registry = upstream
    k3s_images, _ = lists
    missing = f"{registry.host_port}/rancher/not-published:v9"
    extra = tmp_path / "extra.txt"
    extra.write_text(missing + "\n")
    target = tmp_path / "registry"

    done, counts = run_script(tmp_path, registry, "-l", str(k3s_images), "-f", str(extra), "-d", str(target))

    assert done.returncode == 1
    assert counts == (2, 0, 1), done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("[WARN]  failed:")]
    assert len(failed) == 1 and missing in failed[0]
    assert tag_digest(target, tree.multiarch.name, tree.multiarch.tag) == tree.multiarch.digest


def test_help_documents_every_flag_and_variable_and_bad_arguments_exit_2(tmp_path, upstream):
    _, registry = upstream
    done, _ = run_script(tmp_path, registry, "-h")
    assert done.returncode == 0
    for word in ("-v, --version", "-d, --directory", "-f, --file", "-l, --list", "-p, --platform", "-n, --no-trim",
                 "-s, --skip-k3s", "--tool", "-h, --help", "K3S_RELEASE_URL", "K3S_CHANNEL_URL",
                 "MINIMAL_REGISTRY_CMD", "REGISTRY_ENDPOINT", "PLAIN_HTTP_REGISTRIES", "PULL_RETRIES",
                 "RETRY_DELAY", "TMPDIR"):
        assert word in done.stdout, word
    for bad in (["--bogus"], ["-p", "linux"], ["-l", str(tmp_path / "absent.txt")], ["--tool", "docker"]):
        refused, _ = run_script(tmp_path, registry, *bad)
        assert refused.returncode == 2, (bad, refused.stderr)
        assert "[ERROR]" in refused.stderr


def test_the_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck not installed: apt-get install shellcheck", pytrace=False)
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


FAKE_CRANE = r"""#!/usr/bin/env bash
# A stand-in for crane's documented CLI (`crane manifest`, `crane pull --format=oci
# [--platform=P]`), done with skopeo, so the script's crane path runs where crane is not
# installed. Every call is logged for the test to read.
set -o errexit -o nounset -o pipefail
echo "crane $*" >>"${FAKE_CRANE_LOG}"
command="$1"; shift
tls=(); platform=""; format=""; args=()
for arg in "$@"; do
  case "${arg}" in
    --insecure) tls=(--tls-verify=false) ;;
    --platform=*) platform="${arg#--platform=}" ;;
    --format=*) format="${arg#--format=}" ;;
    *) args+=("${arg}") ;;
  esac
done
case "${command}" in
  manifest) exec skopeo inspect --raw "${tls[@]}" "docker://${args[0]}" ;;
  pull)
    [[ "${format}" == oci ]] || { echo "fake crane: only --format=oci" >&2; exit 2; }
    src_tls=("${tls[@]/--tls-verify/--src-tls-verify}")
    if [[ -z "${platform}" ]]; then
      exec skopeo --insecure-policy copy --quiet --all "${src_tls[@]}" "docker://${args[0]}" "oci:${args[1]}"
    fi
    IFS=/ read -r os arch variant <<<"${platform}"
    exec skopeo --insecure-policy --override-os "${os}" --override-arch "${arch}" \
      ${variant:+--override-variant "${variant}"} copy --quiet "${src_tls[@]}" "docker://${args[0]}" "oci:${args[1]}" ;;
  *) echo "fake crane: unknown command ${command}" >&2; exit 2 ;;
esac
"""


def test_the_crane_path_uses_crane_manifest_and_pull_per_platform(tmp_path, upstream):
    """crane is not installable here: a stand-in with crane's CLI checks the script's calls.
    OCI images only: the stand-in's skopeo `oci:` would convert Docker manifests, crane does not."""
    tree, registry = upstream
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crane").write_text(FAKE_CRANE)
    (bin_dir / "crane").chmod(0o755)
    calls = tmp_path / "crane.log"
    images = tmp_path / "k3s-images.txt"
    images.write_text(f"{registry.host_port}/{tree.multiarch.name}:{tree.multiarch.tag}\n")
    target = tmp_path / "registry"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CRANE_LOG": str(calls)}

    done, counts = run_script(tmp_path, registry, "--tool", "crane", "-l", str(images), "-d", str(target),
                              "-p", "linux/amd64,linux/arm64", env=env)

    assert done.returncode == 0, done.stderr
    assert counts == (1, 0, 0)
    assert tag_digest(target, tree.multiarch.name, tree.multiarch.tag) == tree.multiarch.digest
    assert {c.digest for c in tree.multiarch.children} <= manifests_in(target, tree.multiarch.name)
    log = calls.read_text().splitlines()
    reference = f"{registry.host_port}/{tree.multiarch.name}:{tree.multiarch.tag}"
    assert log[0] == f"crane manifest --insecure {reference}"
    assert [line.split(" --platform=")[1].split()[0] for line in log[1:]] == ["linux/amd64", "linux/arm64"]
    assert all(line.startswith("crane pull --insecure --format=oci") for line in log[1:])


@pytest.mark.parametrize("no_trim", [False, True], ids=["trimmed", "no-trim"])
def test_docker_hub_spellings_of_one_image_are_filed_as_minimal_registry_reads_them(tmp_path, upstream, no_trim):
    """`hello`, `docker.io/library/hello:latest` and `hello@sha256:...` name one Docker Hub
    image: it is filed once, under library/hello (docker.io/library/hello with -n), as
    `minimal-registry import` files a docker-save archive's `hello:latest`. skopeo reaches
    "docker.io" at the local upstream through a registries.conf bound over the system one in
    a private mount namespace (skopeo has no flag for it)."""
    tree, registry = upstream
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nprefix = "docker.io"\nlocation = "{registry.host_port}"\ninsecure = true\n')
    images = tmp_path / "images.txt"
    images.write_text(f"hello\ndocker.io/library/hello:latest\nhello@{tree.hello.digest}\n")
    target = tmp_path / "registry"

    in_namespace = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/containers/registries.conf && exec "$@"',
                    str(conf)]
    done, counts = run_script(tmp_path, registry, "-s", "-f", str(images), "-d", str(target),
                              *(["-n"] if no_trim else []), prefix=in_namespace)

    assert done.returncode == 0, done.stderr
    assert counts == (1, 2, 0), done.stderr
    repository = "docker.io/library/hello" if no_trim else "library/hello"
    assert tag_digest(target, repository, "latest") == tree.hello.digest
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == sorted([repository.split("/")[0], "blobs"])
    registries = (tmp_path / "registries.yaml").read_text()
    assert ('"docker.io":' in registries) == no_trim


def test_a_reference_minimal_registry_cannot_read_is_refused_before_pulling(tmp_path, upstream):
    tree, registry = upstream
    images = tmp_path / "images.txt"
    images.write_text(f"{registry.host_port}/{tree.hello.name}:{tree.hello.tag}\n{registry.host_port}/Upper/Case:1\n")
    target = tmp_path / "registry"

    done, counts = run_script(tmp_path, registry, "-s", "-f", str(images), "-d", str(target))

    assert done.returncode == 2, done.stderr
    assert counts is None
    assert "Upper/Case" in done.stderr and "[ERROR]" in done.stderr
    assert not target.exists() or not any(target.iterdir())
