"""The cell's two ends: its input (header and document) and its result channel (JSON lines on stdout)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ValidationError

from .contract import (
    ENV_DOCUMENT_URL,
    ENV_HEADER,
    EXIT_NEEDS_MORE,
    MAX_HEADER_BYTES,
    BadInput,
    Done,
    Header,
    Need,
    Peak,
    TempFail,
    encode,
    oversized,
)

_CHUNK = 1024 * 1024


def read_header(stdin: BinaryIO) -> Header:
    """The header from JOBCELL_HEADER if set, else the first line of stdin."""
    raw = os.environ.get(ENV_HEADER, "").encode() or stdin.readline(MAX_HEADER_BYTES)
    if not raw.endswith(b"\n") and ENV_HEADER not in os.environ:
        raise TempFail("the input ended before its header did (the dispatcher's stream was cut)")
    try:
        return Header.model_validate_json(raw)
    except ValidationError as e:
        raise TempFail(f"unreadable header: {e.errors()[0]['msg']}") from None


def receive_document(header: Header, stdin: BinaryIO, scratch: Path) -> Path:
    """The document on scratch: exactly header.document_bytes from stdin, or from the presigned URL."""
    too_large = oversized(header.document_bytes, header.options)
    if too_large:
        raise BadInput(too_large)
    suffix = Path(header.document_name).suffix.lower()[:8]
    dest = scratch / f"document{suffix if suffix.isascii() and suffix[1:].isalnum() else ''}"
    url = os.environ.get(ENV_DOCUMENT_URL)
    source = _open_url(url) if url else stdin
    written = 0
    digest = hashlib.sha256()
    with dest.open("wb") as f:
        while written < header.document_bytes:
            chunk = source.read(min(_CHUNK, header.document_bytes - written))
            if not chunk:
                break
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    if written != header.document_bytes:
        raise TempFail(f"the document arrived incomplete: {written} of {header.document_bytes} bytes")
    return dest


def _open_url(url: str) -> BinaryIO:
    # Only cells fed by a presigned URL (Kubernetes, Render) need urllib.request (http.client, email, ...):
    # imported here, not by every cell (issue 12)
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=60)  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:  # an expired presigned URL is 403: the next attempt gets a fresh one
        raise TempFail(f"fetching the document failed: HTTP {e.code}") from None
    except OSError as e:
        raise TempFail(f"fetching the document failed: {e}") from None


class Channel:
    """Writes this attempt's records to the real stdout. Everything else written to fd 1 (a library's print,
    a child process) is moved to stderr first, so that the channel carries records only."""

    def __init__(self, header: Header, out: BinaryIO | None = None) -> None:
        self.job, self.attempt = header.job_id, header.attempt
        self.limit_bytes, self.larger_tier = header.memory_limit_bytes, header.larger_tier
        if out is None:
            out = os.fdopen(os.dup(1), "wb", buffering=0)
            os.dup2(2, 1)
            sys.stdout = sys.stderr
        self._out = out

    def emit(self, record: BaseModel) -> None:
        self._out.write(encode(record))

    def peak(self, peak_bytes: int) -> None:
        self.emit(Peak(job=self.job, attempt=self.attempt, bytes=peak_bytes))

    def need(self, need_bytes: int) -> bool:
        """Tell the dispatcher what this cell estimates it needs; True if that is over its cap and a larger tier
        exists, so that it should stop and be moved (ask_for_more) rather than run into its cap part way."""
        self.emit(Need(job=self.job, attempt=self.attempt, bytes=need_bytes))
        return bool(self.larger_tier and self.limit_bytes and need_bytes > self.limit_bytes)

    def ask_for_more(self, need_bytes: int, why: str) -> int:
        """The cell's last words when it stops for a larger tier: the reason the attempt shows."""
        print(f"needs about {need_bytes / 2**20:.0f} MiB ({why}), over its {self.limit_bytes / 2**20:.0f} MiB cap: "
              "asking for a larger tier", file=sys.stderr, flush=True)
        return EXIT_NEEDS_MORE

    def done(self) -> None:
        self.emit(Done(job=self.job, attempt=self.attempt))
