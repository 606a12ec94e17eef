"""The jobcell command line, run as a user runs it: a subprocess against a real Postgres."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.models import JobState

from .conftest import CORPUS, ROOT, classes_json


def jobcell(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path, pool: str) -> dict[str, str]:
    return dict(os.environ, JOBCELL_DATABASE_URL=db_url, JOBCELL_CLASSES=classes_json(),
                JOBCELL_STORE_DIR=str(tmp_path / "store"), JOBCELL_POOL=pool)


def test_migrate_is_idempotent(cli_env, pg_server):
    import uuid

    import psycopg

    empty = "e_" + uuid.uuid4().hex[:12]  # not a copy of the migrated template: nothing applied yet
    with psycopg.connect(pg_server, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{empty}"')
    env = dict(cli_env, JOBCELL_DATABASE_URL=pg_server.rsplit("/", 1)[0] + "/" + empty)
    first = jobcell("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert ("applied: 0001_queue.sql, 0002_pages.sql, 0003_sealed_cells.sql, 0004_client.sql, "
            "0005_dispatchers.sql, 0006_live_memory.sql") in first.stdout
    again = jobcell("migrate", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_classes_prints_the_default_table():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    out = jobcell("classes", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["class", "input", "bytes", "memory", "limit", "max", "running", "cpus", "timeout"]
    assert lines[1].split()[:1] + lines[1].split()[4:] == ["small", "512", "MiB", "15", "1", "10", "min"]
    assert lines[3].split()[:2] == ["large", "rest"]


@pytest.mark.parametrize("var, value, says", [
    ("JOBCELL_CLASSES", '[{"name": "small", "memory_limit_bytes": "1MiB", "max_running": 1, "timeout_s": 5}]',
     "classes.0.memory_limit_bytes"),
    ("JOBCELL_CLASSES_FILE", "/nonexistent/classes.toml", "does not exist"),
    ("JOBCELL_MEMORY_BUDGET", "150%", "JOBCELL_MEMORY_BUDGET"),
    ("JOBCELL_LEASE_TTL_S", "soon", "JOBCELL_LEASE_TTL_S"),
    ("JOBCELL_DPI", "40", "JOBCELL_DPI"),  # refused at start, not by five failed cells
    ("JOBCELL_OCR_LANG", "eng;rm -rf", "JOBCELL_OCR_LANG"),
    ("JOBCELL_JOB_ENV", "OPENAI_API_KEY", "JOBCELL_JOB_ENV: cells hold no credentials"),
    ("JOBCELL_STORE_MOUNT", "jobcell-store", "JOBCELL_STORE_MOUNT: cells no longer mount the store"),
    ("JOBCELL_RENDER_PLANS", '{"large": "starter"}', "are not Render instance type ids: use plan-srv-006"),
    ("JOBCELL_RUNTIME_BUDGETS", '{"render": "lots"}', "JOBCELL_RUNTIME_BUDGETS"),
    ("JOBCELL_CPU_BUDGET", "two", "JOBCELL_CPU_BUDGET: Value error, write auto, off, or a number of CPUs"),
    ("JOBCELL_WEBHOOK_URL", "https://app.invalid/hooks", "JOBCELL_WEBHOOK_URL needs JOBCELL_WEBHOOK_SECRET"),
    ("JOBCELL_WEBHOOK_URL", "ftp://app.invalid/hooks", "is not a webhook URL"),
    ("JOBCELL_CLASSES", '[{"name": "small", "memory_limit_bytes": "64MiB", "max_running": 1, "timeout_s": 5, '
                        '"runtime": "render"}]', "a class routed to render needs JOBCELL_S3_BUCKET"),
])
def test_a_bad_config_is_refused_at_start_saying_what_to_fix(var, value, says):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    env.update({var: value, "JOBCELL_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    out = jobcell("run", env=env, timeout=30)
    assert out.returncode == 2
    assert says in out.stderr and "Traceback" not in out.stderr


def test_a_budget_below_the_top_tier_is_refused_at_start(cli_env):
    out = jobcell("run", env=dict(cli_env, JOBCELL_MEMORY_BUDGET="100MiB"), timeout=30)
    assert out.returncode == 2 and "raise JOBCELL_MEMORY_BUDGET" in out.stderr


def test_a_cpu_budget_below_a_class_cpus_is_refused_at_start(cli_env):
    classes = '[{"name": "big", "memory_limit_bytes": "64MiB", "max_running": 1, "timeout_s": 5, "cpus": 4}]'
    out = jobcell("run", env=dict(cli_env, JOBCELL_CLASSES=classes, JOBCELL_CPU_BUDGET="2"), timeout=30)
    assert out.returncode == 2 and "raise JOBCELL_CPU_BUDGET or lower that class's cpus" in out.stderr


def test_an_oci_runtime_the_engine_lacks_is_refused_at_start(cli_env):
    out = jobcell("run", env=dict(cli_env, JOBCELL_OCI_RUNTIME="nosuch"), timeout=30)
    assert out.returncode == 2 and "JOBCELL_OCI_RUNTIME=nosuch: the Docker engine has no such runtime (it has" \
        in out.stderr and "runc" in out.stderr


def test_a_missing_job_image_is_refused_at_start(cli_env):
    out = jobcell("run", env=dict(cli_env, JOBCELL_JOB_IMAGE="jobcell-job:does-not-exist"), timeout=30)
    assert out.returncode == 2 and "'jobcell-job:does-not-exist' is not on this Docker engine" in out.stderr


def test_missing_database_url_is_explained():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    out = jobcell("status", env=env)
    assert out.returncode == 2 and "JOBCELL_DATABASE_URL is not set" in out.stderr


def test_submit_stores_once_and_deduplicates(cli_env, tmp_path, queue):
    doc = CORPUS / "tesseract-phototest.tif"
    first = jobcell("submit", str(doc), "--priority", "3", env=cli_env)
    assert first.returncode == 0, first.stderr
    job_id = int(first.stdout.split()[1].rstrip(":"))
    again = jobcell("submit", str(doc), env=cli_env)
    assert f"job {job_id}:" in again.stdout and "already submitted" in again.stdout
    job = queue.get(job_id)
    assert (job.state, job.size_class, job.priority, job.document_bytes) == (
        JobState.QUEUED, "small", 3, doc.stat().st_size)
    stored = list((tmp_path / "store").iterdir())
    assert len(stored) == 1 and stored[0].read_bytes() == doc.read_bytes()


def test_submit_of_a_missing_file_fails_clearly(cli_env, queue):
    out = jobcell("submit", "/nonexistent/scan.pdf", env=cli_env)
    assert out.returncode == 2 and "/nonexistent/scan.pdf: no such file" in out.stderr


def test_status_show_and_cancel(cli_env, queue):
    out = jobcell("submit", "--diag", "sleep_s=30", env=cli_env)
    job_id = int(out.stdout.split()[1].rstrip(":"))
    status = jobcell("status", env=cli_env)
    assert status.returncode == 0
    assert status.stdout.splitlines()[1].split() == ["queued", "1", "0", "0"]
    cancel = jobcell("cancel", str(job_id), env=cli_env)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    show = jobcell("show", str(job_id), env=cli_env)
    assert f"job {job_id}: cancelled" in show.stdout and "reason: cancelled by request" in show.stdout


def test_claims_follow_priority_then_age(queue):
    from dispatcher.models import MIB

    from .conftest import diag

    low = diag(queue, priority=0)
    high = diag(queue, priority=5)
    older_low = low
    newer_low = diag(queue, priority=0)
    taken = [c.job.id for c in queue.claim("d", "p", 4096 * MIB, 3)]
    assert taken == [high, older_low, newer_low]


def test_kubernetes_needs_an_explicit_memory_budget():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    env.update(JOBCELL_RUNTIME="kubernetes", JOBCELL_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    out = jobcell("run", env=env, timeout=30)
    assert out.returncode == 2 and "JOBCELL_MEMORY_BUDGET must be an amount" in out.stderr


def test_render_needs_its_api_key_and_service():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBCELL_", "RENDER_"))}
    env.update(JOBCELL_RUNTIME="render", JOBCELL_MEMORY_BUDGET="8GiB", JOBCELL_S3_BUCKET="docs",
               JOBCELL_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    out = jobcell("run", env=env, timeout=30)
    assert out.returncode == 2 and "needs RENDER_API_KEY" in out.stderr


def test_a_class_routed_to_another_runtime_needs_a_budget_there(cli_env):
    classes = '[{"name": "small", "max_input_bytes": "5MB", "memory_limit_bytes": "64MiB", "max_running": 2, ' \
              '"timeout_s": 60}, {"name": "large", "memory_limit_bytes": "2GiB", "max_running": 1, ' \
              '"timeout_s": 600, "runtime": "render"}]'
    env = dict(cli_env, JOBCELL_RUNTIME="process", JOBCELL_CLASSES=classes, JOBCELL_S3_BUCKET="docs",
               JOBCELL_RENDER_SERVICE_ID="srv-cell", RENDER_API_KEY="rnd_test", JOBCELL_MEMORY_BUDGET="256MiB")
    out = jobcell("run", env=env, timeout=30)
    assert out.returncode == 2 and "JOBCELL_RUNTIME_BUDGETS needs a memory budget for 'render' (class large)" \
        in out.stderr, out.stderr


@pytest.mark.parametrize("runtime", ["kubernetes", "render"])
def test_runtimes_without_stdin_need_an_object_store(runtime):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBCELL_", "RENDER_"))}
    env.update(JOBCELL_RUNTIME=runtime, JOBCELL_MEMORY_BUDGET="8GiB",
               JOBCELL_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    out = jobcell("run", env=env, timeout=30)
    assert out.returncode == 2 and "needs JOBCELL_S3_BUCKET" in out.stderr, out.stderr


def test_status_shows_running_jobs_and_budget_use(cli_env, queue, start_dispatcher, pool):
    from .conftest import diag, wait_for

    job = diag(queue, sleep_s=30)
    start_dispatcher()
    wait_for(lambda: queue.attempts(job) and queue.attempts(job)[0].started_at, what="a running job")
    out = jobcell("status", env=dict(cli_env, JOBCELL_MEMORY_BUDGET="1GiB"))
    assert out.returncode == 0, out.stderr
    running = next(ln for ln in out.stdout.splitlines() if ln.startswith(str(job)))
    assert running.split()[1:4] == ["small", "64", "MiB"]
    assert f"pool {pool}: 64 MiB of memory limits in use of the 1 GiB budget (6%)" in out.stdout
    queue.cancel(job)


@pytest.mark.parametrize("args, says", [
    (["submit", "--priority", "99999999999", "x.pdf"], "out of range: -1000 to 1000"),
    (["submit", "--max-attempts", "0", "x.pdf"], "out of range: 1 to 100"),
    (["submit", "--max-attempts", "-1", "x.pdf"], "out of range: 1 to 100"),
    (["submit", "--diag", "alloc_mib=abc"], "alloc_mib takes a number"),
    (["submit", "--diag", ""], "expected key=value pairs"),
    (["submit", "--diag", "bogus=1"], "'bogus=1': expected key=value pairs"),
    (["submit", "--diag", "exit_code=300"], "an exit code is 0 to 255"),
    (["submit", "--lang", "eng;rm", "x.pdf"], "--lang 'eng;rm'"),
    (["submit", "--class", "huge", "x.pdf"], "--class 'huge': no such class"),
    (["submit", "/tmp"], "/tmp: is a directory"),
    (["submit", "--webhook", "file:///etc/passwd", "/etc/hostname"], "is not a webhook URL: expected http(s)://"),
    (["report", "424242"], "no job 424242"),
    (["show", "424242"], "no job 424242"),
])
def test_bad_arguments_get_one_clear_line_and_change_nothing(cli_env, queue, args, says):
    out = jobcell(*args, env=cli_env, timeout=60)
    assert out.returncode != 0, out.stdout
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert queue.counts() == []  # nothing half-written


@pytest.mark.parametrize("url, says", [
    ("not-a-url", "JOBCELL_DATABASE_URL is not a connection URL"),
    ("postgresql://jobcell:wrong-password@127.0.0.1:{port}/postgres", "password authentication failed"),
])
def test_a_bad_database_url_is_refused_at_once_without_its_password(cli_env, pg_server, url, says):
    port = pg_server.rsplit(":", 1)[1].split("/")[0]
    out = jobcell("status", env=dict(cli_env, JOBCELL_DATABASE_URL=url.format(port=port)), timeout=30)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "wrong-password" not in out.stderr


def test_a_broken_pipe_is_quiet(cli_env, queue):
    from .conftest import diag

    for _ in range(30):
        diag(queue)
    out = subprocess.run(f"{sys.executable} -m dispatcher.cli submit --diag sleep_s=0 && "
                         f"{sys.executable} -m dispatcher.cli status | head -1", shell=True, cwd=ROOT, env=cli_env,
                         text=True, capture_output=True, timeout=60)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_version_and_retry_from_the_command_line(cli_env, queue, tmp_path):
    from jobcell import __version__

    assert jobcell("--version").stdout.strip() == f"jobcell {__version__}"
    notes = tmp_path / "notes.pdf"
    notes.write_text("just some text, named .pdf")
    out = jobcell("submit", str(notes), env=cli_env)
    job_id = int(out.stdout.split()[1].rstrip(":"))
    refused = jobcell("retry", str(job_id), env=cli_env)
    assert refused.returncode == 2 and "is queued: only a failed or cancelled job can be retried" in refused.stderr
    assert jobcell("cancel", str(job_id), env=cli_env).returncode == 0
    again = jobcell("retry", str(job_id), env=cli_env)
    assert again.returncode == 0 and "queued again" in again.stdout, again.stderr
    assert queue.get(job_id).state is JobState.QUEUED
    dup = jobcell("submit", str(notes), env=cli_env)
    assert f"job {job_id}:" in dup.stdout and "already submitted" in dup.stdout
    assert f"job {job_id}:" not in jobcell("submit", "--force", str(notes), env=cli_env).stdout


def test_prune_removes_exactly_what_is_older_than_the_cutoff_and_its_dry_run_nothing(cli_env, queue, db_url,
                                                                                       tmp_path):
    from .conftest import sql

    old_doc, new_doc, shared_doc = (tmp_path / f"{n}.pdf" for n in ("old", "new", "shared"))
    for i, p in enumerate((old_doc, new_doc, shared_doc)):
        p.write_bytes(b"%PDF-1.4 " + bytes([i]) * 100)

    def job_of(path: Path, *extra: str) -> int:
        return int(jobcell("submit", *extra, str(path), env=cli_env).stdout.split()[1].rstrip(":"))

    old, new, running = job_of(old_doc), job_of(new_doc), job_of(tmp_path / "shared.pdf")
    old_sharing = job_of(shared_doc, "--force")  # the same stored document as `running`
    store = tmp_path / "store"
    before = sorted(p.name for p in store.iterdir())
    sql(db_url, "UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '40 days' WHERE id = ANY(%s)",
        [old, old_sharing])
    sql(db_url, "UPDATE jobs SET state = 'succeeded', finished_at = now() - interval '2 days' WHERE id = %s", new)
    sql(db_url, "UPDATE jobs SET state = 'running', lease_owner = 'd', finished_at = NULL,"
                " updated_at = now() - interval '90 days' WHERE id = %s", running)
    sql(db_url, "INSERT INTO document_pages (job_id, page, attempt, dpi, width, height, text, words, ocr_seconds)"
                " VALUES (%s, 1, 1, 200, 1, 1, 'old text', '[]', 0.1)", old)

    dry = jobcell("prune", "--older-than", "30d", env=cli_env)
    assert dry.returncode == 0 and "would delete 2 finished job(s) older than 30d" in dry.stdout, dry.stderr
    assert len(sql(db_url, "SELECT id FROM jobs")) == 4 and sorted(p.name for p in store.iterdir()) == before

    done = jobcell("prune", "--older-than", "30d", "--yes", env=cli_env)
    assert done.returncode == 0 and "deleted 2 job(s)" in done.stdout and "1 stored document(s)" in done.stdout
    assert sorted(r[0] for r in sql(db_url, "SELECT id FROM jobs")) == sorted([new, running])
    assert sql(db_url, "SELECT * FROM document_pages WHERE job_id = %s", old) == []
    left = sorted(p.name for p in store.iterdir())
    assert len(left) == 2  # the new job's document, and the one the running job still uses
    assert jobcell("prune", "--older-than", "soon", env=cli_env).returncode == 2


def test_wait_warns_when_no_dispatcher_is_running(cli_env, queue):
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "submit", "--diag", "sleep_s=0", "--wait"],
                            cwd=ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=9)
    except subprocess.TimeoutExpired:
        proc.send_signal(2)  # Ctrl-C: the job stays queued, and jobcell says so without a traceback
        _, err = proc.communicate(timeout=10)
    assert "no dispatcher has been seen in the last minute" in err, err
    assert "interrupted (submitted jobs keep running" in err and "Traceback" not in err
    status = jobcell("status", env=cli_env)
    assert "warning: no dispatcher has been seen" in status.stdout


def test_status_names_the_running_dispatchers(cli_env, queue, start_dispatcher):
    start_dispatcher(owner="disp-under-test")
    from .conftest import wait_for

    wait_for(lambda: "dispatcher disp-under-test" in jobcell("status", env=cli_env).stdout, timeout=30,
             what="the dispatcher in status")
    assert "warning" not in jobcell("status", env=cli_env).stdout


def test_list_filters_and_json_output(cli_env, queue, db_url):
    import json

    from .conftest import diag, sql

    queued, failed = diag(queue), diag(queue, size_class="medium")
    sql(db_url, "UPDATE jobs SET state = 'failed', reason = 'refused by design', finished_at = now() WHERE id = %s",
        failed)
    table = jobcell("list", env=cli_env)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["job", "state", "class"]
    rows = json.loads(jobcell("list", "--state", "failed", "--json", env=cli_env).stdout)
    assert [(r["id"], r["state"], r["reason"]) for r in rows] == [(failed, "failed", "refused by design")]
    assert [r["id"] for r in json.loads(jobcell("list", "--class", "small", "--json", env=cli_env).stdout)] == [queued]
    assert json.loads(jobcell("list", "--since", "1h", "--json", env=cli_env).stdout)[0]["id"] == failed  # newest
    shown = json.loads(jobcell("show", str(failed), "--json", env=cli_env).stdout)
    assert shown["id"] == failed and shown["attempts"] == []
    bad = jobcell("list", "--state", "lost", env=cli_env)
    assert bad.returncode == 2 and "--state 'lost': one of queued, running" in bad.stderr


def test_pause_and_resume_a_class_from_the_command_line(cli_env, queue, start_dispatcher, pool):
    import json

    from dispatcher.memory import MemoryRuntime

    from .conftest import diag, wait_final

    small, medium = diag(queue), diag(queue, size_class="medium")
    paused = jobcell("pause", "--class", "small", "--reason", "scanner firmware update", env=cli_env)
    assert paused.returncode == 0 and "paused class small" in paused.stdout
    start_dispatcher(rt=MemoryRuntime(pool=pool))
    assert wait_final(queue, [medium], timeout=30)[0].state is JobState.SUCCEEDED
    assert queue.get(small).state is JobState.QUEUED  # the dispatcher ran the rest, not the paused class
    status = jobcell("status", env=cli_env).stdout
    assert "paused: class small since" in status and "scanner firmware update" in status
    as_json = json.loads(jobcell("status", "--json", env=cli_env).stdout)
    assert [p["scope"] for p in as_json["paused"]] == ["small"] and as_json["counts"]["queued"]["small"] == 1
    assert jobcell("resume", "--class", "small", env=cli_env).stdout.strip() == "resumed class small"
    assert wait_final(queue, [small], timeout=30)[0].state is JobState.SUCCEEDED
    assert "was not paused" in jobcell("resume", env=cli_env).stdout
    report = json.loads(jobcell("report", str(small), str(medium), "--json", env=cli_env).stdout)
    assert [(r["id"], r["state"], r["path"]) for r in report] == [(small, "succeeded", "small succeeded"),
                                                                  (medium, "succeeded", "medium succeeded")]
    bad = jobcell("pause", "--class", "huge", env=cli_env)
    assert bad.returncode == 2 and "no class 'huge' to pause or resume; known: small, medium, large" in bad.stderr


def test_the_dispatcher_prunes_on_a_schedule_when_asked(cli_env, queue, db_url, tmp_path, docker_client, job_image):
    from .conftest import diag, sql, wait_for

    old, recent, waiting = diag(queue), diag(queue), diag(queue, sleep_s=600)
    sql(db_url, "UPDATE jobs SET state = 'failed', finished_at = now() - interval '3 hours' WHERE id = %s", old)
    sql(db_url, "UPDATE jobs SET state = 'failed', finished_at = now() - interval '10 minutes' WHERE id = %s",
        recent)
    sql(db_url, "UPDATE jobs SET state = 'cancelled', finished_at = now() - interval '1 day', "
                "cancel_requested = true WHERE id = %s", waiting)
    sql(db_url, "UPDATE jobs SET state = 'queued', finished_at = NULL, cancel_requested = false, "
                "scheduled_at = now() + interval '1 day' WHERE id = %s", waiting)  # queued, old, never pruned
    env = dict(cli_env, JOBCELL_PRUNE_AFTER="1h", JOBCELL_PRUNE_EVERY_S="1", JOBCELL_POLL_INTERVAL_S="0.2")
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: not sql(db_url, "SELECT 1 FROM jobs WHERE id = %s", old), timeout=60, what="the prune")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert sorted(r[0] for r in sql(db_url, "SELECT id FROM jobs")) == [recent, waiting]
    assert "retention: deleted 1 finished job(s) older than 3600 s" in out, out
    refused = jobcell("run", env=dict(cli_env, JOBCELL_PRUNE_AFTER="5m"), timeout=30)
    assert refused.returncode == 2 and "JOBCELL_PRUNE_AFTER" in refused.stderr and "at least an hour" in refused.stderr


def test_wait_on_a_terminal_shows_a_live_progress_display(cli_env, queue, start_dispatcher, pool):
    import pty

    from dispatcher.memory import MemoryRuntime

    start_dispatcher(rt=MemoryRuntime(pool=pool))
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "submit", "--diag", "sleep_s=2", "--wait"],
                            cwd=ROOT, env=dict(cli_env, COLUMNS="100"), stdin=follower, stdout=follower,
                            stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(30) == 0
    text = seen.decode(errors="replace")
    assert "\x1b[" in text and "━" in text  # rich drew a live bar on the terminal (cursor moves, a bar)
    assert "running (attempt 1, tier small)" in text and "1 succeeded, 0 failed or cancelled" in text


def test_plain_progress_gives_an_eta_from_the_pages_seen_arriving():
    from dispatcher import cli

    clock = iter([100.0, 110.0, 120.0])
    rate = cli._Rate(clock=lambda: next(clock))
    assert rate.eta_s(7, 10, 100) is None  # one reading: no rate yet
    assert rate.eta_s(7, 20, 100) == pytest.approx(80.0)  # 10 pages in 10 s, 80 to go
    assert cli._eta(rate.eta_s(7, 40, 100)) == ", about 40 s left"  # 30 pages in 20 s, 60 to go
    assert cli._eta(600.0) == ", about 10 min left" and cli._eta(None) == ""


def test_classes_recommend_calibrates_from_recorded_peaks_and_writes_a_table(cli_env, queue, tmp_path):
    from dispatcher.models import MIB, Exit, Outcome
    from dispatcher.ports import Finish

    from .conftest import diag

    for i in range(25):  # medium (160 MiB) attempts that peaked at 40 to 64 MiB, recorded by the real queue
        job = diag(queue, size_class="medium")
        [c] = queue.claim("d", "p", 4096 * MIB, 1)
        ended = Exit(0, peak_memory_bytes=(40 + i) * MIB)
        assert queue.finish("d", Finish(job, c.job.attempt, Outcome.SUCCEEDED, ended, 1.0, "succeeded", "medium", 0.0,
                                        None, need_bytes=(50 + i) * MIB))
    out = jobcell("classes", "--recommend", "--write", str(tmp_path / "calibrated.toml"), env=cli_env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:4]}
    assert rows["medium"][:3] == ["medium", "160", "MiB"] and "80 MiB" in out.stdout  # p95 63 MiB x 1.2, rounded up
    assert "fewer than 20" in " ".join(rows["small"])  # no evidence: kept
    assert "median succeeded attempt: peak 52 MiB, reserved 160 MiB (3.1x) now, 80 MiB (1.5x)" in out.stdout
    applied = jobcell("classes", "--json", env=dict(cli_env, JOBCELL_CLASSES="",
                                                    JOBCELL_CLASSES_FILE=str(tmp_path / "calibrated.toml")))
    assert [c["memory_limit_bytes"] // MIB for c in json.loads(applied.stdout)] == [64, 80, 256]
    bad = jobcell("classes", "--recommend", "--since", "soon", env=cli_env)
    assert bad.returncode == 2 and "--since: 'soon' is not a duration" in bad.stderr
