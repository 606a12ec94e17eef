"""The document pipeline in the real job image: corpus outcomes, accuracy, long documents within the small tier,
resume after an OOM part-way, and refusals of bad input, each after exactly one attempt."""

from __future__ import annotations

import collections
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench._support import scanned_pdf
from dispatcher.classes import load_table
from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.models import MIB, JobState, NewJob
from dispatcher.outcome import Backoff
from dispatcher.queue import PostgresQueue
from dispatcher.runtimes.docker import DockerOptions, DockerRuntime
from dispatcher.store import LocalStore, S3Store
from job_image.contract import JobOptions

from .conftest import CORPUS, JOB_IMAGE, Running, wait_final

DEFAULT_LIKE: list[dict[str, Any]] = [
    {"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "512MiB", "max_running": 2, "timeout_s": 900},
    {"name": "medium", "max_input_bytes": "20MB", "memory_limit_bytes": "1GiB", "max_running": 1, "timeout_s": 900},
    {"name": "large", "memory_limit_bytes": "2GiB", "max_running": 1, "timeout_s": 900},
]


class Docs:
    """A dispatcher whose jobs run the real OCR pipeline and store pages in the test's database."""

    def __init__(self, db_url: str, pool: str, store_dir: Path, docker_client: Any) -> None:
        self.db_url, self.pool = db_url, pool
        self.store: LocalStore | S3Store = LocalStore(str(store_dir))
        self.store_dir, self.client = store_dir, docker_client
        self.running: list[Running] = []
        self.queue: PostgresQueue | None = None

    def start(self, classes: list[dict[str, Any]] = DEFAULT_LIKE, store: S3Store | None = None,
              summarise: bool = False, cpu_budget: float | None = None, sizing: bool = True,
              **options: Any) -> PostgresQueue:
        """A dispatcher on sealed cells (network none, no env, no mount); options go into every header."""
        table = load_table(classes)
        self.queue = PostgresQueue(self.db_url, table, lease_ttl_s=10.0)
        self.queue.migrate()
        self.store = store or self.store
        runtime = DockerRuntime(DockerOptions(image=JOB_IMAGE, pool=self.pool, queue_id=self.queue.queue_id()),
                                client=self.client, documents=self.store.open)
        dq = PostgresQueue(self.db_url, table, lease_ttl_s=10.0, give_up_after_s=None)
        cfg = LoopConfig(owner=f"docs-{uuid.uuid4().hex[:4]}", pool=self.pool, budget_bytes=6 * 1024 * MIB,
                         poll_s=0.2, heartbeat_s=3, reconcile_s=2, backoff=Backoff(exponent=0),
                         job_options=JobOptions(**options), summarise=summarise, cpu_budget=cpu_budget,
                         sizing=sizing)
        self.running.append(Running(Dispatcher(dq, runtime, table, cfg)))
        return self.queue

    def submit(self, path: Path, size_class: str | None = None, lang: str | None = None) -> int:
        assert self.queue is not None
        uri, size, key = self.store.put(str(path))
        cls = size_class or self.queue._table.for_size(size).name
        job_id, _ = self.queue.submit(NewJob(uri, size, key, cls, source=path.name,
                                             params={"lang": lang} if lang else {}))
        return job_id

    def stop(self) -> None:
        for r in self.running:
            r.stop()
            r.d.queue.close()  # type: ignore[attr-defined]
        if self.queue:
            self.queue.close()


@pytest.fixture
def docs(db_url, pool, tmp_path, docker_client, job_image) -> Iterator[Docs]:
    d = Docs(db_url, pool, tmp_path / "store", docker_client)
    yield d
    d.stop()


def words(text: str) -> collections.Counter[str]:
    return collections.Counter(re.findall(r"\w+", text.lower()))


def bag_of_words_accuracy(truth: str, ocr: str) -> float:
    """Share of the ground truth's words found in the OCR text, counted with multiplicity (order ignored)."""
    t, o = words(truth), words(ocr)
    return sum(min(n, o[w]) for w, n in t.items()) / max(1, sum(t.values()))


def text_of(queue: PostgresQueue, job_id: int) -> str:
    return "\n".join(p.text for p in queue.pages(job_id))


CORPUS_EXPECT = {
    "ocrmypdf-cardinal.pdf": ("succeeded", 4, None),
    "ocrmypdf-enormous.pdf": ("succeeded", 1, None),
    "ocrmypdf-multipage.pdf": ("succeeded", 6, None),
    "ocrmypdf-linn.png": ("succeeded", 1, None),
    "pdf2image-test_241.pdf": ("succeeded", 241, None),
    "tesseract-8087_054.3B.tif": ("succeeded", 1, None),
    "tesseract-eurotext.tif": ("succeeded", 1, None),
    "tesseract-phototest.tif": ("succeeded", 1, None),
    "ocrmypdf-invalid.pdf": ("failed", None, "the PDF is corrupt"),
    "pdf2image-test_corrupted.pdf": ("failed", None, "the PDF is corrupt"),
    "pdf2image-test_locked_user_only.pdf": ("failed", None, "the PDF is encrypted and needs a password"),
    "ocrmypdf-hugemono.pdf": ("failed", None, "decompression bomb"),
}


@pytest.mark.slow
def test_every_corpus_document_ends_as_expected(docs):
    documents = sorted(p for p in CORPUS.iterdir() if p.suffix in (".pdf", ".tif", ".png"))
    assert {p.name for p in documents} == set(CORPUS_EXPECT), "the corpus changed: update CORPUS_EXPECT"
    # how each document ends, not how well it reads (test_word_accuracy_against_ground_truth, at 200 dpi): at
    # 100 dpi the 241-page PDF costs a quarter of the OCR, and the suite is CPU-bound on two cores
    q = docs.start(dpi=100)
    ids = {p.name: docs.submit(p) for p in documents}
    wait_final(q, list(ids.values()), timeout=1500)
    for name, job_id in ids.items():
        state, pages, reason = CORPUS_EXPECT[name]
        job = q.get(job_id)
        attempts = q.attempts(job_id)
        assert job.state.value == state, f"{name}: {job.state.value} ({job.reason})"
        if state == "succeeded":
            result = q.result(job_id)
            assert result is not None and result.page_count == pages, name
            assert [p.page for p in q.pages(job_id)] == list(range(1, pages + 1)), name
            assert result.manifest_status == "skipped"  # no API key configured
        else:
            assert len(attempts) == 1 and attempts[0].outcome == "bad_input", f"{name}: {attempts}"
            assert reason in (job.reason or ""), f"{name}: {job.reason}"
    # the 241-page PDF ran in the small tier (512 MiB), once
    long = q.attempts(ids["pdf2image-test_241.pdf"])
    assert [(a.tier, a.outcome) for a in long] == [("small", "succeeded")]
    assert long[0].peak_memory_bytes < 512 * MIB


@pytest.fixture
def accuracy_report(request) -> dict[str, float]:
    report: dict[str, float] = {}
    yield report
    print("\nword accuracy (bag of words): " + ", ".join(f"{k} {v:.1%}" for k, v in report.items()))


# eurotext mixes six languages; with all six tesseract reads Spanish accents as German umlauts (94.5% here, the
# same as the raw CLI with the same languages), without German it reads them right (95.9%)
LANGS = {"tesseract-eurotext.tif": "eng+por+spa+fra+ita"}


def test_word_accuracy_against_ground_truth(docs, accuracy_report):
    q = docs.start()
    names = ["tesseract-phototest.tif", "tesseract-eurotext.tif", "ocrmypdf-linn.png", "tesseract-8087_054.3B.tif"]
    ids = {n: docs.submit(CORPUS / n, lang=LANGS.get(n)) for n in names}
    wait_final(q, list(ids.values()), timeout=300)
    for n, job_id in ids.items():
        truth = (CORPUS / (n.rsplit(".", 1)[0] + ".txt")).read_text()
        accuracy_report[n] = bag_of_words_accuracy(truth, text_of(q, job_id))
    assert accuracy_report["tesseract-phototest.tif"] >= 0.95
    assert accuracy_report["tesseract-eurotext.tif"] >= 0.95
    # reported, not gated: two-column reading order and a scan without DPI metadata
    assert accuracy_report["tesseract-8087_054.3B.tif"] > 0.5 and accuracy_report["ocrmypdf-linn.png"] > 0.5
    words_ = q.pages(ids["tesseract-phototest.tif"])[0].words
    assert all({"text", "left", "top", "width", "height", "conf"} <= set(w) for w in words_)
    assert any(isinstance(w["conf"], float) and 0 < w["conf"] <= 100 for w in words_)


@pytest.mark.slow
def test_a_150_page_scan_succeeds_in_the_small_tier(docs, tmp_path):
    q = docs.start(dpi=150)  # rendered at 150 dpi: 0.56x the pixels to OCR, text still 24 px high
    pdf = scanned_pdf(tmp_path / "scan-150.pdf", 150)
    job_id = docs.submit(pdf, size_class="small")
    [job] = wait_final(q, [job_id], timeout=1200)
    assert job.state is JobState.SUCCEEDED, job.reason
    [attempt] = q.attempts(job_id)
    assert attempt.tier == "small" and attempt.peak_memory_bytes < 512 * MIB
    pages = q.pages(job_id)
    assert [p.page for p in pages] == list(range(1, 151))
    assert "Page 150 line 39" in pages[-1].text.replace("\n", " ")


def test_a_cpu_budget_runs_one_cell_per_cpu_each_with_one_page_worker(docs):
    q = docs.start(cpu_budget=1)  # slots and memory hold both documents at once; one CPU holds one
    ids = [docs.submit(CORPUS / "ocrmypdf-multipage.pdf"), docs.submit(CORPUS / "ocrmypdf-cardinal.pdf")]
    jobs = wait_final(q, ids, timeout=600)
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [j.reason for j in jobs]
    first, second = sorted((a for i in ids for a in q.attempts(i)), key=lambda a: a.started_at)
    assert first.finished_at is not None and second.started_at >= first.finished_at  # one after the other
    assert all("1 worker" in (a.log_tail or "") for a in (first, second))  # 6 and 4 pages, one at a time


DEMO_LIKE = [dict(c, memory_limit_bytes=m) for c, m in zip(DEFAULT_LIKE, ("192MiB", "512MiB", "1GiB"), strict=True)]


def test_a_page_too_large_for_its_tier_moves_up_before_any_work_with_no_oom(docs):
    q = docs.start(DEMO_LIKE)  # as examples/demo-classes.toml: small 192 MiB, medium 512 MiB
    enormous, linn = docs.submit(CORPUS / "ocrmypdf-enormous.pdf"), docs.submit(CORPUS / "ocrmypdf-linn.png")
    jobs = wait_final(q, [enormous, linn], timeout=300)
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [j.reason for j in jobs]
    moved, ran = q.attempts(enormous)
    assert (moved.tier, moved.outcome, moved.oom_killed, ran.tier, ran.outcome) == \
        ("small", "needs_more", False, "medium", "succeeded")
    # 6000 x 6000 px: 48 MiB + 8 bytes a pixel, about 323 MiB; it really peaked above small's cap, below medium's
    assert moved.need_bytes == ran.need_bytes and 320 * MIB < moved.need_bytes < 330 * MIB
    assert 192 * MIB < ran.peak_memory_bytes <= 512 * MIB
    assert (moved.error or "").startswith("needs about 323 MiB (page 1 is 6000 x 6000 px), over its 192 MiB cap")
    [small] = q.attempts(linn)  # 2550 x 3300 px: about 112 MiB, held by small
    assert (small.tier, small.outcome) == ("small", "succeeded") and small.need_bytes < 192 * MIB


def pdfunite(client: Any, inputs: list[Path], out: Path) -> Path:
    """pdfunite (poppler) from the job image, so the host needs no poppler of its own."""
    mounts = {str(p.parent): {"bind": f"/in{i}", "mode": "ro"} for i, p in enumerate(inputs)}
    binds = {str(p.parent): f"/in{i}" for i, p in enumerate(inputs)}
    mounts[str(out.parent)] = {"bind": "/out", "mode": "rw"}
    client.containers.run(JOB_IMAGE, entrypoint="pdfunite", user="0:0", remove=True, volumes=mounts,
                          command=[f"{binds[str(p.parent)]}/{p.name}" for p in inputs] + [f"/out/{out.name}"])
    return out


@pytest.mark.parametrize("sizing, first", [(False, "oom"), (True, "needs_more")])
def test_a_page_past_the_cap_resumes_at_the_first_missing_page(docs, tmp_path, docker_client, sizing, first):
    # pages 1-4 are ordinary; page 5 is a 30 x 30 inch page that needs more than 192 MiB. Without sizing the cell
    # runs into its cap on page 5; with it, it does pages 1-4 and asks for more before rendering page 5.
    pdf = pdfunite(docker_client, [CORPUS / "ocrmypdf-cardinal.pdf", CORPUS / "ocrmypdf-enormous.pdf"],
                   tmp_path / "cardinal-then-enormous.pdf")
    q = docs.start(DEMO_LIKE, sizing=sizing)
    job_id = docs.submit(pdf)
    [job] = wait_final(q, [job_id], timeout=600)
    assert job.state is JobState.SUCCEEDED, job.reason
    assert [(a.tier, a.outcome) for a in q.attempts(job_id)] == [("small", first), ("medium", "succeeded")]
    # whichever process the cgroup killed (pdftoppm, tesseract, python), it is memory, never "cannot be rendered"
    assert "cannot be rendered" not in (q.attempts(job_id)[0].error or "")
    # every page exactly once; the first four were kept from the OOM-killed attempt, only page 5 was redone
    assert [(p.page, p.attempt) for p in q.pages(job_id)] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]


def _png_bomb(path: Path) -> Path:
    # a valid PNG header claiming 60000 x 60000 pixels: Pillow must refuse it before decoding
    Image.new("1", (60000, 60000)).save(path, optimize=True)
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty.pdf": (lambda p: (p.write_bytes(b""), p)[1], "the file is empty"),
    "notes.pdf": (lambda p: (p.write_text("just some text, named .pdf"), p)[1], "unsupported file type"),
    "truncated.png": (lambda p: (p.write_bytes((CORPUS / "ocrmypdf-linn.png").read_bytes()[:2000]), p)[1],
                      "the image is corrupt"),
    "bomb.png": (_png_bomb, "decompression bomb"),
}


def test_bad_inputs_fail_once_with_a_specific_reason(docs, tmp_path):
    q = docs.start(max_pages=3)
    ids = {}
    for name, (make, _) in BAD_INPUTS.items():
        ids[name] = docs.submit(make(tmp_path / name))
    ids["too many pages"] = docs.submit(CORPUS / "ocrmypdf-multipage.pdf")
    ids["unknown language"] = docs.submit(CORPUS / "tesseract-phototest.tif", lang="klingon")
    wait_final(q, list(ids.values()), timeout=300)
    expected = {**{n: r for n, (_, r) in BAD_INPUTS.items()}, "too many pages": "6 pages, over the limit of 3",
                "unknown language": "OCR language 'klingon' is not installed"}
    for name, job_id in ids.items():
        job = q.get(job_id)
        assert job.state is JobState.FAILED and expected[name] in (job.reason or ""), f"{name}: {job.reason}"
        assert [a.outcome for a in q.attempts(job_id)] == ["bad_input"], name


def test_show_text_and_export(docs, db_url, tmp_path):
    import json
    import os
    import sys

    from .conftest import ROOT

    q = docs.start()
    job_id = docs.submit(CORPUS / "ocrmypdf-cardinal.pdf")
    wait_final(q, [job_id], timeout=300)
    env = dict(os.environ, JOBCELL_DATABASE_URL=db_url)
    text = subprocess.run([sys.executable, "-m", "dispatcher.cli", "show", str(job_id), "--text"], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True).stdout
    assert [ln for ln in text.splitlines() if ln.startswith("=== page")] == [f"=== page {n} ===" for n in range(1, 5)]
    out = tmp_path / "export.json"
    subprocess.run([sys.executable, "-m", "dispatcher.cli", "export", str(job_id), "-o", str(out)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["page_count"] == 4 and len(doc["pages"]) == 4
    assert doc["manifest"]["status"] == "skipped"
    assert all(set(w) == {"text", "left", "top", "width", "height", "conf"} for w in doc["pages"][0]["words"])
