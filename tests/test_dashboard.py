"""The dashboard end to end: `jobcell web` (the command a user runs) serving a queue that a dispatcher works
through with real cells, looked at in Debian's headless chromium driven by Playwright. Screenshots are kept as
test artefacts in var/test-artifacts/dashboard/."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench._support import scanned_pdf
from dispatcher.cli import main
from dispatcher.models import JobState

from .conftest import ROOT, TEST_CLASSES, diag, wait_final, wait_for
from .test_documents import DEFAULT_LIKE, docs  # noqa: F401 (fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "var" / "test-artifacts" / "dashboard"
TOKEN = "dash-" + uuid.uuid4().hex  # a fresh secret per run
USER, PASSWORD = "operator", "correct-horse-battery"
# An untrusted document's last stderr line becomes the job's reason: markup in it must stay text
EVIL = 'not a document: <script>document.title="pwned"</script><img src=x onerror="document.title=1"> & more'


# -- the command under test, and a browser -----------------------------------------------------------------

class Web:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def web(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Web]]:
    """`jobcell web` as a subprocess on a free loopback port; stopped (by its pid) at the end of the test."""
    started: list[Web] = []

    def start(classes: list[dict[str, Any]] = TEST_CLASSES, auth: str = "token", **env: str) -> Web:
        port = _free_port()
        e = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
        e.update(JOBCELL_DATABASE_URL=db_url, JOBCELL_CLASSES=json.dumps(classes), JOBCELL_WEB_PORT=str(port))
        if auth == "token":
            e["JOBCELL_WEB_TOKEN"] = TOKEN
        else:
            e.update(JOBCELL_WEB_USER=USER, JOBCELL_WEB_PASSWORD=PASSWORD)
        e.update(env)
        log = tmp_path / f"web-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "web"], cwd=ROOT, env=e, stdout=out,
                                    stderr=subprocess.STDOUT)
        w = Web(f"http://127.0.0.1:{port}", proc, log)
        started.append(w)

        def up() -> bool:
            assert proc.poll() is None, f"jobcell web exited {proc.returncode}:\n{log.read_text()}"
            return fetch(f"{w.url}/static/jobcell.css")[0] == 200
        wait_for(up, 30, "jobcell web to listen")
        return w

    yield start
    for w in started:
        w.proc.terminate()
        try:
            w.proc.wait(10)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), ("Debian's chromium is missing: scripts/setup.sh installs it "
                                     "(apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@contextlib.contextmanager
def signed_in(browser: Any, w: Web) -> Iterator[Any]:
    """A fresh browser context that opened the dashboard once with ?token=, as an operator's bookmark would."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    r = page.goto(f"{w.url}/?token={TOKEN}")
    assert r is not None and r.status == 200
    assert "token" not in page.url, "the token must leave the address bar"
    try:
        yield page
    finally:
        context.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def fetch(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, Any, str]:
    """(status, headers, body) without following redirects; errors are statuses, not exceptions."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with _opener.open(req, timeout=15) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()
    except OSError:
        return 0, {}, ""


BEARER = {"Authorization": f"Bearer {TOKEN}"}


# -- refusals before anything starts ------------------------------------------------------------------------

@pytest.mark.parametrize("env, says", [
    ({}, "set JOBCELL_WEB_TOKEN"),
    ({"JOBCELL_WEB_USER": "operator"}, "set both JOBCELL_WEB_USER and JOBCELL_WEB_PASSWORD"),
    ({"JOBCELL_WEB_TOKEN": "short"}, "JOBCELL_WEB_TOKEN: Value error, must be at least 16 characters"),
    ({"JOBCELL_WEB_TOKEN": TOKEN, "JOBCELL_WEB_PORT": "70000"}, "JOBCELL_WEB_PORT"),
    ({"JOBCELL_WEB_TOKEN": TOKEN, "JOBCELL_WEB_ACTIONS": "perhaps"}, "JOBCELL_WEB_ACTIONS"),
])
def test_web_refuses_to_start_without_authentication_or_with_bad_settings(monkeypatch, capsys, env, says):
    for k in list(os.environ):
        if k.startswith("JOBCELL_"):
            monkeypatch.delenv(k)
    # never reached: the refusal comes before any connection
    monkeypatch.setenv("JOBCELL_DATABASE_URL", "postgresql://nobody:x@127.0.0.1:1/none")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["web"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err
    if not env:
        assert len(err.splitlines()) == 1, err  # one clear line
        assert "JOBCELL_WEB_USER and JOBCELL_WEB_PASSWORD" in err


# -- the pieces that make pages safe and charts right ---------------------------------------------------

def test_tag_escapes_every_value_and_only_markup_it_built_passes():
    from dispatcher.web import Safe, esc, tag

    out = tag("p", {"title": '"><script>x</script>', "hidden": True, "id": None}, "<b>&", 3, None,
              [tag("i", None, "ok"), "<u>"])
    assert out == ('<p title="&quot;&gt;&lt;script&gt;x&lt;/script&gt;" hidden>&lt;b&gt;&amp;3<i>ok</i>'
                   '&lt;u&gt;</p>')
    assert isinstance(out, Safe) and esc(out) is out
    assert tag("p", None, str(out)).count("&lt;i&gt;") == 1  # a plain str is escaped, even if it was markup


def test_memory_held_over_time_is_exact_to_each_claim_and_end():
    from datetime import UTC, datetime, timedelta

    from dispatcher.models import MIB
    from dispatcher.views import MemorySpan
    from dispatcher.web import held_over_time

    now = datetime(2025, 1, 1, 12, tzinfo=UTC)
    since = now - timedelta(minutes=10)

    def at(m: float) -> datetime:
        return since + timedelta(minutes=m)
    attempts = [  # a 2-second job between two samples would be lost by sampling; here it is a step
        MemorySpan("a", 64 * MIB, at(-5), at(1)),
        MemorySpan("a", 160 * MIB, at(2), at(2) + timedelta(seconds=2)),
        MemorySpan("a", 64 * MIB, at(9), None),
        MemorySpan("b", 256 * MIB, at(-30), at(-20)),  # before the window
    ]
    steps = held_over_time(attempts, since, now)
    assert list(steps) == ["a"]
    assert [(round((t - since).total_seconds()), b // MIB) for t, b in steps["a"]] == [
        (0, 0), (0, 64), (60, 0), (120, 160), (122, 0), (540, 64)]


# -- in the browser -----------------------------------------------------------------------------------------

def test_escalation_refusal_and_escaping_in_the_browser(queue, start_dispatcher, pool, web, browser):
    oom = diag(queue, alloc_mib=100, sleep_s=0.5)  # OOM on the 64 MiB small tier, fits in medium's 160 MiB
    bad = diag(queue, exit_code=65, message=EVIL)
    ok = diag(queue, sleep_s=0.2)
    start_dispatcher()
    jobs = {j.id: j for j in wait_final(queue, [oom, bad, ok])}
    assert jobs[oom].state is JobState.SUCCEEDED and jobs[bad].state is JobState.FAILED
    w = web(JOBCELL_POOL=pool, JOBCELL_MEMORY_BUDGET="4GiB")

    with signed_in(browser, w) as page:
        cookie = next(c for c in page.context.cookies() if c["name"] == "jobcell_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert TOKEN not in cookie["value"]
        counts = page.locator("#counts")
        assert "succeeded" in counts.inner_text() and "failed" in counts.inner_text()
        assert page.locator("#budget figure").count() >= 1 and pool in page.locator("#budget").inner_text()
        shot(page, "overview")

        # the OOM escalation: two attempts, small killed at its cap, medium succeeded
        page.goto(f"{w.url}/jobs/{oom}")
        rows = page.locator("#attempts tbody tr.attempt")
        assert rows.count() == 2
        first, second = rows.nth(0).inner_text(), rows.nth(1).inner_text()
        assert "small" in first and "oom" in first and "64 MiB" in first
        assert "medium" in second and "succeeded" in second and "160 MiB" in second
        assert page.locator("#timeline rect.seg-oom").count() == 1
        assert page.locator("#timeline rect.seg-succeeded").count() == 1
        assert page.locator("#attempts rect.bar-peak-oom").count() == 1  # the killed attempt peaked at its cap
        assert "peak 64 MiB of 64 MiB (100%)" in page.locator("#attempts svg.peak").first.get_attribute("aria-label")
        shot(page, "job-oom-escalation")

        # the refused document: its reason, as text, and nothing of it run as markup
        page.goto(f"{w.url}/jobs/{bad}")
        assert EVIL in page.locator("#reason").inner_text()
        assert page.locator("script").count() == 0 and page.locator("main img").count() == 0
        assert "pwned" not in page.title() and page.title() != "1"
        row = page.locator("#attempts tbody tr.attempt")
        assert row.count() == 1 and "bad_input" in row.inner_text() and "65" in row.inner_text()
        # read-only: no cancel or retry unless JOBCELL_WEB_ACTIONS=true, though this job could be retried
        assert page.locator("form[method=post]").count() == 0 and page.locator("#retry-button").count() == 0
        shot(page, "job-refused")

        # the job list, filtered in the form
        page.goto(f"{w.url}/jobs")
        assert page.locator("#jobs tbody tr").count() == 3
        page.select_option("select[name=state]", "failed")
        page.click("form.filters button")
        page.wait_for_url("**/jobs?state=failed*")
        listed = page.locator("#jobs tbody tr")
        assert listed.count() == 1 and listed.first.locator("td").first.inner_text() == str(bad)
        shot(page, "jobs-failed")

    status, headers, body = fetch(f"{w.url}/jobs/{bad}", BEARER)
    assert status == 200
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in body and "<script" not in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "script-src" not in csp
    status, _, body = fetch(f"{w.url}/jobs/{bad}/retry", BEARER, data=b"csrf=x")
    assert status == 403 and "JOBCELL_WEB_ACTIONS=true" in body
    assert queue.get(bad).state is JobState.FAILED


def test_unauthenticated_requests_are_refused(queue, web, browser):
    job = diag(queue, message="private")
    w = web()
    for path in ("/", "/jobs", f"/jobs/{job}", "/jobs?state=failed"):
        status, headers, body = fetch(w.url + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer") and "private" not in body
    assert fetch(f"{w.url}/jobs/{job}/cancel", data=b"")[0] == 401
    assert fetch(f"{w.url}/?token=wrong-{TOKEN}")[0] == 401
    assert fetch(w.url + "/", {"Authorization": "Bearer nope"})[0] == 401
    assert fetch(w.url + "/", {"Cookie": "jobcell_session=" + TOKEN})[0] == 401  # the cookie is not the token
    assert queue.get(job).state is JobState.QUEUED

    status, headers, _ = fetch(f"{w.url}/jobs?token={TOKEN}&state=queued")
    assert status == 303 and headers["Location"] == "/jobs?state=queued"
    assert {"HttpOnly", "SameSite=Strict"} <= {p.strip() for p in headers["Set-Cookie"].split(";")}
    status, _, body = fetch(f"{w.url}/jobs/{job}", BEARER)
    assert status == 200 and "private" in body  # its diag params, shown once signed in
    assert fetch(f"{w.url}/?window=10min", BEARER)[0] == 200
    status, _, body = fetch(f"{w.url}/jobs?state=%3Cb%3E", BEARER)
    assert status == 400 and "&#x27;&lt;b&gt;&#x27;" in body  # a bad filter is named, escaped
    assert fetch(f"{w.url}/jobs?since=soon", BEARER)[0] == 400
    status, headers, _ = fetch(f"{w.url}//elsewhere.example/%0d%0aSet-Cookie:x=1?token={TOKEN}")
    assert status == 303 and headers["Location"].startswith("/elsewhere.example/%0D%0ASet-Cookie")

    context = browser.new_context()
    page = context.new_page()
    r = page.goto(w.url + "/")
    assert r is not None and r.status == 401
    assert "authentication required" in page.inner_text("body")
    shot(page, "unauthenticated")
    context.close()

    basic = web(auth="basic")
    assert fetch(basic.url + "/")[1]["WWW-Authenticate"].startswith("Basic")
    wrong = base64.b64encode(f"{USER}:not-the-password".encode()).decode()
    assert fetch(basic.url + "/", {"Authorization": f"Basic {wrong}"})[0] == 401
    assert fetch(basic.url + "/", BEARER)[0] == 401  # no token configured there
    right = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert fetch(basic.url + "/", {"Authorization": f"Basic {right}"})[0] == 200
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    page = context.new_page()
    r = page.goto(f"{basic.url}/jobs/{job}")
    assert r is not None and r.status == 200 and f"Job {job}" in page.inner_text("h1")
    context.close()


def test_page_count_grows_while_the_job_runs(docs, web, browser, tmp_path):  # noqa: F811 (fixture)
    pages = 6
    pdf = scanned_pdf(tmp_path / "scan.pdf", pages)
    docs.start(ocr_workers=1)  # one page at a time, so that each page lands on its own
    job = docs.submit(pdf)
    w = web(classes=DEFAULT_LIKE, JOBCELL_POOL=docs.pool, JOBCELL_MEMORY_BUDGET="6GiB")

    seen: list[int] = []
    shown_growing = False
    with signed_in(browser, w) as page:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            page.goto(f"{w.url}/jobs/{job}")
            done = int(page.inner_text("#pages-done"))
            total = page.inner_text("#pages-total")
            seen.append(done)
            if 0 < done < pages and not shown_growing:  # pages stored while the job runs
                shown_growing = True
                assert total == str(pages)
                assert "running" in page.inner_text("h1")
                shot(page, "job-pages-growing")
                page.goto(w.url + "/")
                running = page.locator("#running").inner_text()
                assert str(job) in running and f"/{pages} pages" in running
                shot(page, "overview-running")
                continue
            if "succeeded" in page.inner_text("h1"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"job {job} did not succeed in time; pages seen: {seen}")
        assert seen == sorted(seen), f"the page count went backwards: {seen}"
        growing = sorted({d for d in seen if 0 < d < pages})
        assert len(growing) >= 2, f"too few pages seen arriving one by one: {seen}"
        assert page.inner_text("#pages-done") == str(pages) and page.inner_text("#pages-total") == str(pages)
        assert "Page 3 line 0" in page.inner_text("#page-3")
        shot(page, "job-pages-done")


def test_cancel_and_retry_only_when_enabled(queue, start_dispatcher, pool, web, browser):
    bad = diag(queue, exit_code=65, message="not a document")
    slow = diag(queue, sleep_s=60)
    start_dispatcher()
    wait_final(queue, [bad])
    wait_for(lambda: queue.get(slow).state is JobState.RUNNING, 60, "the slow job to run")
    w = web(JOBCELL_POOL=pool, JOBCELL_WEB_ACTIONS="true")

    status, _, body = fetch(f"{w.url}/jobs/{slow}/cancel", BEARER, data=b"csrf=forged")
    assert status == 403 and "stale or forged" in body
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', fetch(f"{w.url}/jobs/{slow}", BEARER)[2])
    assert csrf is not None
    status, _, body = fetch(f"{w.url}/jobs/{slow}/cancel", {**BEARER, "Origin": "http://elsewhere.example"},
                            data=f"csrf={csrf.group(1)}".encode())
    assert status == 403 and "cross-site" in body
    assert queue.get(slow).state is JobState.RUNNING and not queue.get(slow).cancel_requested
    with signed_in(browser, w) as page:
        page.goto(f"{w.url}/jobs/{slow}")
        assert page.locator("#retry-button").count() == 0
        shot(page, "job-running-cancel-button")
        page.click("#cancel-button")
        page.wait_for_url(f"**/jobs/{slow}")
        assert wait_final(queue, [slow], timeout=60)[0].state is JobState.CANCELLED
        page.goto(f"{w.url}/jobs/{slow}")
        assert "cancelled" in page.inner_text("h1") and page.locator("#cancel-button").count() == 0

        page.goto(f"{w.url}/jobs/{bad}")
        assert page.locator("#cancel-button").count() == 0
        page.click("#retry-button")
        page.wait_for_url(f"**/jobs/{bad}")
        wait_for(lambda: queue.get(bad).attempt == 2 and queue.get(bad).state.final, 60, "the retried job to end")
        page.goto(f"{w.url}/jobs/{bad}")
        assert page.locator("#attempts tbody tr.attempt").count() == 2
        shot(page, "job-retried")


def test_running_jobs_show_their_live_memory(queue, start_dispatcher, web):
    """The runtime's last sample of a running cell (Docker's stats), written at each heartbeat: in the
    overview and in `jobcell status`, while the job holds its 40 MiB."""
    from .conftest import diag

    job = diag(queue, alloc_mib=40, sleep_s=20)
    start_dispatcher()
    w = web()

    def memory_now() -> int:
        rows = [r for r in queue.running_jobs() if r.id == job]
        return int(rows[0].memory_now or 0) if rows else 0

    used = wait_for(lambda: memory_now() > 40 * 1024 * 1024 and memory_now(), 30, "a live memory sample")
    assert used <= 64 * 1024 * 1024
    status, _, body = fetch(f"{w.url}/", BEARER)
    assert status == 200 and "memory now" in body and 'class="memory-now"' in body
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    env.update(JOBCELL_DATABASE_URL=queue.db.dsn, JOBCELL_CLASSES=json.dumps(TEST_CLASSES))
    out = subprocess.run([sys.executable, "-m", "dispatcher.cli", "status"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert "memory now" in out.stdout and "MiB" in out.stdout.split("memory now", 1)[1], out.stdout
