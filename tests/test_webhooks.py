"""Webhooks against a real receiver on loopback and the real queue: signed events when jobs end, retried with
backoff, delivered after a dispatcher (re)starts, never in the dispatch loop's way."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dispatcher.database import Database
from dispatcher.memory import MemoryRuntime
from dispatcher.models import JobState, NewJob
from dispatcher.queue import PostgresQueue
from dispatcher.signing import sign
from dispatcher.webhooks import WebhookDeliverer, WebhookOptions
from jobcell import BadSignature, verify_webhook

from .conftest import sql, wait_final, wait_for

SECRET = "test-webhook-secret-0123456789"


@dataclass
class Receiver:
    """An application's webhook endpoint: answers each request with the next scripted status (then 200)."""

    statuses: list[int] = field(default_factory=list)
    hang_s: float = 0.0
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    url: str = ""

    @contextlib.contextmanager
    def serve(self) -> Iterator[Receiver]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.arrived.append(time.monotonic())
                if receiver.hang_s:
                    time.sleep(receiver.hang_s)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.got.append(({k: v for k, v in self.headers.items()}, body))
                receiver.answered.append(status)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/jobcell?token=app-secret"
        try:
            yield self
        finally:
            server.shutdown()

    def events(self) -> list[dict[str, Any]]:
        return [verify_webhook(SECRET, headers, body) for headers, body in self.got]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver().serve() as r:
        yield r


def deliverer(db_url: str, url: str | None = None, **kw: Any) -> WebhookDeliverer:
    options = WebhookOptions(**{"url": url, "secret": SECRET, "timeout_s": 2.0, "backoff_s": 0.2, "every_s": 0.1,
                                **kw})
    return WebhookDeliverer(Database(db_url), options)


def submit(queue: PostgresQueue, webhook_url: str | None = None, **params: Any) -> int:
    job_id, _ = queue.submit(NewJob("diag:", 0, f"diag:{uuid.uuid4()}", "small", workload="diag", params=params,
                                    max_attempts=1, metadata={"tenant": "clinic-7"}, webhook_url=webhook_url))
    return job_id


@pytest.fixture
def running(db_url: str) -> Iterator[list[WebhookDeliverer]]:
    started: list[WebhookDeliverer] = []
    yield started
    for d in started:
        d.stop()


def test_a_job_that_ends_is_told_to_its_own_url_and_the_deployments_signed(
        queue, start_dispatcher, pool, db_url, receiver, running):
    with Receiver().serve() as deployment:
        start_dispatcher(rt=MemoryRuntime(pool=pool))
        d = deliverer(db_url, url=deployment.url)
        running.append(d)
        d.start()
        ok, bad = submit(queue, receiver.url, alloc_mib=5), submit(queue, receiver.url, exit_code=65,
                                                                   message="page 2 is not an image")
        wait_final(queue, [ok, bad], timeout=30)
        wait_for(lambda: len(receiver.got) == 2 and len(deployment.got) == 2, timeout=30, what="four deliveries")
    events = {e["job"]["id"]: e for e in receiver.events()}
    assert {e["job"]["id"]: e["id"] for e in deployment.events()} == {j: e["id"] for j, e in events.items()}
    assert events[ok]["type"] == "job.succeeded" and events[bad]["type"] == "job.failed"
    assert events[bad]["job"]["reason"] == "page 2 is not an image"
    assert events[ok]["job"]["metadata"] == {"tenant": "clinic-7"} and events[ok]["job"]["attempts"] == 1
    headers, body = receiver.got[0]
    assert headers["Jobcell-Event-Id"] == json.loads(body)["id"]
    assert b"diag:" not in body  # what the job was about stays out: the application asks the client
    wait_for(lambda: sql(db_url, "SELECT count(*) FROM webhook_outbox") == [(0,)], timeout=10,
             what="an empty outbox once all is delivered")


def test_a_failing_receiver_gets_the_event_again_with_backoff(queue, start_dispatcher, pool, db_url, receiver,
                                                              running):
    receiver.statuses = [500, 503]
    start_dispatcher(rt=MemoryRuntime(pool=pool))
    job = submit(queue, receiver.url)
    wait_final(queue, [job], timeout=30)
    d = deliverer(db_url)
    running.append(d)
    d.start()
    wait_for(lambda: receiver.answered == [500, 503, 200], timeout=30, what="two failures, then a delivery")
    assert len({e["id"] for e in receiver.events()}) == 1  # the same event each time: receivers dedupe on it


def test_events_of_jobs_that_ended_with_no_deliverer_running_are_sent_when_one_starts(
        queue, start_dispatcher, pool, db_url, receiver, running):
    start_dispatcher(rt=MemoryRuntime(pool=pool))
    jobs = [submit(queue, receiver.url) for _ in range(3)]
    wait_final(queue, jobs, timeout=30)
    time.sleep(0.5)
    assert receiver.got == []
    d = deliverer(db_url)
    running.append(d)
    d.start()
    wait_for(lambda: len(receiver.got) == 3, timeout=30, what="three deliveries")
    assert sorted(e["job"]["id"] for e in receiver.events()) == sorted(jobs)


def test_a_hanging_receiver_never_holds_up_dispatch(queue, start_dispatcher, pool, db_url, receiver, running):
    receiver.hang_s = 5.0
    start_dispatcher(rt=MemoryRuntime(pool=pool))
    d = deliverer(db_url, timeout_s=10.0)
    running.append(d)
    d.start()
    first = submit(queue, receiver.url)
    wait_final(queue, [first], timeout=30)
    wait_for(lambda: receiver.arrived, timeout=10, what="a delivery under way")
    started = time.monotonic()
    later = [submit(queue, receiver.url, alloc_mib=1) for _ in range(4)]
    jobs = wait_final(queue, later, timeout=30)
    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    assert time.monotonic() - started < 4.0  # while the receiver still sits on the first event


def test_verify_webhook_refuses_a_tampered_body_a_wrong_secret_and_a_replay():
    body = b'{"id":"e1","type":"job.succeeded"}'
    header = {"Jobcell-Signature": sign(SECRET, body)}
    assert verify_webhook(SECRET, header, body)["id"] == "e1"
    with pytest.raises(BadSignature, match="does not match"):
        verify_webhook(SECRET, header, body.replace(b"succeeded", b"failed"))
    with pytest.raises(BadSignature, match="does not match"):
        verify_webhook("another-secret-0123456789", header, body)
    old = {"Jobcell-Signature": sign(SECRET, body, timestamp=int(time.time()) - 3600)}
    with pytest.raises(BadSignature, match="older than 300 s"):
        verify_webhook(SECRET, old, body)
    with pytest.raises(BadSignature, match="no Jobcell-Signature"):
        verify_webhook(SECRET, {}, body)
