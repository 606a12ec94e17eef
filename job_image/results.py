"""Where pages go as soon as they are done: Postgres (upsert per page, the checkpoint) or stdout."""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol

from .contract import TempFail
from .ocr import PageText
from .validate import Page


class Sink(Protocol):
    def done_pages(self) -> set[int]: ...
    def put_page(self, page: Page, result: PageText) -> None: ...
    def page_texts(self) -> list[tuple[int, str]]: ...
    def put_manifest(self, model: str | None, manifest: dict[str, Any] | None) -> None: ...
    def complete(self, media_type: str, page_count: int) -> None: ...


class PostgresSink:
    def __init__(self, url: str, job_id: int, attempt: int) -> None:
        import psycopg

        self.job_id, self.attempt = job_id, attempt
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=15)
        except psycopg.OperationalError as e:
            raise TempFail(f"cannot reach the results database: {_first_line(e)}") from None

    def done_pages(self) -> set[int]:
        rows = self.conn.execute("SELECT page FROM document_pages WHERE job_id = %s", (self.job_id,)).fetchall()
        return {r[0] for r in rows}

    def put_page(self, page: Page, result: PageText) -> None:
        from psycopg.types.json import Jsonb

        self.conn.execute(
            "INSERT INTO document_pages (job_id, page, attempt, dpi, width, height, text, words, mean_confidence,"
            " ocr_seconds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (job_id, page) DO UPDATE SET attempt = EXCLUDED.attempt, text = EXCLUDED.text,"
            " words = EXCLUDED.words, mean_confidence = EXCLUDED.mean_confidence,"
            " ocr_seconds = EXCLUDED.ocr_seconds, dpi = EXCLUDED.dpi, width = EXCLUDED.width,"
            " height = EXCLUDED.height",
            (self.job_id, page.number, self.attempt, page.dpi, page.width, page.height, result.text,
             Jsonb(result.words), result.mean_confidence, result.seconds))

    def page_texts(self) -> list[tuple[int, str]]:
        rows = self.conn.execute("SELECT page, text FROM document_pages WHERE job_id = %s ORDER BY page",
                                 (self.job_id,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def put_manifest(self, model: str | None, manifest: dict[str, Any] | None) -> None:
        from psycopg.types.json import Jsonb

        self.conn.execute(
            "INSERT INTO document_manifests (job_id, status, model, manifest) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (job_id) DO UPDATE SET status = EXCLUDED.status, model = EXCLUDED.model,"
            " manifest = EXCLUDED.manifest",
            (self.job_id, "skipped" if manifest is None else "done", model,
             None if manifest is None else Jsonb(manifest)))

    def complete(self, media_type: str, page_count: int) -> None:
        self.conn.execute(
            "INSERT INTO document_results (job_id, media_type, page_count) VALUES (%s, %s, %s)"
            " ON CONFLICT (job_id) DO NOTHING", (self.job_id, media_type, page_count))


class StdoutSink:
    """No database configured: one JSON line per page, for a standalone run of the image."""

    def __init__(self) -> None:
        self.texts: list[tuple[int, str]] = []

    def done_pages(self) -> set[int]:
        return set()

    def page_texts(self) -> list[tuple[int, str]]:
        return sorted(self.texts)

    def put_manifest(self, model: str | None, manifest: dict[str, Any] | None) -> None:
        print(json.dumps({"manifest": manifest, "model": model}), flush=True)

    def put_page(self, page: Page, result: PageText) -> None:
        self.texts.append((page.number, result.text))
        record: dict[str, Any] = {"page": page.number, "dpi": page.dpi, "text": result.text,
                                  "words": len(result.words), "mean_confidence": result.mean_confidence}
        print(json.dumps(record), flush=True)

    def complete(self, media_type: str, page_count: int) -> None:
        print(json.dumps({"media_type": media_type, "pages": page_count}), file=sys.stdout, flush=True)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
