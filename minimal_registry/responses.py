"""What the registry answers, as plain values: a Response, and the Range / ETag decisions.

Handlers build a `Response`; only `app` turns one into WSGI calls. Nothing here does I/O,
so every decision can be tested with a dict of headers.
"""

import functools
import json
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Tuple, Union

from minimal_registry.errors import RegistryError, range_invalid

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
# Content-addressed responses never change.
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class FileSlice:
    """`length` bytes of the file at `path` from `offset`: sent with sendfile, never read here."""

    path: str
    offset: int
    length: int


@dataclass
class Response:
    status: int
    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: Union[bytes, FileSlice] = b""

    def header(self, name: str) -> Optional[str]:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


def json_response(status: int, document, headers=(), content_type: str = "application/json") -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return Response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers], body)


def error_response(error: RegistryError, head: bool = False, headers=()) -> Response:
    body = error.body()
    response_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        *error.headers, *headers]
    # A HEAD answer has no body, but says how long the GET body would be.
    return Response(error.status, response_headers, b"" if head else body)


# --- Range (RFC 9110 section 14) -----------------------------------------------------------

WHOLE = "whole"
UNSATISFIABLE = "unsatisfiable"


# Longer than any byte count a file can have (2**63 has 19 digits): such a number means "more
# than everything". Past 4,300 digits int() refuses to parse at all.
_MAX_DIGITS = 18
# Values past this are as good as infinite for a byte position or a page size.
HUGE = 10 ** _MAX_DIGITS


def client_number(text: str, ceiling: int = HUGE) -> Optional[int]:
    """A number a client sent (a Range bound, `?n=`): ASCII digits only, capped at `ceiling`.

    None if `text` is not a non-empty run of ASCII digits: `str.isdigit()` is also true for
    `\u00b2` (which int() refuses) and `\u0661` (which int() accepts), neither of them HTTP.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    significant = text.lstrip("0") or "0"
    if len(significant) > _MAX_DIGITS:
        return ceiling
    return min(int(significant), ceiling)


def parse_range(header: Optional[str], size: int) -> Union[str, Tuple[int, int]]:
    """One byte range as (first, last) inclusive, WHOLE, or UNSATISFIABLE.

    Anything this cannot read is answered with the whole body, which RFC 9110 allows. Several
    ranges also get the whole body: clients pulling images ask for one, and a multipart
    answer is more than any of them wants.
    """
    if not header:
        return WHOLE
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return WHOLE
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return WHOLE
    first_text, last_text = first_text.strip(), last_text.strip()
    if not first_text:
        suffix = client_number(last_text)
        if suffix is None:
            return WHOLE
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(size - suffix, 0), size - 1
    first = client_number(first_text)
    last = client_number(last_text) if last_text else size - 1
    if first is None or last is None:
        return WHOLE
    if first >= size or last < first:
        return UNSATISFIABLE
    return first, min(last, size - 1)


# --- Conditional requests (RFC 9110 section 13) --------------------------------------------

def _entity_tags(header: str):
    for tag in header.split(","):
        tag = tag.strip()
        yield tag[2:] if tag.startswith("W/") else tag


def none_match(header: Optional[str], etag: str) -> bool:
    """True when If-None-Match lists this ETag (weak comparison) or `*`: answer 304."""
    if not header:
        return False
    return any(tag == "*" or tag == etag for tag in _entity_tags(header))


def range_still_valid(if_range: Optional[str], etag: str) -> bool:
    """If-Range with anything but our exact strong ETag means: send the whole body."""
    return if_range is None or if_range.strip() == etag


# --- Content: a manifest or a blob ---------------------------------------------------------

def content_response(request_headers: Mapping[str, str], head: bool, *, digest: str, size: int,
                     content_type: str, body: Union[bytes, FileSlice], ranged: bool,
                     cache_control: Optional[str] = None) -> Response:
    """The answer for stored content, honouring If-None-Match and (when `ranged`) Range.

    `request_headers` maps lower-case header names to values. HEAD gets exactly GET's headers.
    """
    etag = f'"{digest}"'
    identity = [("Docker-Content-Digest", digest), ("ETag", etag)]
    if cache_control:
        identity.append(("Cache-Control", cache_control))

    if none_match(request_headers.get("if-none-match"), etag):
        return Response(304, identity)

    if not ranged:
        return Response(200, list(_whole_headers(content_type, digest, size, cache_control)), b"" if head else body)
    headers = [("Content-Type", content_type), *identity]
    if ranged:
        headers.append(("Accept-Ranges", "bytes"))
        wanted = WHOLE
        if range_still_valid(request_headers.get("if-range"), etag):
            wanted = parse_range(request_headers.get("range"), size)
        if wanted == UNSATISFIABLE:
            return error_response(range_invalid(digest, size), head, [("Content-Range", f"bytes */{size}"), *identity])
        if wanted != WHOLE:
            first, last = wanted
            length = last - first + 1
            headers += [("Content-Range", f"bytes {first}-{last}/{size}"), ("Content-Length", str(length))]
            return Response(206, headers, b"" if head else _slice(body, first, length))

    headers.append(("Content-Length", str(size)))
    return Response(200, headers, b"" if head else body)


@functools.lru_cache(maxsize=4096)
def _whole_headers(content_type: str, digest: str, size: int, cache_control: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """The 200 head of a manifest, built once per (manifest, cache policy): a repeated
    manifest request only copies it."""
    headers = [("Content-Type", content_type), ("Docker-Content-Digest", digest), ("ETag", f'"{digest}"')]
    if cache_control:
        headers.append(("Cache-Control", cache_control))
    headers.append(("Content-Length", str(size)))
    return tuple(headers)


def _slice(body: Union[bytes, FileSlice], first: int, length: int) -> Union[bytes, FileSlice]:
    if isinstance(body, FileSlice):
        return FileSlice(body.path, body.offset + first, length)
    return body[first:first + length]
