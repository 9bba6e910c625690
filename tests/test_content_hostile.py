"""Content tools given JSON built to break parsers: one clear line, never a traceback."""

import pytest

from contentsupport import assert_one_line_error, mr_process

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("file_name", ["index.json", "manifest.json"])
def test_an_import_source_whose_json_is_nested_too_deeply_is_one_line(tmp_path, file_name):
    source = tmp_path / "source"
    source.mkdir()
    if file_name == "index.json":
        (source / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (source / "blobs" / "sha256").mkdir(parents=True)
    (source / file_name).write_text(DEEP)
    result = mr_process("import", str(source), "-d", str(tmp_path / "tree"), timeout=60)
    assert_one_line_error(result)
