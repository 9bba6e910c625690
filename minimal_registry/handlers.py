"""One function per endpoint: a Request in, a Response out. GET and HEAD share one path.

Handlers know the content tree and the response values; they know nothing of WSGI or gevent.
Failures are raised as RegistryError and written by `app`.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional
from urllib.parse import quote

from minimal_registry import errors, manifest
from minimal_registry.responses import IMMUTABLE, FileSlice, Response, client_number, content_response, json_response
from minimal_registry.storage import ContentTree


@dataclass(frozen=True)
class Request:
    method: str  # GET or HEAD: `app` answers every other method itself
    path: str
    query: Dict[str, str] = field(default_factory=dict)
    headers: Dict[str, str] = field(default_factory=dict)  # lower-case names

    @property
    def head(self) -> bool:
        return self.method == "HEAD"

    @property
    def namespace(self) -> Optional[str]:
        """containerd's `?ns=<upstream host>` on every mirror request."""
        return self.query.get("ns") or None


def base(tree: ContentTree, request: Request) -> Response:
    return _json(request, json_response(200, {}))


def manifest_content(tree: ContentTree, request: Request, name: str, ref: str) -> Response:
    stored = tree.manifest(name, ref, request.namespace)
    # Served under its digest, the bytes can never change; a tag can be re-pointed.
    cache = IMMUTABLE if ref == stored.digest else "no-cache"
    return content_response(request.headers, request.head, digest=stored.digest, size=stored.size,
                            content_type=stored.media_type, body=stored.body, ranged=False,
                            cache_control=cache)


def blob_content(tree: ContentTree, request: Request, name: str, digest: str) -> Response:
    blob = tree.blob(name, digest, request.namespace)
    return content_response(request.headers, request.head, digest=blob.digest, size=blob.size,
                            content_type="application/octet-stream",
                            body=FileSlice(blob.path, 0, blob.size), ranged=True, cache_control=IMMUTABLE)


def tags_list(tree: ContentTree, request: Request, name: str) -> Response:
    tags, link = _page(tree.tags(name, request.namespace), request, f"/v2/{name}/tags/list")
    return _json(request, json_response(200, {"name": name, "tags": tags}, link))


def catalog(tree: ContentTree, request: Request) -> Response:
    names, link = _page(tree.repository_names(), request, "/v2/_catalog")
    return _json(request, json_response(200, {"repositories": names}, link))


def referrers(tree: ContentTree, request: Request, name: str, digest: str) -> Response:
    wanted_type = request.query.get("artifactType")
    descriptors = []
    for stored in tree.referrers(name, digest, request.namespace):
        artifact_type = stored.artifact_type or (stored.config.media_type if stored.config else None)
        if wanted_type and artifact_type != wanted_type:
            continue
        descriptor = {"mediaType": stored.media_type, "digest": stored.digest, "size": stored.size}
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        if stored.annotations:
            descriptor["annotations"] = stored.annotations
        descriptors.append(descriptor)
    index = {"schemaVersion": 2, "mediaType": manifest.OCI_INDEX, "manifests": descriptors}
    filters = [("OCI-Filters-Applied", "artifactType")] if wanted_type else []
    return _json(request, json_response(200, index, filters, content_type=manifest.OCI_INDEX))


def _page(items: List[str], request: Request, path: str):
    """distribution-spec pagination: `?n=` and `?last=`, and a Link header when more remain."""
    last = request.query.get("last")
    if last:
        items = [i for i in items if i > last]
    n_text = request.query.get("n")
    if n_text is None or n_text == "":
        return items, []
    n = client_number(n_text, ceiling=len(items))
    if n is None:
        raise errors.bad_parameter("n", n_text[:100], "must be a non-negative integer (ASCII digits)")
    page = items[:n]
    if len(items) > n and page:
        query = f"n={n}&last={quote(page[-1], safe='/')}"
        return page, [("Link", f'<{path}?{query}>; rel="next"')]
    return page, []


def _json(request: Request, response: Response) -> Response:
    if request.head:
        response.body = b""
    return response
