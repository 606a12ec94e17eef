"""The client API: what an application (an upload handler, a worker, a notebook) uses to submit documents and
hear back. The `jobcell` CLI is built on it. Configuration comes from the same JOBCELL_* variables as the
dispatcher (only the database and the store are used here)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from dispatcher.errors import DatabaseUnavailable, JobcellError
from dispatcher.models import ALL_TIERS, Job, JobState, NewJob, Pause
from dispatcher.ports import DocumentStore
from dispatcher.queue import EVENTS_CHANNEL, PostgresQueue
from dispatcher.settings import Settings, check_webhook_url, load_settings
from dispatcher.views import NO_RESULT
from dispatcher.wiring import build_queue, build_store

Document = str | os.PathLike[str] | bytes | BinaryIO


@dataclass(frozen=True)
class JobView:
    """A job as an application sees it."""

    id: int
    state: str
    size_class: str
    tier: str
    attempt: int
    max_attempts: int
    reason: str | None
    source: str | None
    metadata: dict[str, Any]
    pages_done: int
    pages_total: int | None
    created_at: datetime
    finished_at: datetime | None
    new: bool = False  # from submit(): True when it made this job, False when the same one existed

    @property
    def final(self) -> bool:
        return JobState(self.state).final

    @property
    def succeeded(self) -> bool:
        return self.state == JobState.SUCCEEDED.value


@dataclass(frozen=True)
class Page:
    page: int
    text: str
    words: list[dict[str, Any]]
    mean_confidence: float | None


@dataclass(frozen=True)
class Result:
    """A succeeded document: its pages in order, their words with boxes, and the manifest if one was made."""

    job_id: int
    media_type: str | None
    page_count: int | None
    pages: list[Page]
    manifest_status: str | None = None
    manifest: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "\n\n".join(p.text for p in self.pages)


@dataclass(frozen=True)
class Event:
    """One state change, as sent on the jobcell_events channel."""

    job: int
    state: str
    attempt: int
    tier: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


class Client:
    def __init__(self, settings: Settings | None = None, *, queue: PostgresQueue | None = None,
                 store: DocumentStore | None = None) -> None:
        self.settings = settings or load_settings()
        self.queue = queue or build_queue(self.settings)
        self._store = store

    @property
    def store(self) -> DocumentStore:
        if self._store is None:
            self._store = build_store(self.settings)
        return self._store

    def close(self) -> None:
        self.queue.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- submit ---------------------------------------------------------------------------------------

    def submit(self, document: Document, *, name: str | None = None, size_class: str | None = None,
               priority: int = 0, lang: str | None = None, max_attempts: int | None = None,
               metadata: dict[str, Any] | None = None, force: bool = False,
               webhook_url: str | None = None) -> JobView:
        """Store a document (a path, bytes, a binary file object, or an s3:// URI already stored) and enqueue it.

        The same bytes with the same options return the job already made (whatever its state: see retry());
        other options, or force=True, make a new job. `webhook_url` is sent a signed event when the job ends
        (verify it with jobcell.verify_webhook), besides the deployment's JOBCELL_WEBHOOK_URL."""
        table = self.settings.table()
        if size_class is not None and size_class not in table.names:
            raise JobcellError(f"no size class {size_class!r}; known: {', '.join(table.names)}")
        if webhook_url is not None:
            try:
                check_webhook_url(webhook_url)
            except ValueError as e:
                raise JobcellError(str(e)) from None
        params: dict[str, Any] = {"lang": lang} if lang else {}
        with _as_path(document, name) as (path, source):
            if path.startswith("s3://"):
                size, key = self.store.stat(path)
                uri = path
            else:
                uri, size, key = self.store.put(path)
        key = _unique_key(key, params, force)
        job = NewJob(document_uri=uri, document_bytes=size, unique_key=key, source=source,
                     size_class=size_class or table.for_size(size).name, params=params, priority=priority,
                     max_attempts=max_attempts or self.settings.max_attempts, metadata=dict(metadata or {}),
                     webhook_url=webhook_url)
        job_id, created = self.queue.submit(job)
        return replace(self.get(job_id), new=created)

    # -- read -----------------------------------------------------------------------------------------

    def get(self, job_id: int) -> JobView:
        job = self.queue.get(job_id)
        done, _ = self.queue.progress([job_id]).get(job_id, (0, None))
        return _view(job, done)

    def result(self, job_id: int) -> Result:
        row = self.queue.result(job_id) or NO_RESULT
        pages = [Page(p.page, p.text, list(p.words), p.mean_confidence) for p in self.queue.pages(job_id)]
        return Result(job_id, row.media_type, row.page_count, pages, row.manifest_status,
                      row.manifest)

    def wait(self, job_id: int, timeout: float | None = None) -> JobView:
        """Until the job is final; TimeoutError (naming its state) if `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._listening() as conn:
            while True:
                view = self.get(job_id)  # read after LISTEN: no change can slip between
                if view.final:
                    return view
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} is still {view.state} after {timeout:g} s")
                _next_notify(conn, 5.0 if left is None else min(5.0, left))  # also polls, in case one is missed

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every state change of every job, as it commits; stops after `timeout` seconds without one. Raises
        DatabaseUnavailable when the connection is lost: listen again, and read what you missed with get()."""
        with self._listening() as conn:
            while True:
                got = _next_notify(conn, timeout)
                if got is None:
                    return
                raw = json.loads(got)
                yield Event(int(raw["job"]), str(raw["state"]), int(raw["attempt"]), str(raw["tier"]), raw)

    # -- change ---------------------------------------------------------------------------------------

    def cancel(self, job_id: int) -> str:
        """Cancel: a queued job at once, a running one is killed within seconds. Its state now."""
        return self.queue.cancel(job_id)

    def retry(self, job_id: int, attempts: int | None = None) -> JobView:
        """Run a failed or cancelled job again, with `attempts` more (default JOBCELL_MAX_ATTEMPTS); its
        attempts so far are kept and the new ones number on from them."""
        self.queue.retry(job_id, attempts or self.settings.max_attempts)
        return self.get(job_id)

    def pause(self, size_class: str = ALL_TIERS, reason: str | None = None) -> Pause:
        """Stop starting jobs of a class (default: every class); running jobs go on, queued ones wait."""
        return self.queue.pause(size_class, reason)

    def resume(self, size_class: str = ALL_TIERS) -> bool:
        """Start jobs of that class again; False if it was not paused."""
        return self.queue.resume(size_class)

    def paused(self) -> list[Pause]:
        return self.queue.paused()

    @contextlib.contextmanager
    def _listening(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection that listens to the events channel; a lost connection is a DatabaseUnavailable."""
        try:
            with psycopg.connect(self.settings.dsn(), autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                yield conn
        except psycopg.OperationalError as e:
            raise DatabaseUnavailable(f"lost the events connection: {str(e).strip().splitlines()[0]}") from None


def _next_notify(conn: psycopg.Connection[Any], timeout: float | None) -> str | None:
    """The next notification's payload, or None after `timeout` seconds."""
    for notify in conn.notifies(timeout=timeout, stop_after=1):
        return notify.payload
    return None


def _view(job: Job, pages_done: int) -> JobView:
    return JobView(id=job.id, state=job.state.value, size_class=job.size_class, tier=job.tier, attempt=job.attempt,
                   max_attempts=job.max_attempts, reason=job.reason, source=job.source, metadata=job.metadata,
                   pages_done=pages_done, pages_total=job.pages_total, created_at=job.created_at,
                   finished_at=job.finished_at)


def _unique_key(content_key: str, params: dict[str, Any], force: bool) -> str:
    """The same document is the same job only with the same options that change its result."""
    key = content_key
    if params:
        key += "|" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return key + (f"|{uuid.uuid4()}" if force else "")


@contextlib.contextmanager
def _as_path(document: Document, name: str | None) -> Iterator[tuple[str, str]]:
    """A local path (or s3:// URI) for the store, and what to show as the document's source."""
    if isinstance(document, str | os.PathLike):
        text = os.fspath(document)
        yield text, name or text
        return
    suffix = Path(name or "").suffix[:8]
    with tempfile.TemporaryDirectory(prefix="jobcell-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        with path.open("wb") as f:
            if isinstance(document, bytes):
                f.write(document)
            else:
                shutil.copyfileobj(document, f, 1024 * 1024)
        yield str(path), name or "upload"


__all__ = ["Client", "Document", "Event", "JobView", "Page", "Pause", "Result"]
