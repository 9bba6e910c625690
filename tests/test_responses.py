"""Range, ETag and conditional-request decisions, without a server (PROTOCOL.md P12, P13)."""

import pytest

from minimal_registry.responses import UNSATISFIABLE, WHOLE, FileSlice, content_response, none_match, parse_range

SIZE = 2048
DIGEST = "sha256:" + "ab" * 32
ETAG = f'"{DIGEST}"'


@pytest.mark.parametrize("header,want", [
    (None, WHOLE),
    ("bytes=500-1499", (500, 1499)),
    ("bytes=-500", (1548, 2047)),
    ("bytes=0-0", (0, 0)),
    ("bytes=0-", (0, 2047)),
    ("bytes=2000-5000", (2000, 2047)),
    ("bytes=2047-2047", (2047, 2047)),
    ("bytes=-5000", (0, 2047)),
    ("bytes=500-0", UNSATISFIABLE),
    ("bytes=5000-", UNSATISFIABLE),
    ("bytes=2048-", UNSATISFIABLE),
    ("bytes=-0", UNSATISFIABLE),
    ("bytes=0-1,5-6", WHOLE),  # several ranges: the whole body
    ("items=0-1", WHOLE),
    ("bytes=abc", WHOLE),
    ("bytes=-", WHOLE),
    ("bytes=1-x", WHOLE),
    ("BYTES=1-2", (1, 2)),
    # Only ASCII digits are numbers (str.isdigit() also accepts these, int() does not).
    ("bytes=\u00b2-", WHOLE),
    ("bytes=0-\u00b2", WHOLE),
    ("bytes=-\u00b2", WHOLE),
    ("bytes=\u0661-", WHOLE),  # ARABIC-INDIC DIGIT ONE: int() takes it, HTTP does not
    ("bytes=\uff11-\uff12", WHOLE),
    # Numbers past any file size, longer than int() will parse (4,300 digits).
    ("bytes=" + "9" * 5000 + "-", UNSATISFIABLE),
    ("bytes=0-" + "9" * 5000, (0, 2047)),
    ("bytes=-" + "9" * 5000, (0, 2047)),
    ("bytes=" + "0" * 5000 + "7-8", (7, 8)),
])
def test_parse_range(header, want):
    assert parse_range(header, SIZE) == want


def test_nothing_of_an_empty_blob_is_satisfiable():
    assert parse_range("bytes=0-", 0) == UNSATISFIABLE
    assert parse_range("bytes=-1", 0) == UNSATISFIABLE


def blob(headers, head=False):
    return content_response(headers, head, digest=DIGEST, size=SIZE, content_type="application/octet-stream",
                            body=FileSlice("/blob", 0, SIZE), ranged=True)


@pytest.mark.parametrize("range_header,status,content_range,length", [
    ("bytes=500-1499", 206, "bytes 500-1499/2048", 1000),
    ("bytes=-500", 206, "bytes 1548-2047/2048", 500),
    ("bytes=0-0", 206, "bytes 0-0/2048", 1),
    ("bytes=2000-5000", 206, "bytes 2000-2047/2048", 48),
    ("bytes=0-", 206, "bytes 0-2047/2048", 2048),  # containerd 2.1.0-2.1.2 send this on every GET
    ("bytes=500-0", 416, "bytes */2048", None),
    ("bytes=5000-", 416, "bytes */2048", None),
])
def test_every_partial_answer_carries_content_range(range_header, status, content_range, length):
    response = blob({"range": range_header})
    assert response.status == status
    assert response.header("Content-Range") == content_range
    if length is not None:
        assert response.header("Content-Length") == str(length)
        first = int(content_range.split()[1].split("-")[0])
        assert response.body == FileSlice("/blob", first, length)


def test_head_with_range_has_get_headers_and_no_body():
    get, head = blob({"range": "bytes=1-2"}), blob({"range": "bytes=1-2"}, head=True)
    assert get.headers == head.headers and head.body == b""


def test_if_range_mismatch_sends_the_whole_body():
    response = blob({"range": "bytes=1-2", "if-range": '"sha256:other"'})
    assert response.status == 200 and response.header("Content-Length") == str(SIZE)
    assert blob({"range": "bytes=1-2", "if-range": ETAG}).status == 206


@pytest.mark.parametrize("header,matches", [
    (ETAG, True), ("*", True), (f'W/{ETAG}', True), (f'"x", {ETAG}', True),
    ('"sha256:other"', False), (None, False), ("", False),
])
def test_if_none_match(header, matches):
    assert none_match(header, ETAG) is matches
    assert blob({"if-none-match": header} if header is not None else {}).status == (304 if matches else 200)


def test_not_modified_has_identity_but_no_length():
    response = blob({"if-none-match": ETAG})
    assert response.header("ETag") == ETAG and response.header("Docker-Content-Digest") == DIGEST
    assert response.header("Content-Length") is None and response.body == b""


CEILING = 10 ** 6


@pytest.mark.parametrize("text,want", [
    ("0", 0), ("12", 12), ("007", 7), ("0" * 5000 + "3", 3), ("1000001", CEILING), ("9" * 5000, CEILING),
    ("\u00b2", None), ("\u0661", None), ("-1", None), ("+1", None), (" 1", None), ("1_000", None), ("", None),
])
def test_client_numbers_are_ascii_digits_and_capped(text, want):
    """Whatever a client sends as a number: None unless ASCII digits; never int() of 5,000 digits."""
    from minimal_registry.responses import client_number

    assert client_number(text, CEILING) == want
