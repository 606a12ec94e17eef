"""A small upload service on jobcell's client API: what a Flask or Django upload handler does, in the standard
library so that it runs anywhere jobcell does.

    POST /upload?name=scan.pdf&tenant=clinic-7   body: the document   -> 202 {"job": 12}
    GET  /jobs/12                                                     -> {"state": ..., "pages": ..., "text": ...}

It never polls: one thread listens to jobcell's events and records each job's end as it commits (`told`).

    JOBCELL_DATABASE_URL=... JOBCELL_STORE_DIR=... python -m examples.upload_app --port 8080
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer, make_server

from jobcell import Client, JobcellError, NotFound

Start = Callable[[str, list[tuple[str, str]]], Any]
MAX_UPLOAD = 200 * 1000 * 1000


class UploadApp:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.ended: dict[int, str] = {}  # job -> final state, as the event told us
        self.closing = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="jobcell-events", daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        while not self.closing.is_set():
            try:
                for event in self.client.events(timeout=1.0):
                    if event.state in ("succeeded", "failed", "cancelled"):
                        self.ended[event.job] = event.state
            except JobcellError:  # the database went away: listen again (a real app would also re-read its jobs)
                self.closing.wait(1.0)

    def __call__(self, environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        try:
            if method == "POST" and path == "/upload":
                return self._upload(environ, start)
            if method == "GET" and path.startswith("/jobs/") and path[6:].isdigit():
                return self._job(int(path[6:]), start)
            return _json(start, "404 Not Found", {"error": "POST /upload or GET /jobs/<id>"})
        except NotFound as e:
            return _json(start, "404 Not Found", {"error": str(e)})

    def _upload(self, environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        if not 0 < size <= MAX_UPLOAD:
            return _json(start, "413 Payload Too Large", {"error": f"send 1 to {MAX_UPLOAD} bytes"})
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        job = self.client.submit(environ["wsgi.input"].read(size), name=query.get("name", "upload"),
                                 metadata={"tenant": query.get("tenant", "")})
        return _json(start, "202 Accepted", {"job": job.id, "state": job.state, "new": job.new})

    def _job(self, job_id: int, start: Start) -> Iterable[bytes]:
        job = self.client.get(job_id)
        body: dict[str, Any] = {"job": job.id, "state": job.state, "told": job_id in self.ended,
                                "pages": job.pages_done, "of": job.pages_total, "reason": job.reason,
                                "metadata": job.metadata}
        if job.succeeded:
            body["text"] = self.client.result(job_id).text
        return _json(start, "200 OK", body)


def _json(start: Start, status: str, body: dict[str, Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def serve(client: Client, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    return make_server(host, port, UploadApp(client))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args()
    with Client() as client:
        server = serve(client, port=a.port)
        print(f"listening on http://127.0.0.1:{server.server_port}")
        server.serve_forever()


if __name__ == "__main__":
    main()
