"""The optional LLM pass: a structured manifest of the document, from its OCR text, through the openai SDK.

It runs on the trusted side, never in a cell: a cell parses untrusted bytes and must hold no API key and have
no network. The dispatcher's ManifestWorker summarises each succeeded document whose manifest is pending,
only when OPENAI_API_KEY is set (OPENAI_BASE_URL and JOBCELL_LLM_MODEL optional); otherwise the step is
recorded as skipped. Text goes in bounded chunks; with several chunks, their manifests are merged in one last
call. 429 and 5xx answers, dropped connections and replies that break the schema are retried with backoff;
when retries run out the manifest stays pending and is tried again later, up to MAX_TRIES times.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from pydantic import BaseModel, Field, ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from .background import Periodic

log = logging.getLogger("jobcell.manifest")

CHUNK_CHARS = 24_000  # about 6k tokens of English: well inside every current model's context


class Encounter(BaseModel):
    date: str | None = Field(description="ISO 8601 date if known")
    description: str
    pages: list[int] = Field(description="1-based page numbers where it appears")


class Manifest(BaseModel):
    document_type: str = Field(description="e.g. invoice, letter, medical record, contract, form, article")
    dates: list[str] = Field(description="dates mentioned, ISO 8601 where possible")
    people: list[str]
    organisations: list[str]
    encounters: list[Encounter]
    summary: str = Field(description="at most five sentences")


SYSTEM = ("You read OCR text of one document (pages are marked '=== page N ===') and describe it. "
          "Use only what the text says; leave lists empty rather than guess.")
MERGE = ("You are given manifests of consecutive parts of one document. Merge them into one manifest for the "
         "whole document: deduplicate, keep page numbers, write one summary.")


def chunks(pages: Iterable[tuple[int, str]], limit: int = CHUNK_CHARS) -> list[str]:
    """Page texts joined with page markers, split at page boundaries (a page longer than limit is cut)."""
    out: list[str] = []
    current = ""
    for number, text in pages:
        block = f"=== page {number} ===\n{text.strip()}\n"[:limit]
        if current and len(current) + len(block) > limit:
            out.append(current)
            current = ""
        current += block
    if current:
        out.append(current)
    return out


def _retryable(e: BaseException) -> bool:
    import openai

    if isinstance(e, openai.APIStatusError):
        return e.status_code == 429 or e.status_code >= 500
    return isinstance(e, openai.APIConnectionError | ValidationError | _Unparsed)


class ManifestFailed(Exception):
    """The LLM could not produce a manifest even after retries; tried again later."""


class _Unparsed(Exception):
    """The model answered, but not with the schema (a refusal, or content that does not parse)."""


class Summariser:
    def __init__(self, api_key: str, base_url: str | None = None, model: str = "gpt-4o-mini",
                 attempts: int = 5, max_wait_s: float = 30.0) -> None:
        import openai

        # max_retries=0: tenacity owns retries, so that their number and backoff are ours and logged
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=120)
        self.model = model
        self.retry = Retrying(retry=retry_if_exception(_retryable), stop=stop_after_attempt(attempts),
                              wait=wait_exponential_jitter(multiplier=0.5, max=max_wait_s), reraise=True)
        self.calls = 0

    @classmethod
    def from_environ(cls) -> Summariser | None:
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            return None
        return cls(key, os.environ.get("OPENAI_BASE_URL") or None, os.environ.get("JOBCELL_LLM_MODEL") or "gpt-4o-mini")

    def _ask(self, system: str, user: str) -> Manifest:
        self.calls += 1
        completion = self.client.chat.completions.parse(
            model=self.model, response_format=Manifest,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
        message = completion.choices[0].message
        if message.parsed is None:
            raise _Unparsed(message.refusal or "no parsed content")
        return message.parsed

    def ask(self, system: str, user: str) -> Manifest:
        import openai

        try:
            for attempt in self.retry:
                with attempt:
                    return self._ask(system, user)
        except (openai.APIError, ValidationError, _Unparsed) as e:
            raise ManifestFailed(f"the LLM manifest failed after retries: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    def manifest(self, pages: Sequence[tuple[int, str]]) -> Manifest:
        parts = [self.ask(SYSTEM, chunk) for chunk in chunks(pages)]
        if len(parts) == 1:
            return parts[0]
        merged = "\n".join(p.model_dump_json() for p in parts)
        return self.ask(MERGE, merged[: CHUNK_CHARS * 2])


def describe(manifest: Manifest) -> dict[str, Any]:
    return manifest.model_dump()


MAX_TRIES = 5


class ManifestStore(Protocol):
    def pending_manifests(self, limit: int) -> list[tuple[int, int]]:
        """(job id, tries so far) of succeeded documents whose manifest is due now."""

    def page_texts(self, job_id: int) -> list[tuple[int, str]]: ...

    def put_manifest(self, job_id: int, status: str, model: str | None, manifest: dict[str, Any] | None,
                     error: str | None = None, retry_in_s: float = 0.0) -> None: ...


class ManifestWorker(Periodic):
    """Summarises succeeded documents on a thread of its own: never blocks the dispatch loop."""

    name = "manifests"

    def __init__(self, store: ManifestStore, summariser: Summariser, every_s: float = 2.0) -> None:
        super().__init__(every_s)
        self.store, self.summariser = store, summariser

    def round(self) -> bool:
        for job_id, tries in self.store.pending_manifests(limit=4):
            self.one(job_id, tries)
        return False

    def one(self, job_id: int, tries: int) -> None:
        try:
            manifest = self.summariser.manifest(self.store.page_texts(job_id))
        except ManifestFailed as e:
            gave_up = tries + 1 >= MAX_TRIES
            log.warning("job %s: %s%s", job_id, e, "; giving up" if gave_up else "; will retry")
            self.store.put_manifest(job_id, "failed" if gave_up else "pending", self.summariser.model, None,
                                    error=str(e)[:1000], retry_in_s=min(3600.0, 30.0 * 2**tries))
            return
        self.store.put_manifest(job_id, "done", self.summariser.model, manifest.model_dump())
        log.info("job %s: manifest done (%s, %s LLM call(s))", job_id, manifest.document_type,
                 self.summariser.calls)

