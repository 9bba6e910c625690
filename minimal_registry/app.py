"""The WSGI application: route a request, call its handler, write the Response.

This is the one module that speaks WSGI. It works under any WSGI server (the tests drive it
with plain dicts and under `wsgiref.validate`). A file body goes to the server's PEP 3333
`wsgi.file_wrapper` (minimal-registry's own handler sends it with zero-copy sendfile);
without one it is read in large chunks.
"""

import http
import logging
import re
from typing import Callable, Iterable, Tuple
from urllib.parse import parse_qs

from minimal_registry import errors, handlers
from minimal_registry.errors import RegistryError
from minimal_registry.handlers import Request
from minimal_registry.responses import API_VERSION_HEADER, FileSlice, Response, error_response
from minimal_registry.storage import ContentTree

log = logging.getLogger("minimal_registry")

# Where a file is read rather than sent with sendfile (TLS, other WSGI servers): 64 KiB,
# below glibc's mmap threshold (a freed 1 MiB buffer raises it and fragments the heap).
READ_CHUNK = 64 * 1024
ALLOWED_METHODS = ("GET", "HEAD")

# Routes are matched against the path only (query parameters never change the route).
# Repository names contain slashes, so `.+` takes everything up to the LAST `/manifests/`,
# `/blobs/`, ... ; the name, tag and digest grammars are checked by the content tree.
ROUTES: Tuple[Tuple["re.Pattern[str]", Callable], ...] = (
    (re.compile(r"/v2/?"), handlers.base),
    (re.compile(r"/v2/_catalog"), handlers.catalog),
    (re.compile(r"/v2/(?P<name>.+)/tags/list"), handlers.tags_list),
    (re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)"), handlers.manifest_content),
    (re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)"), handlers.blob_content),
    (re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)"), handlers.referrers),
)


def route(path: str):
    """(handler, keyword arguments) for a path; RegistryError when no endpoint has it."""
    for pattern, handler in ROUTES:
        match = pattern.fullmatch(path)
        if match:
            return handler, match.groupdict()
    raise errors.unsupported(path)


class RegistryApp:
    def __init__(self, tree: ContentTree):
        self.tree = tree

    def respond(self, request: Request) -> Response:
        """The Response for a request: the whole decision, with no WSGI in sight."""
        try:
            if request.method not in ALLOWED_METHODS:
                raise errors.method_not_allowed(request.method)
            handler, arguments = route(request.path)
            return handler(self.tree, request, **arguments)
        except RegistryError as error:
            extra = [("Allow", ", ".join(ALLOWED_METHODS))] if error.status == 405 else []
            return error_response(error, request.method == "HEAD", extra)

    def __call__(self, environ, start_response) -> Iterable[bytes]:
        request = request_from_environ(environ)
        response = self.respond(request)
        body = response.body
        file = None
        if isinstance(body, FileSlice):
            try:
                # Only a regular file inside the tree, opened non-blocking (treesafety); gone
                # since the lookup: 404; cannot be opened just now (EMFILE, EIO): 503.
                file = self.tree.open_blob(body.path, body.offset + body.length)
            except RegistryError as error:
                response = error_response(error, request.head)
        start_response(_status_line(response.status), response.headers + [API_VERSION_HEADER])
        if file is None:
            return [response.body] if response.body else []
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is not None:
            # PEP 3333: the server sends from the file's position, Content-Length bytes.
            if body.offset:  # a file just opened is at its first byte: no lseek for a whole blob
                file.seek(body.offset)
            return file_wrapper(file, READ_CHUNK)
        return FileChunks(file, body.offset, body.length)


def request_from_environ(environ) -> Request:
    query_string = environ.get("QUERY_STRING", "")
    query = {key: values[0] for key, values in parse_qs(query_string, keep_blank_values=True).items()} if query_string else {}
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    return Request(method=environ["REQUEST_METHOD"], path=environ.get("PATH_INFO", ""), query=query, headers=headers)


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class FileChunks:
    """A file slice as an iterable of large chunks, for servers without zero-copy sending."""

    def __init__(self, file, offset: int, length: int, chunk: int = READ_CHUNK):
        self.file, self.offset, self.length, self.chunk = file, offset, length, chunk

    def __iter__(self):
        self.file.seek(self.offset)
        left = self.length
        while left > 0:
            data = self.file.read(min(self.chunk, left))
            if not data:
                # The file shrank under us: stop; the server closes the short response.
                break
            left -= len(data)
            yield data

    def close(self) -> None:
        self.file.close()
