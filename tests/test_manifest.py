"""The optional LLM manifest, against a local server that answers with the OpenAI API reference's payloads."""

from __future__ import annotations

import json

import pytest

from dispatcher.manifest import CHUNK_CHARS, ManifestFailed, ManifestWorker, Summariser, chunks
from dispatcher.models import JobState

from .conftest import CORPUS, wait_final, wait_for
from .fake_openai import MANIFEST, RATE_LIMITED, SERVER_ERROR, FakeOpenAI, chat_completion
from .test_documents import docs  # noqa: F401 (fixture)

OK = (200, chat_completion(json.dumps(MANIFEST)))


def summariser(fake: FakeOpenAI) -> Summariser:
    return Summariser("sk-test-not-a-real-key", fake.url, attempts=4, max_wait_s=0.2)


def test_chunks_are_bounded_and_split_at_page_boundaries():
    pages = [(n, "word " * 2000) for n in range(1, 8)]  # 10 000 characters a page
    parts = chunks(pages, limit=CHUNK_CHARS)
    assert all(len(p) <= CHUNK_CHARS for p in parts)
    assert "".join(parts).count("=== page ") == 7
    assert parts[1].startswith("=== page 3 ===")


def test_structured_output_is_validated_into_the_schema():
    with FakeOpenAI([OK]).serve() as fake:
        m = summariser(fake).manifest([(1, "Dear Jane Doe, ...")])
    assert m.document_type == "letter" and m.encounters[0].pages == [1]
    [req] = fake.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["response_format"]["type"] == "json_schema"
    assert req["body"]["response_format"]["json_schema"]["strict"] is True
    assert "=== page 1 ===" in req["body"]["messages"][1]["content"]


def test_429_and_5xx_are_retried_with_backoff():
    with FakeOpenAI([RATE_LIMITED, SERVER_ERROR, OK]).serve() as fake:
        s = summariser(fake)
        m = s.manifest([(1, "text")])
    assert m.summary == MANIFEST["summary"] and s.calls == 3 and len(fake.requests) == 3


def test_a_reply_that_breaks_the_schema_is_retried_then_given_up_as_temporary():
    broken = (200, chat_completion(json.dumps({"document_type": "letter"})))  # required fields missing
    with FakeOpenAI([broken, OK]).serve() as fake:
        assert summariser(fake).manifest([(1, "text")]).people == ["Jane Doe"]
    with FakeOpenAI([broken] * 4).serve() as fake, pytest.raises(ManifestFailed, match="after retries"):
        summariser(fake).manifest([(1, "text")])


def test_a_client_error_is_not_retried():
    bad_request = (400, {"error": {"message": "Invalid 'messages'", "type": "invalid_request_error",
                                   "param": "messages", "code": None}})
    with FakeOpenAI([bad_request, OK]).serve() as fake, pytest.raises(ManifestFailed):
        summariser(fake).manifest([(1, "text")])
    assert len(fake.requests) == 1


def test_the_dispatcher_summarises_a_succeeded_document_outside_its_cell(docs):  # noqa: F811
    with FakeOpenAI([RATE_LIMITED, OK]).serve() as fake:
        q = docs.start(summarise=True)
        worker = ManifestWorker(q, summariser(fake), every_s=0.2)
        worker.start()
        try:
            job_id = docs.submit(CORPUS / "tesseract-phototest.tif")
            [job] = wait_final(q, [job_id], timeout=300)
            assert job.state is JobState.SUCCEEDED, job.reason
            wait_for(lambda: (r := q.result(job_id)) is not None and r.manifest_status == "done", timeout=60,
                     what="the manifest")
        finally:
            worker.stop()
    result = q.result(job_id)
    assert result is not None and result.manifest == MANIFEST
    assert len(fake.requests) == 2
    assert "quick brown" in fake.requests[-1]["body"]["messages"][1]["content"]
    assert fake.requests[-1]["auth"] == "Bearer sk-test-not-a-real-key"
    assert all("sk-test" not in (a.log_tail or "") for a in q.attempts(job_id))
