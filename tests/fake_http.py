"""The HTTP plumbing shared by the local stand-ins for third-party APIs (OpenAI, Kubernetes, Render)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

# (method, path, query, JSON body or None, headers) -> (status, JSON-able answer, or a str sent as text/plain);
# headers is the request's email.message.Message: .get() ignores case, as HTTP header names do
Handle = Callable[[str, str, dict[str, list[str]], Any, Any], tuple[int, Any]]


@contextmanager
def serve(handle: Handle) -> Iterator[str]:
    """Serve `handle` on 127.0.0.1 (a free port) until the block ends; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def _do(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, answer = handle(method, url.path, parse_qs(url.query), body, self.headers)
            text = isinstance(answer, str)
            data = answer.encode() if text else json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._do("GET")

        def do_POST(self) -> None:
            self._do("POST")

        def do_DELETE(self) -> None:
            self._do("DELETE")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
