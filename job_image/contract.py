"""The one contract between the dispatcher and a job cell, imported by both sides (pydantic is its only import).

A cell holds no credential and reaches no database. It is handed everything it may know and answers on
stdout; the dispatcher, the only trusted writer, checks every answer before it stores anything:

- **In.** One `Header` line (JSON) on stdin, then exactly `Header.document_bytes` bytes of the document.
  Where a runtime cannot stream stdin (Kubernetes, Render), the header comes in the `JOBCELL_HEADER`
  variable and the document from a presigned GET URL (`JOBCELL_DOCUMENT_URL`) that expires in minutes.
- **Out.** JSON lines on stdout, one `Record` each, every one naming its own (job, attempt); anything that is
  not a record is refused. Human progress and the failure reason go to stderr (its last line is the reason).
- **End.** An exit code below. Exit 0 counts only when a `Done` record came and every page is stored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

VERSION = 1

# Exit codes (sysexits where one fits). A SIGKILL (137) is oom only when the runtime's own OOM signal says so
# (Docker's OOMKilled, the cgroup's oom_kill count, Kubernetes' OOMKilled reason): an engine restart or a
# human's `docker kill` is not the document's fault. A cell that ran out of memory and lived to say so
# (MemoryError, a child killed or aborted for memory) exits EXIT_NO_MEMORY: retried on the next tier.
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected: retried on the same tier
EXIT_BAD_INPUT = 65  # EX_DATAERR: permanent, never retried; the last stderr line is the reason
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: retried on the same tier
EXIT_NO_MEMORY = 86  # the cell's own report of running out of memory
# The cell foresaw, before any heavy work, that its largest page needs more memory than its cap (its `Need`
# record says how much): moved at once to the smallest tier that holds the need, with no OOM on the way
EXIT_NEEDS_MORE = 87
EXIT_SIGKILL = 137

ENV_HEADER = "JOBCELL_HEADER"
ENV_DOCUMENT_URL = "JOBCELL_DOCUMENT_URL"
ENV_SCRATCH = "JOBCELL_SCRATCH"

MAX_HEADER_BYTES = 1024 * 1024
MAX_REASON_CHARS = 300


class BadInput(Exception):
    """The document cannot be processed, now or ever. The message is shown to the user as the reason."""


class TempFail(Exception):
    """A dependency failed; the same attempt may succeed later."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobOptions(_Strict):
    """The document workload's settings: validated by the dispatcher at start, handed to every cell."""

    dpi: int = Field(default=200, ge=72, le=600)
    max_pages: int = Field(default=2000, ge=1, le=100_000)
    max_pixels: int = Field(default=40_000_000, ge=1_000_000)
    max_input_bytes: int = Field(default=200_000_000, ge=1)
    ocr_lang: str = Field(default="eng", pattern=r"^[A-Za-z_]+(\+[A-Za-z_]+)*$")
    page_timeout_s: float = Field(default=300.0, gt=0)
    ocr_workers: int = Field(default=0, ge=0)  # 0: as many as CPUs and memory allow


class Header(_Strict):
    """Everything a cell is told about its attempt."""

    v: Literal[1] = 1
    job_id: int
    attempt: int = Field(ge=1)
    tier: str
    memory_limit_bytes: int = Field(ge=0)
    workload: str
    params: dict[str, Any] = Field(default_factory=dict)
    done_pages: list[int] = Field(default_factory=list)  # stored by earlier attempts: resume after them
    document_name: str = ""  # a display name with the submitted suffix; the content decides the type
    document_bytes: int = Field(default=0, ge=0)
    options: JobOptions = Field(default_factory=lambda: JobOptions())
    # Where the cell reads its peak: its own cgroup (a container's /sys/fs/cgroup), or its processes' high-water
    # marks (a process of the host, whose /sys/fs/cgroup counts the whole machine)
    peak_from: Literal["cgroup", "process"] = "cgroup"
    # The CPUs the dispatcher's admission counted this cell for: it runs no more OCR workers than that. None:
    # nothing counts them, so it may use every CPU it can see
    cpus: float | None = Field(default=None, gt=0)
    # A tier with more memory exists above this one: a cell whose need exceeds its cap may stop and ask for it
    # (EXIT_NEEDS_MORE); on the top tier (or from a dispatcher that does not say) it tries anyway
    larger_tier: bool = False


# -- what a cell emits --------------------------------------------------------------------------------------

class Limits(_Strict):
    """Bounds on what one cell may emit; past any of them its attempt is refused."""

    max_record_bytes: int = 4 * 1024 * 1024
    max_text_chars: int = 200_000  # per page
    max_words: int = 50_000  # per page
    max_total_bytes_per_page: int = 2 * 1024 * 1024  # the whole stream: this times (declared pages + 1)


class Word(_Strict):
    text: str = Field(max_length=1000)
    left: int
    top: int
    width: int = Field(ge=0)
    height: int = Field(ge=0)
    conf: float


class _Record(_Strict):
    job: int
    attempt: int


class DocumentInfo(_Record):
    """Sent once, before any page: the document's type and page count, which bound every later page."""

    type: Literal["document"] = "document"
    media_type: str = Field(max_length=100)
    pages: int = Field(ge=0)


class PageResult(_Record):
    type: Literal["page"] = "page"
    page: int = Field(ge=1)
    dpi: int = Field(ge=0, le=10_000)  # 0: an image that does not say
    width: int = Field(ge=0)
    height: int = Field(ge=0)
    text: str
    words: list[Word]
    mean_confidence: float | None = None
    ocr_seconds: float = Field(ge=0)


class Peak(_Record):
    """The cell's peak as it exits (Header.peak_from says how it was read); runtimes also measure it themselves
    where they can, and the larger of the two is kept, never past the attempt's limit."""

    type: Literal["peak"] = "peak"
    bytes: int = Field(ge=0)


class Need(_Record):
    """Sent once, after the document is validated and before any page: the memory the cell estimates it needs
    with one page worker (its largest page's pixels at the measured bytes per pixel, plus its fixed cost)."""

    type: Literal["need"] = "need"
    bytes: int = Field(ge=0)


class Done(_Record):
    """The last record of a successful run."""

    type: Literal["done"] = "done"


Record = Annotated[DocumentInfo | Need | PageResult | Peak | Done, Field(discriminator="type")]
RECORD: TypeAdapter[Record] = TypeAdapter(Record)


def encode(record: BaseModel) -> bytes:
    return record.model_dump_json().encode() + b"\n"


def decode(line: bytes) -> Record:
    """One stdout line as a Record; ValueError (with a short reason) for anything else."""
    try:
        return RECORD.validate_json(line)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise ValueError(f"invalid record ({where}: {first['msg']})") from None


def oversized(document_bytes: int, options: JobOptions) -> str | None:
    """Why a document is too large to process (bad input), or None: one rule for dispatcher and cell."""
    if document_bytes <= options.max_input_bytes:
        return None
    return (f"the file is {document_bytes / 1e6:.1f} MB, over the {options.max_input_bytes / 1e6:g} MB limit "
            "(JOBCELL_MAX_INPUT_BYTES)")


def reason_text(text: str) -> str:
    """A cell's words made safe to show: printable, one line, truncated."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text.strip())
    return clean if len(clean) <= MAX_REASON_CHARS else clean[: MAX_REASON_CHARS - 1] + "…"
