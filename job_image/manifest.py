"""The optional LLM pass: a structured manifest of the document, from its OCR text, through the openai SDK.

Runs only when OPENAI_API_KEY is set (OPENAI_BASE_URL and JOBCELL_LLM_MODEL optional); otherwise the step is
recorded as skipped. Text goes in bounded chunks; with several chunks, their manifests are merged in one
last call. 429 and 5xx answers, dropped connections and replies that break the schema are retried with
backoff; when retries run out the job exits 75 and a retry starts again here (its pages are already stored).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from .contract import TempFail

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
            raise TempFail(f"the LLM manifest failed after retries: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    def manifest(self, pages: Sequence[tuple[int, str]]) -> Manifest:
        parts = [self.ask(SYSTEM, chunk) for chunk in chunks(pages)]
        if len(parts) == 1:
            return parts[0]
        merged = "\n".join(p.model_dump_json() for p in parts)
        return self.ask(MERGE, merged[: CHUNK_CHARS * 2])


def describe(manifest: Manifest) -> dict[str, Any]:
    return manifest.model_dump()
