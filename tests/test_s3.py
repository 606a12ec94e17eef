"""Documents in S3: stored and read by the dispatcher with boto3, streamed into a sealed cell (no network, no
credentials), and handed out as presigned URLs for runtimes that cannot stream.

No S3 or MinIO server can run here, so a stand-in serves the S3 REST API on 127.0.0.1: moto's server mode,
which answers with the request and response shapes of the Amazon S3 API reference. Everything on our side is
the real code: boto3 in the store and the job pipeline in its container.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import boto3
import pytest

from dispatcher.errors import SubmitError
from dispatcher.models import JobState, NewJob
from dispatcher.store import S3Store

from .conftest import CORPUS, wait_final
from .test_documents import Docs, docs  # noqa: F401 (fixture)

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(monkeypatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="docs")
    try:
        yield url
    finally:
        server.stop()


def submit_s3(d: Docs, uri: str, size: int, key: str) -> int:
    assert d.queue is not None
    job_id, _ = d.queue.submit(NewJob(uri, size, key, d.queue._table.for_size(size).name, source=uri))
    return job_id


def test_a_document_in_s3_is_streamed_into_its_cell_and_ocrd(docs, s3):  # noqa: F811
    url = s3
    store = S3Store("docs", endpoint_url=url)
    uri, size, key = store.put(str(CORPUS / "tesseract-phototest.tif"))
    assert uri.startswith("s3://docs/documents/") and store.stat(uri)[0] == size
    q = docs.start(store=store)
    job_id = submit_s3(docs, uri, size, key)
    [job] = wait_final(q, [job_id], timeout=120)
    assert job.state is JobState.SUCCEEDED, job.reason
    assert "quick brown" in q.pages(job_id)[0].text
    assert all("testing" not in (a.log_tail or "") for a in q.attempts(job_id))


def test_missing_objects_and_oversized_documents_are_bad_input(docs, s3):  # noqa: F811
    url = s3
    store = S3Store("docs", endpoint_url=url)
    with pytest.raises(SubmitError, match="cannot read it"):
        store.stat("s3://docs/nope.pdf")
    uri, size, key = store.put(str(CORPUS / "ocrmypdf-multipage.pdf"))  # 1.1 MB
    q = docs.start(store=store, max_input_bytes=500_000)
    big = submit_s3(docs, uri, size, key)
    gone = submit_s3(docs, "s3://docs/documents/deleted.pdf", 1000, "gone")
    wait_final(q, [big, gone], timeout=120)
    assert "the file is 1.1 MB, over the 0.5 MB limit" in (q.get(big).reason or "")
    assert "does not exist" in (q.get(gone).reason or "")
    for job_id in (big, gone):
        assert [a.outcome for a in q.attempts(job_id)] == ["bad_input"]


def test_a_presigned_url_reads_that_one_document_for_minutes(s3):
    """What Kubernetes and Render cells get instead of credentials. (The stand-in does not verify signatures or
    expiry; S3 does: here the URL is shown to be scoped to one key and to carry its expiry.)"""
    import urllib.parse
    import urllib.request

    store = S3Store("docs", endpoint_url=s3)
    uri, size, _ = store.put(str(CORPUS / "tesseract-phototest.tif"))
    url = store.presign(uri, ttl_s=300)
    with urllib.request.urlopen(url) as r:
        assert len(r.read()) == size
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    assert parts.path == "/docs/" + uri.split("/", 3)[3]
    assert query["X-Amz-Expires"] == ["300"] and query["X-Amz-Signature"]
    assert "testing" not in url.replace("X-Amz-Credential=testing", "")  # the key id only, never the secret
