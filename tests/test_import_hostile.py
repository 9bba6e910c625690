"""`minimal-registry import` given hostile or broken sources: every one is refused (or handled)
with one clear line and exit 2, nothing is written outside the tree, nothing hangs, no
traceback, no unbounded memory.

The attacks: manifests that fan out (each digest walked once), deep JSON, oversized JSON,
tar members escaping by name or link, tar headers that ask for gigabytes of memory, members
bigger than the disk, docker-save files naming paths outside the archive, FIFOs.
"""

import io
import json
import os
import resource
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

import imagetree
from contentsupport import (Result, assert_one_line_error, containerd_name, docker_save_dir, mr, mr_process, oci_layout,
                            tar_directory)
from serverproc import command_env, registry_command

from minimal_registry.content import plan

HELLO = "docker.io/library/hello:latest"
DEEP = 100_000  # nesting levels: far past Python's recursion limit


@pytest.fixture
def built(tmp_path):
    builder = imagetree.TreeBuilder(tmp_path / "upstream")
    hello = builder.image("library/hello", "latest", files={"hello.txt": b"hello\n"})
    return builder, hello


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


def layout_of(tmp_path, built, name="layout") -> Path:
    builder, hello = built
    return oci_layout(builder.root, tmp_path / name, [hello], [containerd_name(HELLO)])


def put_blob(layout: Path, data: bytes) -> str:
    digest = imagetree.sha256_digest(data)
    (layout / "blobs/sha256" / hex_of(digest)).write_bytes(data)
    return digest


def set_index(layout: Path, entries) -> None:
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))


def run_limited(argv, memory_bytes: int, timeout: float = 120):
    """The command line as a process whose address space is capped: a reader that loads a
    huge input whole fails with MemoryError instead of taking the machine's memory."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    done = subprocess.run(registry_command() + list(argv), capture_output=True, text=True, env=command_env(),
                          timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=cap)
    return Result(done.returncode, done.stdout, done.stderr)


def assert_refused(result, *fragments):
    assert_one_line_error(result, *fragments)
    assert result.code == 2, result


def assert_no_leftovers(tree: Path) -> None:
    if tree.exists():
        assert not list(tree.glob(".import-*")), "staging directory left behind"
        assert not [p for p in tree.rglob("*") if p.name.startswith(".tmp-")]


# ----- item 10: fan-out ----------------------------------------------------------------------

def nested_fan_out(layout: Path, bottom, levels: int, fan: int):
    """`levels` indexes, each listing the next one `fan` times; the last lists `bottom`."""
    child = {"mediaType": bottom.media_type, "digest": bottom.digest, "size": bottom.size,
             "platform": {"os": "linux", "architecture": "amd64"}}
    total = 0
    for _ in range(levels):
        body = json.dumps({"schemaVersion": 2, "mediaType": imagetree.OCI_INDEX,
                           "manifests": [child] * fan}).encode()
        total += len(body)
        child = {"mediaType": imagetree.OCI_INDEX, "digest": put_blob(layout, body), "size": len(body),
                 "platform": {"os": "linux", "architecture": "amd64"}}
    return child, total


def test_indexes_listing_the_next_100_times_each_are_walked_once_per_digest(tmp_path, built, capsys,
                                                                            monkeypatch):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    top, total = nested_fan_out(layout, hello, levels=8, fan=100)
    assert 100_000 < total < 400_000  # the ~168 KB layout of the report: 100^8 paths
    set_index(layout, [dict(top, annotations=containerd_name(HELLO))])

    walked = {}
    real_walk = plan._walk

    def counting_walk(pool, tree, image_plan, current, *rest, **kw):
        walked[current.digest] = walked.get(current.digest, 0) + 1
        assert sum(walked.values()) < 10_000, "the planner walks every path, not every digest"
        return real_walk(pool, tree, image_plan, current, *rest, **kw)

    monkeypatch.setattr(plan, "_walk", counting_walk)
    tree = tmp_path / "tree"
    result = mr(capsys, "import", str(layout), "-d", str(tree))

    assert result.code == 0, result
    assert len(walked) == 9 and set(walked.values()) == {1}, walked
    assert os.readlink(tree / "library/hello/manifests/latest") == top["digest"]
    assert result.out.count("linux/amd64") == 1, result.out  # each platform named once
    assert mr(capsys, "verify", "-d", str(tree)).code == 0


def test_a_source_with_more_distinct_descriptors_than_the_bound_is_refused(tmp_path, built, capsys, monkeypatch):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    layers = [put_blob(layout, f"layer {n}".encode()) for n in range(60)]
    document = {"schemaVersion": 2, "mediaType": imagetree.OCI_MANIFEST,
                "config": {"mediaType": imagetree.OCI_CONFIG, "digest": hello.config.digest,
                           "size": hello.config.size},
                "layers": [{"mediaType": imagetree.OCI_LAYER_GZIP, "digest": d, "size": len(f"layer {n}")}
                           for n, d in enumerate(layers)]}
    body = json.dumps(document).encode()
    set_index(layout, [{"mediaType": imagetree.OCI_MANIFEST, "digest": put_blob(layout, body), "size": len(body),
                        "annotations": containerd_name(HELLO)}])
    assert plan.MAX_DESCRIPTORS >= 100_000  # generous: a real source is far below it
    monkeypatch.setattr(plan, "MAX_DESCRIPTORS", 50)
    tree = tmp_path / "tree"

    result = mr(capsys, "import", str(layout), "-d", str(tree))

    assert_refused(result, "more than 50")
    assert not (tree / "blobs").exists() or not any((tree / "blobs").iterdir())


def test_an_index_listing_thousands_of_absent_platforms_gives_a_short_summary(tmp_path, built, capsys):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    absent = [{"mediaType": imagetree.OCI_MANIFEST, "digest": imagetree.sha256_digest(b"%d" % n), "size": 10,
               "platform": {"os": "linux", "architecture": f"arch{n}"}} for n in range(5000)]
    present = {"mediaType": hello.media_type, "digest": hello.digest, "size": hello.size,
               "platform": {"os": "linux", "architecture": "amd64"}}
    body = json.dumps({"schemaVersion": 2, "mediaType": imagetree.OCI_INDEX,
                       "manifests": [present] + absent}).encode()
    set_index(layout, [{"mediaType": imagetree.OCI_INDEX, "digest": put_blob(layout, body), "size": len(body),
                        "annotations": containerd_name(HELLO)}])

    result = mr(capsys, "import", str(layout), "-d", str(tmp_path / "tree"))

    assert result.code == 0, result
    [line] = result.out.splitlines()
    assert len(line) < 1000 and "4990 more" in line, line


# ----- item 6: deep JSON everywhere a source holds JSON --------------------------------------

def deep(levels: int = DEEP) -> bytes:
    return b"[" * levels + b"]" * levels


def deep_object(levels: int = DEEP) -> bytes:
    return b'{"manifests": ' + deep(levels) + b"}"


@pytest.mark.parametrize("where", ["raw manifest", "index.json", "manifest.json", "manifest blob",
                                   "index.json in a tar"])
def test_deeply_nested_json_in_a_source_is_one_clear_line(tmp_path, built, where):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    source = layout
    if where == "raw manifest":
        source = tmp_path / "raw.json"
        source.write_bytes(b"{\"schemaVersion\": 2, \"manifests\": " + deep() + b"}")
    elif where in ("index.json", "index.json in a tar"):
        (layout / "index.json").write_bytes(deep_object())
        if where == "index.json in a tar":
            source = tar_directory(layout, tmp_path / "images.tar", "gz")
    elif where == "manifest.json":
        (layout / "index.json").unlink()
        (layout / "manifest.json").write_bytes(deep())
    else:
        body = b'{"schemaVersion": 2, "mediaType": "' + imagetree.OCI_INDEX.encode() + b'", "manifests": ' \
            + deep() + b"}"
        set_index(layout, [{"mediaType": imagetree.OCI_INDEX, "digest": put_blob(layout, body),
                            "size": len(body), "annotations": containerd_name(HELLO)}])
    tree = tmp_path / "tree"

    result = mr_process("import", str(source), "-d", str(tree))

    assert_refused(result, "nested too deeply")
    assert_no_leftovers(tree)


def test_a_deeply_nested_manifest_in_the_tree_is_replaced_from_the_source(tmp_path, built, capsys):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(layout), "-d", str(tree)).code == 0
    (tree / "library/hello/manifests" / hello.digest).write_bytes(deep_object())
    result = mr(capsys, "import", str(layout), "-d", str(tree))

    assert result.code == 0, result
    assert (tree / "library/hello/manifests" / hello.digest).read_bytes() == hello.data


# ----- item 12: every JSON reader is bounded ------------------------------------------------

def sparse(path: Path, size: int, head: bytes) -> Path:
    with open(path, "wb") as out:
        out.write(head)
        out.truncate(size)
    return path


def test_a_huge_raw_json_source_is_refused_without_reading_it(tmp_path):
    source = sparse(tmp_path / "huge.json", 3 * 1024 ** 3, b'{"schemaVersion": 2, "x": "')
    result = run_limited(["import", str(source), "-d", str(tmp_path / "tree")], memory_bytes=1024 ** 3)
    assert_refused(result, "huge.json", "4 MiB")


@pytest.mark.parametrize("name", ["index.json", "manifest.json"])
def test_an_index_json_or_manifest_json_over_4_mib_is_refused(tmp_path, built, name):
    layout = layout_of(tmp_path, built)
    if name == "manifest.json":
        (layout / "index.json").unlink()
        padding = [{"Config": "x", "Layers": [], "RepoTags": [], "Comment": "x" * 1000}] * 5000
        (layout / name).write_text(json.dumps(padding))
    else:
        document = json.loads((layout / name).read_text())
        document["annotations"] = {"padding": "x" * (5 * 1024 * 1024)}
        (layout / name).write_text(json.dumps(document))
    result = mr_process("import", str(layout), "-d", str(tmp_path / "tree"))
    assert_refused(result, name, "4 MiB")


# ----- sources that are not regular files ---------------------------------------------------

def test_a_fifo_as_source_is_refused_at_once(tmp_path):
    fifo = tmp_path / "images.tar"
    os.mkfifo(fifo)
    result = mr_process("import", str(fifo), "-d", str(tmp_path / "tree"), timeout=60)
    assert_refused(result, "images.tar", "not a regular file")


@pytest.mark.parametrize("what", ["index.json", "blob"])
def test_a_fifo_inside_a_layout_is_never_opened(tmp_path, built, what):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    target = layout / "index.json" if what == "index.json" else layout / "blobs/sha256" / hex_of(hello.layers[0].digest)
    target.unlink()
    os.mkfifo(target)
    result = mr_process("import", str(layout), "-d", str(tmp_path / "tree"), timeout=60)
    assert_one_line_error(result)  # no hang: the FIFO counts as missing
    assert result.code == (2 if what == "index.json" else 3)


def test_a_docker_save_directory_whose_layer_links_outside_it_is_refused(tmp_path, built):
    builder, hello = built
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:$6$not-for-the-registry\n")
    saved = docker_save_dir(builder.root, tmp_path / "saved", [hello], [["hello:latest"]],
                            {hello.layers[0].digest: b"layer"})
    layer = saved / "0-0/layer.tar"
    layer.unlink()
    layer.symlink_to(secret)
    tree = tmp_path / "tree"

    result = mr_process("import", str(saved), "-d", str(tree))

    assert_refused(result, "0-0/layer.tar", "outside the source")
    blobs = tree / "blobs"
    assert not blobs.exists() or all(p.read_bytes() != secret.read_bytes() for p in blobs.iterdir())


@pytest.mark.parametrize("field", ["Layers", "Config"])
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd"])
def test_a_docker_manifest_json_naming_a_path_outside_the_archive_is_refused(tmp_path, built, field, path):
    builder, hello = built
    saved = docker_save_dir(builder.root, tmp_path / "saved", [hello], [["hello:latest"]],
                            {hello.layers[0].digest: b"layer"})
    entries = json.loads((saved / "manifest.json").read_text())
    entries[0][field] = [path] if field == "Layers" else path
    (saved / "manifest.json").write_text(json.dumps(entries))
    archive = tar_directory(saved, tmp_path / "saved.tar")
    tree = tmp_path / "tree"
    for source in (saved, archive):
        result = mr_process("import", str(source), "-d", str(tree))
        assert_refused(result, path, "outside the source")
    assert not (tree / "blobs").exists() or not any((tree / "blobs").iterdir())


# ----- hostile tar members --------------------------------------------------------------------

def hostile_tar(path: Path, layout: Path, extra) -> Path:
    """The files of `layout` plus the TarInfo members `extra` yields (each with its bytes)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in sorted(layout.rglob("*")):
            tar.add(file, arcname=str(file.relative_to(layout)), recursive=False)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind=tarfile.REGTYPE, data: bytes = b"", linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped-absolute", "blobs/../../escaped"])
def test_a_member_named_outside_the_archive_is_refused(tmp_path, built, name):
    layout = layout_of(tmp_path, built)
    archive = hostile_tar(tmp_path / "evil.tar", layout, [member(name, data=b"bad")])
    tree = tmp_path / "tree"
    result = mr_process("import", str(archive), "-d", str(tree))
    assert_refused(result, "unsafe path")
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-absolute").exists()
    assert_no_leftovers(tree)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../../../etc/passwd"])
def test_a_blob_member_linking_outside_the_archive_is_never_followed(tmp_path, built, kind, target):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    layer = layout / "blobs/sha256" / hex_of(hello.layers[0].digest)
    layer.unlink()
    archive = hostile_tar(tmp_path / "evil.tar", layout,
                          [member(f"blobs/sha256/{hex_of(hello.layers[0].digest)}", kind, linkname=target)])
    tree = tmp_path / "tree"

    result = mr_process("import", str(archive), "-d", str(tree))

    assert result.code == 3, result  # the layer is in no source: nothing was read through the link
    assert_one_line_error(result, hello.layers[0].digest, "in no source")
    assert not [p for p in tree.rglob("*") if p.is_symlink() and not os.readlink(p).startswith(("../", "sha256:"))]
    assert_no_leftovers(tree)


def test_links_that_loop_inside_the_archive_end(tmp_path, built):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    (layout / "index.json").unlink()
    archive = hostile_tar(tmp_path / "loop.tar", layout, [
        member("index.json", tarfile.SYMTYPE, linkname="a"),
        member("a", tarfile.SYMTYPE, linkname="index.json"),
    ])
    result = mr_process("import", str(archive), "-d", str(tmp_path / "tree"), timeout=60)
    assert_refused(result, "no index.json")


def test_a_file_member_where_a_directory_was_is_named_in_the_error(tmp_path, built):
    layout = layout_of(tmp_path, built)
    archive = hostile_tar(tmp_path / "clash.tar", layout, [member("blobs/sha256", data=b"not a directory")])
    tree = tmp_path / "tree"
    result = mr_process("import", str(archive), "-d", str(tree))
    assert_refused(result, "blobs/sha256")
    assert "free space" not in result.err  # it is the archive, not the disk
    assert_no_leftovers(tree)


def zstd_of_header_then_zeros(path: Path, header: tarfile.TarInfo, zeros: int) -> Path:
    """A .tar.zst whose first member is `header` followed by `zeros` zero bytes: tiny on disk."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    with open(path, "wb") as out:
        out.write(compressor.compress(header.tobuf(tarfile.GNU_FORMAT)))
        chunk = bytes(16 * 1024 * 1024)
        left = zeros
        while left:
            piece = chunk[:min(left, len(chunk))]
            out.write(compressor.compress(piece))
            left -= len(piece)
        out.write(compressor.flush())
    return path


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_tar_header_asking_for_gigabytes_of_memory_is_refused(tmp_path, kind):
    """A pax header or GNU long name is read into memory whole: one of 1.5 GiB (a few KB of
    zstd) must not take the machine's memory."""
    header = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax")
    header.type = kind
    header.size = 1536 * 1024 * 1024
    archive = zstd_of_header_then_zeros(tmp_path / "bomb.tar.zst", header, header.size)
    assert archive.stat().st_size < 1024 * 1024
    tree = tmp_path / "tree"

    result = run_limited(["import", str(archive), "-d", str(tree)], memory_bytes=1024 ** 3)

    assert_refused(result, "bomb.tar.zst", "bytes of metadata")
    assert "MemoryError" not in result.err
    assert_no_leftovers(tree)


def test_a_member_bigger_than_the_free_space_is_refused_before_writing(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    header = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
    header.size = free + 1024 ** 3
    archive = zstd_of_header_then_zeros(tmp_path / "bomb.tar.zst", header, 64 * 1024 * 1024)
    tree = tmp_path / "tree"

    result = mr_process("import", str(archive), "-d", str(tree))

    assert_refused(result, "blobs/sha256/" + "0" * 64, "filesystem has")
    assert_no_leftovers(tree)


@pytest.mark.parametrize("name", ["index.json", "manifest.json"])
def test_a_huge_json_member_is_refused_before_it_is_unpacked(tmp_path, name):
    header = tarfile.TarInfo(name)
    header.size = 1024 ** 3
    archive = zstd_of_header_then_zeros(tmp_path / "big.tar.zst", header, 64 * 1024 * 1024)
    tree = tmp_path / "tree"

    result = mr_process("import", str(archive), "-d", str(tree))

    assert_refused(result, name, "4 MiB")
    assert_no_leftovers(tree)


def test_a_device_member_is_skipped_and_never_created(tmp_path, built):
    layout = layout_of(tmp_path, built)
    info = tarfile.TarInfo("blobs/sha256/" + "1" * 64)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 5  # /dev/zero
    archive = hostile_tar(tmp_path / "dev.tar", layout, [(info, None)])
    tree = tmp_path / "tree"
    result = mr_process("import", str(archive), "-d", str(tree))
    assert result.code == 0, result
    assert not [p for p in tree.rglob("*") if stat.S_ISCHR(os.lstat(p).st_mode)]


# ----- a tree with non-regular files where content should be --------------------------------

@pytest.mark.parametrize("what", ["manifest", "tag", "blob"])
def test_a_fifo_in_the_tree_is_replaced_never_read(tmp_path, built, capsys, what):
    """GNU tar run as root re-creates FIFOs from an archive; an import must not wait on one."""
    builder, hello = built
    layout = layout_of(tmp_path, built)
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(layout), "-d", str(tree)).code == 0
    manifests = tree / "library/hello/manifests"
    target = {"manifest": manifests / hello.digest, "tag": manifests / "latest",
              "blob": tree / "blobs" / hello.layers[0].digest}[what]
    target.unlink()
    os.mkfifo(target)

    result = mr_process("import", str(layout), "-d", str(tree), timeout=60)

    assert result.code == 0, result
    assert not stat.S_ISFIFO(os.lstat(target).st_mode)
    assert mr(capsys, "verify", "-d", str(tree)).code == 0


def test_a_manifest_in_the_tree_linking_outside_it_is_replaced_by_a_file(tmp_path, built, capsys):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    tree = tmp_path / "tree"
    assert mr(capsys, "import", str(layout), "-d", str(tree)).code == 0
    outside = tmp_path / "outside.json"
    outside.write_bytes(hello.data)
    stored = tree / "library/hello/manifests" / hello.digest
    stored.unlink()
    stored.symlink_to(outside)

    assert mr(capsys, "import", str(layout), "-d", str(tree)).code == 0

    assert not stored.is_symlink() and stored.read_bytes() == hello.data


def test_a_member_nested_thousands_of_directories_deep_is_one_clear_line(tmp_path, built):
    layout = layout_of(tmp_path, built)
    deep_name = "d/" * 1500 + "x"  # within PATH_MAX, past Python's recursion limit
    archive = hostile_tar(tmp_path / "deep.tar", layout, [member(deep_name, data=b"x")])
    tree = tmp_path / "tree"
    result = mr_process("import", str(archive), "-d", str(tree))
    assert_refused(result, "deep.tar")
    assert_no_leftovers(tree)


def test_an_archive_with_more_members_than_the_bound_is_refused(tmp_path, built, capsys, monkeypatch):
    from minimal_registry.content import archive as archive_module

    layout = layout_of(tmp_path, built)
    archive = hostile_tar(tmp_path / "many.tar", layout, [member(f"empty/{n}") for n in range(60)])
    assert archive_module.MAX_MEMBERS >= 100_000  # generous: a docker save of many images has thousands
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 50)
    tree = tmp_path / "tree"

    result = mr(capsys, "import", str(archive), "-d", str(tree))

    assert_refused(result, "more than 50 members")
    assert_no_leftovers(tree)


def test_a_source_blob_swapped_for_a_fifo_after_planning_is_refused_not_waited_on(tmp_path, built, capsys,
                                                                                   monkeypatch):
    import threading
    import time

    from minimal_registry.content import importer

    builder, hello = built
    layout = layout_of(tmp_path, built)
    layer = layout / "blobs/sha256" / hex_of(hello.layers[0].digest)
    real_make = importer.plan.make

    def make_then_swap(*args, **kwargs):
        plans = real_make(*args, **kwargs)
        layer.unlink()
        os.mkfifo(layer)
        return plans

    def unblock_a_waiting_reader():  # bounded: ends the test's wait if the import opens the FIFO
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not stat.S_ISFIFO(os.stat(layer).st_mode):
                    raise FileNotFoundError  # not swapped yet
                fd = os.open(layer, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader waits
            except OSError:
                time.sleep(0.05)
                continue
            os.write(fd, b"whatever a writer sends")
            os.close(fd)
            return

    monkeypatch.setattr(importer.plan, "make", make_then_swap)
    helper = threading.Thread(target=unblock_a_waiting_reader, daemon=True)
    helper.start()
    result = mr(capsys, "import", str(layout), "-d", str(tmp_path / "tree"))
    helper.join()

    assert_refused(result, layer.name, "not a regular file")


@pytest.mark.parametrize("field", ["Layers", "RepoTags"])
def test_a_docker_manifest_json_with_nested_lists_for_names_gets_a_short_line(tmp_path, built, field):
    builder, hello = built
    saved = docker_save_dir(builder.root, tmp_path / "saved", [hello], [["hello:latest"]],
                            {hello.layers[0].digest: b"layer"})
    entries = json.loads((saved / "manifest.json").read_text())
    entries[0][field] = json.loads(deep(900).decode())
    (saved / "manifest.json").write_text(json.dumps(entries))
    result = mr_process("import", str(saved), "-d", str(tmp_path / "tree"))
    assert_refused(result, "manifest.json entry 0")
    assert len(result.err) < 400, result.err


@pytest.mark.parametrize("linked", ["library", "library/hello/manifests", "blobs"])
def test_a_tree_directory_that_links_outside_the_tree_is_never_written_through(tmp_path, built, capsys, linked):
    layout = layout_of(tmp_path, built)
    tree = tmp_path / "tree"
    tree.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tree / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)

    result = mr(capsys, "import", str(layout), "-d", str(tree))

    assert_refused(result, linked, "symlink")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("size", [-1, 2 ** 63, 10 ** 30, True, 1.5, "12"])
def test_a_blob_descriptor_with_a_bad_size_is_one_line(tmp_path, built, size):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    document = json.loads(hello.data)
    document["layers"][0]["size"] = size
    body = json.dumps(document).encode()
    set_index(layout, [{"mediaType": imagetree.OCI_MANIFEST, "digest": put_blob(layout, body), "size": len(body),
                        "annotations": containerd_name(HELLO)}])
    tree = tmp_path / "tree"

    result = mr_process("import", str(layout), "-d", str(tree))

    assert_refused(result, "minimal-registry: ")  # the size is refused or disagrees with the blob's
    assert not (tree / "library/hello/manifests/latest").exists()


@pytest.mark.parametrize("media_type", ["application/vnd.oci.image.manifest.v1+json\r\nX-Injected: 1",
                                        "application/vnd.oci.image.manifest.v1+json\u2028",
                                        "application/vnd.oci.image.manifest.v1+json\u0151"])
def test_a_manifest_whose_media_type_cannot_be_a_header_is_not_a_manifest(tmp_path, built, media_type):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    document = json.loads(hello.data)
    document["mediaType"] = media_type
    body = json.dumps(document).encode()
    set_index(layout, [{"mediaType": imagetree.OCI_MANIFEST, "digest": put_blob(layout, body), "size": len(body),
                        "annotations": containerd_name(HELLO)}])
    tree = tmp_path / "tree"

    result = mr_process("import", str(layout), "-d", str(tree))

    assert_refused(result, "not a manifest", "mediaType")
    assert not (tree / "library/hello/manifests/latest").exists()


def test_platform_names_with_control_characters_stay_on_one_line(tmp_path, built, capsys):
    builder, hello = built
    layout = layout_of(tmp_path, built)
    child = {"mediaType": hello.media_type, "digest": hello.digest, "size": hello.size,
             "platform": {"os": "linux", "architecture": "amd64\nimported evil/image:latest"}}
    body = json.dumps({"schemaVersion": 2, "mediaType": imagetree.OCI_INDEX, "manifests": [child]}).encode()
    set_index(layout, [{"mediaType": imagetree.OCI_INDEX, "digest": put_blob(layout, body), "size": len(body),
                        "annotations": containerd_name(HELLO)}])

    result = mr(capsys, "import", str(layout), "-d", str(tmp_path / "tree"))

    assert result.code == 0, result
    assert len(result.out.splitlines()) == 1, result.out
    assert "amd64\\nimported" in result.out


def test_staging_left_by_a_killed_import_is_removed_by_the_next(tmp_path, built, capsys):
    import subprocess as sp
    import sys

    layout = layout_of(tmp_path, built)
    tree = tmp_path / "tree"
    gone = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tree / f".import-{gone.stdout.strip()}-0badcafe"
    (dead / "blobs/sha256").mkdir(parents=True)
    (dead / "blobs/sha256" / ("0" * 64)).write_bytes(b"half of a killed import")
    alive = tree / f".import-{os.getpid()}-0badcafe"  # a running import's: not touched
    alive.mkdir()
    recent = tree / f".import-{gone.stdout.strip()}-5eedcafe"  # maybe another pid namespace's
    recent.mkdir()
    two_hours_ago = os.stat(dead).st_mtime - 7200
    for old in (dead, alive):
        os.utime(old, (two_hours_ago, two_hours_ago))

    result = mr(capsys, "import", str(layout), "-d", str(tree))

    assert result.code == 0, result
    assert not dead.exists() and alive.exists() and recent.exists()


def test_sources_whose_manifests_add_up_past_the_bound_are_refused(tmp_path, built, capsys, monkeypatch):
    """Each manifest is at most 4 MiB, but thousands of them would all be held in memory."""
    from minimal_registry.content import pool as pool_module

    builder, hello = built
    layout = layout_of(tmp_path, built)
    top, total = nested_fan_out(layout, hello, levels=3, fan=100)
    set_index(layout, [dict(top, annotations=containerd_name(HELLO))])
    assert pool_module.MAX_MANIFEST_BYTES >= 256 * 1024 * 1024
    monkeypatch.setattr(pool_module, "MAX_MANIFEST_BYTES", total // 2)

    result = mr(capsys, "import", str(layout), "-d", str(tmp_path / "tree"))

    assert_refused(result, "manifests add up to more than")


@pytest.mark.parametrize("kind", ["socket", "device"])
def test_a_socket_or_device_as_source_is_named_for_what_it_is(tmp_path, kind):
    import socket

    if kind == "socket":
        source = tmp_path / "images.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(source))
        expected = "a socket"
    else:
        source, expected = Path("/dev/zero"), "a character device"
    try:
        result = mr_process("import", str(source), "-d", str(tmp_path / "tree"), timeout=60)
    finally:
        if kind == "socket":
            listener.close()
    assert_refused(result, str(source), expected)


@pytest.mark.parametrize("field", ["Layers", "Config"])
def test_a_file_name_with_a_newline_in_manifest_json_stays_on_one_line(tmp_path, built, field):
    builder, hello = built
    saved = docker_save_dir(builder.root, tmp_path / "saved", [hello], [["hello:latest"]],
                            {hello.layers[0].digest: b"layer"})
    entries = json.loads((saved / "manifest.json").read_text())
    entries[0][field] = ["layer\n[ERROR] forged"] if field == "Layers" else "config\n[ERROR] forged"
    (saved / "manifest.json").write_text(json.dumps(entries))
    result = mr_process("import", str(saved), "-d", str(tmp_path / "tree"))
    assert_refused(result, "missing")


@pytest.mark.parametrize("config", [b"not json at all", b"[1, 2, 3]", b'{"a": ' + deep(990) + b"}"])
def test_a_docker_save_config_that_is_not_a_json_object_is_refused(tmp_path, built, config):
    """containerd would fail on it at pull time, on the node: refuse it where it can be fixed."""
    builder, hello = built
    saved = docker_save_dir(builder.root, tmp_path / "saved", [hello], [["hello:latest"]],
                            {hello.layers[0].digest: b"layer"})
    entries = json.loads((saved / "manifest.json").read_text())
    (saved / entries[0]["Config"]).write_bytes(config)
    tree = tmp_path / "tree"
    result = mr_process("import", str(saved), "-d", str(tree))
    assert_refused(result, entries[0]["Config"])
    assert not (tree / "library/hello/manifests/latest").exists()


def test_a_docker_save_listing_one_layer_thousands_of_times_hashes_it_once(tmp_path, built, capsys, monkeypatch):
    from minimal_registry.content import hashing

    builder, hello = built
    saved = docker_save_dir(builder.root, tmp_path / "saved", [hello], [["hello:latest"]],
                            {hello.layers[0].digest: b"layer"})
    entries = json.loads((saved / "manifest.json").read_text())
    entry = entries[0]
    entries = [dict(entry, RepoTags=[f"hello:v{n}"], Layers=entry["Layers"] * 100) for n in range(30)]
    (saved / "manifest.json").write_text(json.dumps(entries))
    hashed = []
    real = hashing.hash_open_file
    monkeypatch.setattr(hashing, "hash_open_file", lambda reader, *a: hashed.append(1) or real(reader, *a))

    result = mr(capsys, "import", str(saved), "-d", str(tmp_path / "tree"))

    assert result.code == 0, result
    assert len(hashed) <= 2, f"the layer was hashed {len(hashed)} times"  # once reading, at most once placing
