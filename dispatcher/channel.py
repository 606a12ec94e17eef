"""The result channel, read on the trusted side: every line a cell emits is checked before anything is stored.

Pure: fed bytes, calls `store` for each accepted page. A cell is held to its own (job, attempt), to the page
count it declared once, to pages not stored by an earlier attempt, and to size bounds; the first breach
refuses the attempt (Refused), and nothing the cell says decides anything but its own pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from job_image.contract import DocumentInfo, Done, Limits, Need, PageResult, Peak, Record, decode, reason_text


class Refused(Exception):
    """The cell broke the contract; the message says how (already safe to show)."""


@dataclass
class ChannelReader:
    job_id: int
    attempt: int
    earlier_pages: frozenset[int]  # stored by earlier attempts, as the header told the cell
    max_pages: int
    store: Callable[[PageResult], bool]  # False: the attempt is no longer current, stop storing
    declare: Callable[[DocumentInfo], None] = lambda _d: None  # progress: the page count, once
    limits: Limits = field(default_factory=Limits)
    document: DocumentInfo | None = None
    pages: set[int] = field(default_factory=set)
    peak_bytes: int | None = None
    need_bytes: int | None = None
    done: bool = False
    stale: bool = False
    consumed: int = 0  # bytes of the stream taken so far (a re-read stream skips them)
    _partial: bytearray = field(default_factory=bytearray)
    _oversized: bool = False

    def feed(self, chunk: bytes) -> None:
        self.consumed += len(chunk)
        while chunk:
            line, newline, chunk = chunk.partition(b"\n")
            if len(self._partial) + len(line) > self.limits.max_record_bytes:
                raise Refused(f"emitted a record larger than {self.limits.max_record_bytes // (1024 * 1024)} MiB")
            self._partial += line
            if newline:
                record, self._partial = bytes(self._partial), bytearray()
                if record.strip():
                    self._take(record)
        if self.consumed > self._budget():
            raise Refused(f"emitted more than {self._budget() // (1024 * 1024)} MiB of results")

    def feed_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.feed(chunk)
        if self._partial.strip():
            raise Refused("ended in the middle of a record")

    def _budget(self) -> int:
        pages = self.document.pages if self.document else 0
        return (pages + 1) * self.limits.max_total_bytes_per_page  # one page's worth for the other records

    def _take(self, line: bytes) -> None:
        try:
            record = decode(line)
        except ValueError as e:
            raise Refused(f"emitted something that is not a result record: {reason_text(str(e))}") from None
        if (record.job, record.attempt) != (self.job_id, self.attempt):
            raise Refused(f"emitted a record for job {record.job} attempt {record.attempt}; "
                          f"it is job {self.job_id} attempt {self.attempt}")
        if self.done and not isinstance(record, Peak):  # the peak is measured last, as the cell exits
            raise Refused("emitted records after its done record")
        self._accept(record)

    def _accept(self, record: Record) -> None:
        if isinstance(record, DocumentInfo):
            if self.document is not None:
                raise Refused("declared its document twice")
            if record.pages > self.max_pages:
                raise Refused(f"declared {record.pages} pages; at most {self.max_pages} are allowed")
            self.document = record
            self.declare(record)
        elif isinstance(record, PageResult):
            self._page(record)
        elif isinstance(record, Need):
            if self.need_bytes is not None:
                raise Refused("declared its memory need twice")
            self.need_bytes = record.bytes
        elif isinstance(record, Peak):
            self.peak_bytes = record.bytes
        elif isinstance(record, Done):
            missing = self.missing()
            if self.document is None or missing:
                raise Refused(f"claimed to be done with {len(missing) if self.document else 'all'} page(s) "
                              "never emitted")
            self.done = True

    def _page(self, p: PageResult) -> None:
        if self.document is None:
            raise Refused("emitted a page before declaring its document")
        if p.page > self.document.pages:
            raise Refused(f"emitted page {p.page} of a document it declared to have {self.document.pages}")
        if p.page in self.pages or p.page in self.earlier_pages:
            raise Refused(f"emitted page {p.page} twice")
        if len(p.text) > self.limits.max_text_chars or len(p.words) > self.limits.max_words:
            raise Refused(f"emitted page {p.page} with {len(p.text)} characters and {len(p.words)} words "
                          f"(at most {self.limits.max_text_chars} and {self.limits.max_words})")
        if "\x00" in p.text or any("\x00" in w.text for w in p.words):
            raise Refused(f"emitted page {p.page} with NUL characters in its text")
        self.pages.add(p.page)
        if not self.stale and not self.store(p):
            self.stale = True  # the attempt moved on (lease lost, cancelled): keep reading, store nothing

    def missing(self) -> list[int]:
        total = self.document.pages if self.document else 0
        have = self.pages | self.earlier_pages
        return [n for n in range(1, total + 1) if n not in have]

    def incomplete(self) -> str | None:
        """Why an exit 0 cannot count as success, or None when the result is whole."""
        if self.done:
            return None
        if self.document is None:
            return "exited 0 without emitting a result"
        return f"exited 0 with {len(self.missing())} of {self.document.pages} pages missing and no done record"
