"""The client API (jobcell.Client) and the example upload service built on it, against real Postgres and a real
dispatcher on Docker: submit, dedupe, wait, events, result, retry."""

from __future__ import annotations

import io
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.runtimes.docker import DockerOptions, DockerRuntime
from dispatcher.settings import Settings
from dispatcher.store import LocalStore
from jobcell import Client, StateError

from .conftest import CORPUS, classes_json, wait_for

PHOTO = CORPUS / "tesseract-phototest.tif"


@pytest.fixture
def client(db_url: str, queue: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    for k, v in {"JOBCELL_DATABASE_URL": db_url, "JOBCELL_CLASSES": classes_json(),
                 "JOBCELL_STORE_DIR": str(tmp_path / "store")}.items():
        monkeypatch.setenv(k, v)
    with Client(Settings()) as c:
        yield c


@pytest.fixture
def dispatcher(client: Client, start_dispatcher: Any, docker_client: Any, job_image: str, pool: str,
               queue: Any) -> Any:
    """A dispatcher whose sealed cells get their documents from the client's store."""
    rt = DockerRuntime(DockerOptions(image=job_image, pool=pool, queue_id=queue.queue_id()), client=docker_client,
                       documents=LocalStore(client.settings.store_dir).open)
    return start_dispatcher(rt=rt)


def test_the_same_document_with_the_same_options_is_one_job(client):
    first = client.submit(PHOTO, metadata={"tenant": "clinic-7"})
    assert first.new and first.state == "queued" and first.metadata == {"tenant": "clinic-7"}
    assert client.submit(PHOTO.read_bytes(), name="again.tif").id == first.id  # bytes: the same content
    with PHOTO.open("rb") as f:
        assert not client.submit(f, name="again.tif").new
    assert client.submit(PHOTO, lang="deu").id != first.id  # another language is another result
    assert client.submit(PHOTO, force=True).id != first.id


def test_wait_gives_up_with_the_state_when_nothing_runs_the_job(client):
    job = client.submit(io.BytesIO(PHOTO.read_bytes()), name="scan.tif")
    with pytest.raises(TimeoutError, match=f"job {job.id} is still queued after 0.5 s"):
        client.wait(job.id, timeout=0.5)


def test_a_document_runs_and_the_application_hears_back(client, dispatcher):
    heard: list[tuple[int, str]] = []
    listening = threading.Event()

    def listen() -> None:
        listening.set()
        for event in client.events(timeout=60):
            heard.append((event.job, event.state))
            if event.state == "succeeded":
                return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    listening.wait()
    job = client.submit(PHOTO)
    done = client.wait(job.id, timeout=120)
    t.join(10)
    assert done.succeeded and done.pages_done == done.pages_total == 1
    assert (job.id, "running") in heard and (job.id, "succeeded") in heard
    result = client.result(job.id)
    assert "quick brown" in result.text and result.page_count == 1 and result.pages[0].words


def test_a_failed_job_can_be_retried_keeping_its_history(client, dispatcher):
    job = client.submit(b"just some text, named .pdf", name="notes.pdf")
    failed = client.wait(job.id, timeout=60)
    assert failed.state == "failed" and "unsupported file type" in (failed.reason or "")
    assert not client.submit(b"just some text, named .pdf", name="notes.pdf").new  # dedupe: still that job
    again = client.retry(job.id, attempts=1)
    assert again.state in ("queued", "running") and again.max_attempts == 2
    final = client.wait(job.id, timeout=60)
    assert final.state == "failed" and final.attempt == 2
    assert [a.attempt for a in client.queue.attempts(job.id)] == [1, 2]
    with pytest.raises(StateError, match="only a failed or cancelled job"):
        client.retry(client.submit(PHOTO).id)


def test_the_example_upload_service_is_told_of_completion(client, dispatcher):
    from examples.upload_app import serve

    server = serve(client, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        req = urllib.request.Request(f"{base}/upload?name=scan.tif&tenant=clinic-7", data=PHOTO.read_bytes(),
                                     method="POST")
        with urllib.request.urlopen(req) as r:
            assert r.status == 202
            job = json.loads(r.read())["job"]

        def state() -> dict[str, Any]:
            with urllib.request.urlopen(f"{base}/jobs/{job}") as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        body = wait_for(lambda: (s := state())["told"] and s, timeout=120, what="the completion event")
        assert body["state"] == "succeeded" and "quick brown" in body["text"]
        assert body["metadata"] == {"tenant": "clinic-7"} and body["pages"] == body["of"] == 1
    finally:
        server.shutdown()
        server.get_app().closing.set()  # type: ignore[attr-defined]
