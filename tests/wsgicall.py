"""Call the WSGI app in-process, through wsgiref's validator, as a plain function."""

import io
import wsgiref.util
import wsgiref.validate
from typing import Dict, NamedTuple, Optional

from minimal_registry.app import RegistryApp
from minimal_registry.storage import ContentTree


class Answer(NamedTuple):
    status: int
    headers: Dict[str, str]
    body: bytes

    def json(self):
        import json

        return json.loads(self.body)


def call(app: RegistryApp, method: str, target: str, headers: Optional[Dict[str, str]] = None) -> Answer:
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "SCRIPT_NAME": "", "wsgi.input": io.BytesIO(b"")}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    wsgiref.util.setup_testing_defaults(environ)
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = {k: v for k, v in response_headers}
        return lambda data: None

    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()
    return Answer(captured["status"], captured["headers"], body)


def app_for(root) -> RegistryApp:
    return RegistryApp(ContentTree(root))
