"""The containment rule on its own: what the server, verify, ls and prune may read."""

import os
import shutil
import stat
import tracemalloc

import pytest

from minimal_registry.treesafety import Refused, TreeBounds


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "registry"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "good").write_bytes(b"inside")
    (tmp_path / "outside").write_bytes(b"secret")
    return root


def test_a_regular_file_inside_is_opened_and_read(tree):
    with TreeBounds(tree).open_regular(tree / "blobs" / "good") as opened:
        assert opened.read(100) == b"inside" and opened.real_path == str(tree / "blobs" / "good")


def largest_allocation_while(action):
    """The peak of Python's allocations while `action()` runs, above what was held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = action()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("size", [2000, 300_000])
def test_reading_a_manifest_sized_file_asks_for_no_buffer_much_bigger_than_the_file(tree, size):
    # Every manifest read asks for up to 4 MiB. A buffer that big, freed unused at the end
    # of the file, raises glibc's mmap threshold; from then on each over-sized buffer came
    # from the heap, was cut down to the manifest and pinned the heap around it: the
    # server's RSS grew by 30 MiB under scripts/soak.sh with the Python heap flat.
    data = os.urandom(size)
    (tree / "blobs" / "manifest").write_bytes(data)
    with TreeBounds(tree).open_regular(tree / "blobs" / "manifest") as opened:
        body, peak = largest_allocation_while(lambda: opened.read(4 * 1024 * 1024 + 1))
    assert body == data
    assert peak < 2 * size + 128 * 1024


def test_a_link_out_of_the_tree_is_refused_before_and_after_opening(tree, tmp_path):
    os.symlink(tmp_path / "outside", tree / "blobs" / "leak")
    bounds = TreeBounds(tree)
    for check in (bounds.open_regular, bounds.check_regular, bounds.resolve):
        with pytest.raises(Refused, match="outside the content tree"):
            check(tree / "blobs" / "leak")


def test_blobs_kept_on_another_disk_are_inside(tree, tmp_path):
    elsewhere = tmp_path / "disk2"
    shutil.move(str(tree / "blobs"), elsewhere)
    os.symlink(elsewhere, tree / "blobs")
    bounds = TreeBounds(tree)
    assert bounds.contains(str(elsewhere / "good"))
    with bounds.open_regular(tree / "blobs" / "good") as opened:
        assert opened.read(6) == b"inside"
    assert not bounds.contains(str(tmp_path / "outside"))


@pytest.mark.parametrize("make,kind", [
    (lambda path: os.mkfifo(path), "a FIFO"),
    (lambda path: os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5)), "a character device"),
    (lambda path: os.mkdir(path), "a directory"),
])
def test_anything_but_a_regular_file_is_never_opened(tree, make, kind):
    make(tree / "blobs" / "odd")
    bounds = TreeBounds(tree)
    for check in (bounds.open_regular, bounds.check_regular):
        with pytest.raises(Refused, match=kind):
            check(tree / "blobs" / "odd")


def test_a_fifo_swapped_in_after_the_check_does_not_block_and_is_refused(tree, monkeypatch):
    """The check before opening saw a regular file; by the open it is a FIFO with no writer.
    A blocking open would wait forever; the non-blocking one returns and fstat refuses it."""
    fifo = tree / "blobs" / "swapped"
    os.mkfifo(fifo)
    regular = os.stat(tree / "blobs" / "good")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: regular if str(path) == str(fifo) else real_stat(path, *a, **k))
    with pytest.raises(Refused, match="a FIFO"):
        TreeBounds(tree).open_regular(fifo)


def test_a_missing_file_is_an_os_error_not_a_refusal(tree):
    with pytest.raises(FileNotFoundError):
        TreeBounds(tree).open_regular(tree / "blobs" / "absent")


def test_a_file_replaced_by_rename_just_after_it_was_opened_is_read_as_it_was(tree, monkeypatch):
    # The soak found it: a plain-file tag rewritten by rename between the open and the check
    # of the descriptor's path answered 404 "manifest unknown" for a tag that always existed.
    path = tree / "blobs" / "good"
    replacement = tree / "blobs" / ".next"
    replacement.write_bytes(b"the next version")
    real_open = os.open

    def open_then_replace(target, flags, *args, **kwargs):
        fd = real_open(target, flags, *args, **kwargs)
        if str(target) == str(path):
            os.replace(replacement, path)
        return fd

    monkeypatch.setattr(os, "open", open_then_replace)
    with TreeBounds(tree).open_regular(path) as opened:
        assert opened.read(100) == b"inside"
    assert path.read_bytes() == b"the next version"


def test_a_file_replaced_by_rename_with_a_link_out_of_the_tree_is_still_refused(tree, tmp_path, monkeypatch):
    path = tree / "blobs" / "good"
    real_open = os.open

    def open_then_unlink(target, flags, *args, **kwargs):
        fd = real_open(target, flags, *args, **kwargs)
        if str(target) == str(path):
            os.unlink(path)
        return fd

    monkeypatch.setattr(os, "open", open_then_unlink)
    os.unlink(path)
    path.symlink_to(tmp_path / "outside")
    with pytest.raises(Refused):
        TreeBounds(tree).open_regular(path)
