"""make-airgap-media.sh and install-node.sh given awkward arguments and inputs: each is refused
up front with one `[ERROR]` line naming the problem (exit 1, nothing written), or handled.

The scripts are driven as in test_media.py (mediasupport.py's helpers: real ELF stand-ins for k3s, a
recording install.sh, --root for the node).
"""

import os
import shutil
from pathlib import Path

import pytest

from mediasupport import describe, inputs, install_node, make_media, media, run, tree  # noqa: F401 (fixtures)

MAKE_ARGS_WITHOUT_OUT = ("-r", "-k", "-i", "-m", "-y", "-b")


def error_lines(result) -> list:
    return [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]


def assert_refused(result, *fragments: str) -> str:
    assert result.returncode == 1, describe(result)
    errors = error_lines(result)
    assert len(errors) == 1, describe(result)
    other = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith(("[ERROR]", "[INFO]", "[WARN]"))]
    assert not other, f"output that is not ours:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


# ----- make-airgap-media.sh -------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tree", "media"])
def test_a_newline_in_a_path_is_refused_before_anything_is_written(inputs, tree, tmp_path, which):
    media = tmp_path / "media"
    if which == "tree":
        odd = tmp_path / "src" / "reg\nistry"
        shutil.copytree(tree, odd, symlinks=True)
        tree = odd
    else:
        media = tmp_path / "me\ndia"
    result = make_media(inputs, tree, media)
    assert_refused(result, "newline")
    assert not media.exists()


@pytest.mark.parametrize("flag", ["-o", "-r", "-m", "-k"])
def test_an_option_where_a_value_belongs_is_named(inputs, tree, tmp_path, flag):
    args = {"-o": str(tmp_path / "media"), "-r": str(tree)}
    args[flag] = "-x"
    extra = [] if flag in ("-o", "-r") else [flag, "-x"]
    result = run(["bash", Path(__file__).parent.parent / "scripts/make-airgap-media.sh", "-o", args["-o"],
                  "-r", args["-r"], *inputs.args(), *extra], env=inputs.env())
    assert_refused(result, flag, "'-x'")
    assert not (tmp_path / "media").exists()


@pytest.mark.parametrize("version", ["v1|x", "v1.31.4+k3s1&x", "v1/../../x", "v1 x", "v1\\x"])
def test_a_version_with_odd_characters_is_refused(inputs, tree, tmp_path, version):
    args = [str(a) for a in inputs.args()]
    args[args.index("-v") + 1] = version
    result = run(["bash", Path(__file__).parent.parent / "scripts/make-airgap-media.sh",
                  "-o", tmp_path / "media", "-r", tree, *args], env=inputs.env())
    assert_refused(result, "-v")
    assert not (tmp_path / "media").exists()


def test_a_relative_registry_binary_is_the_one_used(inputs, tree, tmp_path):
    """`-m minimal-registry` means the file here, not a command on PATH (nor the checkout)."""
    env = inputs.env()
    del env["MINIMAL_REGISTRY_BIN"]
    env["PYTHON"] = "/bin/false"  # the checkout fallback fails: only -m's file can verify
    args = [str(a) for a in inputs.args()]
    args[args.index("-m") + 1] = inputs.registry.name
    result = run(["bash", Path(__file__).parent.parent / "scripts/make-airgap-media.sh",
                  "-o", tmp_path / "media", "-r", tree, *args], env=env, cwd=inputs.registry.parent)
    assert result.returncode == 0, describe(result)
    assert (tmp_path / "media/minimal-registry").read_bytes() == inputs.registry.read_bytes()


@pytest.mark.parametrize("where", ["the tree", "inside the tree", "inside via a link"])
def test_media_inside_the_content_tree_is_refused(inputs, tree, tmp_path, where):
    if where == "the tree":
        media = tree
    elif where == "inside the tree":
        media = tree / "media"
    else:
        (tmp_path / "link").symlink_to(tree)
        media = tmp_path / "link" / "media"
    before = sorted(str(p) for p in tree.rglob("*"))
    result = make_media(inputs, tree, media)
    assert_refused(result, "inside the content tree")
    assert sorted(str(p) for p in tree.rglob("*")) == before


def test_leftovers_of_an_interrupted_import_are_not_packed(inputs, tree, tmp_path):
    staging = tree / ".import-4242-0badcafe" / "blobs" / "sha256"
    staging.mkdir(parents=True)
    (staging / ("0" * 64)).write_bytes(b"half an archive")
    some_blob = next(p for p in (tree / "blobs").iterdir())
    (tree / "blobs" / f".tmp-{some_blob.name}-4242-0badcafe").write_bytes(b"half a blob")
    media = tmp_path / "media"

    result = make_media(inputs, tree, media)

    assert result.returncode == 0, describe(result)
    listing = run(["tar", "-tzf", media / "registry.tar.gz"]).stdout.splitlines()
    assert listing and not [name for name in listing if "/.import-" in name or "/.tmp-" in name], listing


# ----- install-node.sh ------------------------------------------------------------------------

def test_install_node_accepts_sha256sums_with_crlf_line_endings(media, inputs, tmp_path):
    """SHA256SUMS opened and saved on Windows on its way to the node."""
    sums = media / "SHA256SUMS"
    sums.write_bytes(sums.read_bytes().replace(b"\n", b"\r\n"))
    result = install_node(media, tmp_path / "root", env=inputs.env())
    assert result.returncode == 0, describe(result)
    assert (tmp_path / "root/usr/local/bin/minimal-registry").exists()


@pytest.mark.parametrize("value", ["-x", "-", "ro\not"])
def test_install_node_refuses_an_odd_root(media, inputs, tmp_path, value):
    result = run(["bash", media / "install-node.sh", "--root", value, "--no-start"], env=inputs.env(),
                 cwd=tmp_path)
    assert_refused(result, "--root")
    assert not [p for p in tmp_path.iterdir() if p.name not in ("inputs", "src", "media")]
    assert not Path(os.environ.get("OLDPWD", "/nonexistent"), "usr/local/bin/k3s").exists()


@pytest.mark.parametrize("bad", ["registry/../escaped", "registry/blobs/../../../etc/cron.d/x", "/registry/abs"])
def test_a_bundle_with_a_member_escaping_registry_is_refused(inputs, tree, tmp_path, bad):
    import io
    import tarfile

    bundle = tmp_path / "registry.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(tree, arcname="registry")
        info = tarfile.TarInfo(bad)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    media = tmp_path / "media"
    result = run(["bash", Path(__file__).parent.parent / "scripts/make-airgap-media.sh", "-o", media,
                  "-b", bundle, *inputs.args()], env=inputs.env())
    assert_refused(result, "outside registry/")
    assert not media.exists()
