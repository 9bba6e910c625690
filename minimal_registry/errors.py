"""OCI distribution errors: one type that knows its HTTP status and its JSON envelope.

Every error a client sees goes through `RegistryError.body()`, so every error is
`{"errors":[{"code":...,"message":...,"detail":...}]}` (distribution-spec "Error Codes").
"""

import json
from typing import Any, Optional, Sequence, Tuple

# How long a client should wait before retrying a 503 (RFC 9110 section 10.2.3).
RETRY_AFTER_SECONDS = 1


class RegistryError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: Optional[Any] = None,
                 headers: Sequence[Tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = tuple(headers)  # sent with the error (Retry-After)

    def body(self) -> bytes:
        error = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}, separators=(",", ":")).encode()

    def __repr__(self) -> str:
        return f"RegistryError({self.status}, {self.code}, {self.message!r})"


def manifest_unknown(reference: str, why: str = "manifest unknown to this registry") -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", why, {"reference": reference})


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to this registry", {"digest": digest})


def name_unknown(name: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", "repository name not known to this registry", {"name": name})


def name_invalid(name: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", "invalid repository name", {"name": name})


def digest_invalid(digest: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", "provided digest is not a valid sha256 digest", {"digest": digest})


def method_not_allowed(method: str) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", "this registry is read-only: only GET and HEAD are supported",
                         {"method": method})


def unsupported(path: str) -> RegistryError:
    return RegistryError(404, "UNSUPPORTED", "no such endpoint in the registry API", {"path": path})


def bad_parameter(name: str, value: str, why: str) -> RegistryError:
    return RegistryError(400, "UNSUPPORTED", f"invalid query parameter {name}: {why}", {name: value})


def range_invalid(digest: str, size: int) -> RegistryError:
    return RegistryError(416, "RANGE_INVALID", "requested range not satisfiable", {"digest": digest, "size": size})


def unavailable(why: str) -> RegistryError:
    """The content could not be read just now (EMFILE, EIO, a missing tree): retry, it is not a 404.

    UNAVAILABLE is distribution's code for 503 (registry/api/errcode: ErrorCodeUnavailable).
    """
    return RegistryError(503, "UNAVAILABLE", why, headers=[("Retry-After", str(RETRY_AFTER_SECONDS))])
