"""The result channel's checks, on the pure reader: what a cell may emit, and the first thing it may not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dispatcher.channel import ChannelReader, Refused
from job_image.contract import DocumentInfo, Done, Limits, Need, PageResult, Peak, Word, encode

JOB, ATTEMPT = 7, 2


def reader(earlier: frozenset[int] = frozenset(), max_pages: int = 100, **limits: Any) -> ChannelReader:
    stored: list[int] = []
    r = ChannelReader(JOB, ATTEMPT, earlier, max_pages, lambda p: stored.append(p.page) or True,
                      limits=Limits(**limits))
    r.stored = stored  # type: ignore[attr-defined]
    return r


def doc(pages: int) -> bytes:
    return encode(DocumentInfo(job=JOB, attempt=ATTEMPT, media_type="application/pdf", pages=pages))


def page(n: int, job: int = JOB, text: str = "text", words: int = 1) -> bytes:
    return encode(PageResult(job=job, attempt=ATTEMPT, page=n, dpi=200, width=10, height=10, text=text,
                             words=[Word(text="w", left=0, top=0, width=1, height=1, conf=90)] * words,
                             ocr_seconds=0.1))


DONE = encode(Done(job=JOB, attempt=ATTEMPT))


def test_a_whole_result_in_any_chunking_is_accepted():
    stream = doc(3) + page(1) + page(3) + DONE + encode(Peak(job=JOB, attempt=ATTEMPT, bytes=123))
    r = reader(earlier=frozenset({2}))
    r.feed_all(stream[i:i + 7] for i in range(0, len(stream), 7))  # records cut mid-line
    assert r.done and r.incomplete() is None and r.stored == [1, 3] and r.peak_bytes == 123  # type: ignore[attr-defined]


def test_the_need_is_taken_once():
    r = reader()
    r.feed_all([doc(1), encode(Need(job=JOB, attempt=ATTEMPT, bytes=99 * 2**20)), page(1), DONE])
    assert r.done and r.need_bytes == 99 * 2**20


@pytest.mark.parametrize("stream, says", [
    (doc(1) + page(1, job=8), "a record for job 8 attempt 2; it is job 7 attempt 2"),
    (doc(1) + page(1) + page(2), "page 2 of a document it declared to have 1"),
    (doc(2) + page(1) + page(1), "page 1 twice"),
    (page(1), "a page before declaring its document"),
    (doc(1) + doc(1), "declared its document twice"),
    (doc(1) + encode(Need(job=JOB, attempt=ATTEMPT, bytes=1)) * 2, "declared its memory need twice"),
    (doc(500), "declared 500 pages; at most 100"),
    (doc(2) + page(1) + DONE, "claimed to be done with 1 page(s) never emitted"),
    (doc(1) + page(1) + DONE + page(1), "after its done record"),
    (b"hello\n", "not a result record"),
    (json.dumps({"job": JOB, "attempt": ATTEMPT, "type": "state", "state": "succeeded"}).encode() + b"\n",
     "not a result record"),
    (doc(1) + page(1, text="a\x00b"), "NUL characters"),
    (doc(1) + page(1, words=11), "at most 200000 and 10"),
    (doc(1) + b'{"job": 7', "ended in the middle of a record"),
])
def test_the_first_breach_refuses_the_attempt(stream, says):
    with pytest.raises(Refused, match=says.replace("(", r"\(").replace(")", r"\)")):
        reader(max_words=10).feed_all([stream])


def test_pages_of_earlier_attempts_cannot_be_sent_again():
    with pytest.raises(Refused, match="page 2 twice"):
        reader(earlier=frozenset({2})).feed_all([doc(3) + page(2)])


def test_an_oversized_record_is_refused_without_holding_it():
    r = reader(max_record_bytes=1024)
    r.feed(doc(1))
    with pytest.raises(Refused, match="larger than"):
        for _ in range(10_000):  # 10 MB of one line, fed in small pieces: refused after the first KiB
            r.feed(b"x" * 1000)
    assert len(r._partial) <= 1024


def test_the_stream_is_bounded_by_the_declared_pages():
    r = reader(max_total_bytes_per_page=2048)
    with pytest.raises(Refused, match="emitted more than"):
        r.feed_all([doc(1) + page(1, text="x" * 5000)])  # 4 KiB: the page and one spare


def test_a_stale_attempt_stores_nothing_more_but_is_not_refused():
    calls: list[int] = []
    r = ChannelReader(JOB, ATTEMPT, frozenset(), 10, lambda p: calls.append(p.page) or False)
    r.feed_all([doc(2) + page(1) + page(2) + DONE])
    assert calls == [1] and r.stale and r.done


@pytest.mark.parametrize("stream, why", [
    (b"", "without emitting a result"),
    (doc(3) + page(1), "2 of 3 pages missing"),
])
def test_exit_0_needs_a_whole_result(stream, why):
    r = reader()
    r.feed_all([stream])
    assert why in (r.incomplete() or "")
