"""The dispatcher seen from outside: /metrics scraped and parsed with Prometheus' own parser, /healthz and
/readyz against a running dispatcher (real Postgres, real engine) and an unreachable database, the settings
refused at start, and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.classes import SizeClassTable, load_table
from dispatcher.loop import Dispatcher, LoopConfig
from dispatcher.memory import MemoryRuntime
from dispatcher.models import MIB, JobState
from dispatcher.observe import HttpServer, JsonFormatter, PrometheusObserver
from dispatcher.queue import PostgresQueue

from .conftest import ROOT, TEST_CLASSES, Running, classes_json, diag, wait_final, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def status_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:  # not listening yet
        return None


def scrape(url: str) -> Samples:
    status, text = get(url + "/metrics")
    assert status == 200, text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(name, frozenset(labels.items()))]


def bucket(m: Samples, name: str, tier: str, le: float) -> float:
    """A histogram bucket's count; `le` compared as a number (the exposition writes 6.7108864e+07)."""
    [got] = [v for (n, labels), v in m.items() if n == name + "_bucket" and dict(labels).get("tier") == tier
             and float(dict(labels)["le"]) == le]
    return got


def port_nobody_listens_on() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http(table: SizeClassTable) -> Iterator[HttpServer]:
    server = HttpServer(PrometheusObserver(table.names, stale_after_s=3 * 0.2 + 30), "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


# -- a real dispatcher ----------------------------------------------------------------------------------

def test_metrics_and_probes_of_a_running_dispatcher(start_dispatcher, queue, pool, http):
    url, observer = http.url, http.observer
    assert http.port > 0  # port 0 took a free one
    observer.watch_queue(queue.job_metrics, pool, 4096 * MIB)
    status, why = get(url + "/readyz")
    assert status == 503 and "no pass of the loop" in why, why  # before the first tick
    status, why = get(url + "/healthz")
    assert status == 200 and why.startswith("starting"), why

    start_dispatcher(budget_mib=4096, observer=observer)
    wait_for(lambda: get(url + "/readyz")[0] == 200, 30, "readiness")
    status, why = get(url + "/healthz")
    assert status == 200 and why.startswith("ok"), why

    slow = diag(queue, sleep_s=3)
    wait_for(lambda: queue.get(slow).state is JobState.RUNNING, 30, "the job to run")
    m = scrape(url)  # read from the database at scrape time, while it runs
    assert value(m, "jobcell_jobs", state="running", size_class="small") == 1
    assert value(m, "jobcell_memory_in_use_bytes", pool=pool) == 64 * MIB  # the small tier's limit
    assert value(m, "jobcell_memory_budget_bytes", pool=pool) == 4096 * MIB

    oom = diag(queue, alloc_mib=100)  # over the 64 MiB small tier: OOM-killed, then succeeds on medium
    jobs = wait_final(queue, [slow, oom])
    assert [(j.state, j.tier) for j in jobs] == [(JobState.SUCCEEDED, "small"), (JobState.SUCCEEDED, "medium")]

    m = scrape(url)
    attempts = {(dict(k)["outcome"], dict(k)["tier"]): v for (n, k), v in m.items()
                if n == "jobcell_attempts_total" and v}
    assert attempts == {("succeeded", "small"): 1, ("oom", "small"): 1, ("succeeded", "medium"): 1}
    assert value(m, "jobcell_attempts_total", outcome="error", tier="large") == 0  # every series from the start
    assert value(m, "jobcell_oom_escalations_total", tier="small") == 1
    assert value(m, "jobcell_oom_escalations_total", tier="medium") == 0
    assert value(m, "jobcell_jobs", state="succeeded", size_class="small") == 2  # the class it was submitted as
    assert value(m, "jobcell_jobs", state="running", size_class="small") == 0
    assert value(m, "jobcell_memory_in_use_bytes", pool=pool) == 0
    assert value(m, "jobcell_queue_up") == 1
    for name in ("jobcell_queue_wait_seconds_count", "jobcell_attempt_run_seconds_count"):
        assert value(m, name, tier="small") == 2 and value(m, name, tier="medium") == 1, name
    assert value(m, "jobcell_attempt_run_seconds_sum", tier="small") >= 3  # the slow job slept 3 s
    # the OOM-killed attempt peaked at its 64 MiB limit; the medium one held its 100 MiB
    assert bucket(m, "jobcell_attempt_peak_memory_bytes", "small", 64 * MIB) >= 1
    assert bucket(m, "jobcell_attempt_peak_memory_bytes", "medium", 64 * MIB) == 0
    assert bucket(m, "jobcell_attempt_peak_memory_bytes", "medium", 128 * MIB) == 1
    assert value(m, "jobcell_loop_passes_total", result="ok") > 0
    assert value(m, "jobcell_loop_passes_total", result="failed") == 0

    status, why = get(url + "/readyz")
    assert (status, why) == (200, "ready\n")
    assert get(url + "/nothing")[0] == 404


def test_readyz_is_503_while_the_database_is_unreachable(table, http):
    """A dispatcher pointed at a port nobody listens on: alive (its loop goes on, backing off) but not ready."""
    q = PostgresQueue(f"postgresql://jobcell:pw@127.0.0.1:{port_nobody_listens_on()}/jobcell", table,
                      give_up_after_s=0)  # fail the tick at once instead of waiting the outage out inside it
    observer = http.observer
    observer.watch_queue(q.job_metrics, "p-down", 1024 * MIB)
    d = Dispatcher(q, MemoryRuntime(pool="p-down"), table,
                   LoopConfig(owner="d-down", pool="p-down", budget_bytes=1024 * MIB, poll_s=0.2), observer=observer)
    r = Running(d)
    try:
        why = wait_for(lambda: (lambda s, b: b if s == 503 and "failed" in b else None)(*get(http.url + "/readyz")),
                       15, "a failed pass")
        assert why.startswith("not ready: the last pass failed (DatabaseUnavailable: cannot use the database at "
                              "127.0.0.1:"), why
        assert why.count("\n") == 1
        status, alive = get(http.url + "/healthz")
        assert status == 200, alive  # not stuck: restarting it would not bring the database back
        m = scrape(http.url)  # the scrape itself succeeds
        assert value(m, "jobcell_queue_up") == 0
        assert not any(n == "jobcell_jobs" for n, _ in m)
        assert value(m, "jobcell_loop_passes_total", result="failed") >= 1
    finally:
        r.stop(timeout=30)
        q.close()
    status, why = get(http.url + "/healthz")
    assert (status, why) == (503, "the dispatcher loop has stopped\n")


# -- the probes' rules, on a clock of our own -------------------------------------------------------------

def test_health_and_readiness_follow_the_loop():
    now = [1000.0]
    observer = PrometheusObserver(["small"], stale_after_s=33, clock=lambda: now[0])
    assert observer.health()[0] and not observer.ready()[0]
    now[0] += 34  # no pass has ended since start: stuck waiting for something
    ok, why = observer.health()
    assert not ok and "since start" in why

    observer.ticked(True)
    assert observer.health() == (True, "ok: the loop ended a pass 0.0 s ago") and observer.ready() == (True, "ready")
    observer.ticked(False, "DatabaseUnavailable: cannot use the database at db:5432/jobcell: refused\nDETAIL: x")
    assert observer.health()[0]
    assert observer.ready() == (False, "not ready: the last pass failed (DatabaseUnavailable: cannot use the "
                                       "database at db:5432/jobcell: refused)")
    now[0] += 34  # a pass that never ends (the database's outage waited out inside it): neither alive nor ready
    ok, why = observer.health()
    assert not ok and "34 s ago" in why
    assert observer.ready() == (False, "not ready: no pass of the loop has ended in 34 s")

    t = threading.Thread(target=observer.ticked, args=(True,))  # the loop's thread, which then ends
    t.start()
    t.join()
    assert observer.health() == (False, "the dispatcher loop has stopped")
    assert not observer.ready()[0]


# -- settings and the command line ----------------------------------------------------------------------

def jobcell(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCELL_")}
    return {**env, "JOBCELL_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", **extra}


@pytest.mark.parametrize("var, value, says", [
    ("JOBCELL_HTTP_PORT", "70000", "less than or equal to 65535"),
    ("JOBCELL_HTTP_PORT", "0", "greater than or equal to 1"),
    ("JOBCELL_HTTP_PORT", "metrics", "valid integer"),
    ("JOBCELL_LOG_FORMAT", "xml", "'text' or 'json'"),
])
def test_a_bad_setting_is_refused_at_start_in_one_line(var, value, says):
    out = jobcell("run", env=bare_env(**{var: value}))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    [line] = [x for x in out.stderr.splitlines() if var in x]
    assert says in line, out.stderr


def test_a_port_in_use_is_refused_at_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = jobcell("run", env=bare_env(JOBCELL_HTTP_PORT=str(port)))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"jobcell: JOBCELL_HTTP_PORT/JOBCELL_HTTP_HOST: cannot listen on "
                                       f"127.0.0.1:{port} (Address already in use)"]


def test_jobcell_run_serves_probes_and_metrics_and_logs_json(db_url, queue, pool, job_image, tmp_path):
    port = port_nobody_listens_on()
    env = dict(os.environ, JOBCELL_DATABASE_URL=db_url, JOBCELL_CLASSES=classes_json(), JOBCELL_POOL=pool,
               JOBCELL_STORE_DIR=str(tmp_path / "store"), JOBCELL_JOB_IMAGE=job_image, JOBCELL_POLL_INTERVAL_S="0.2",
               JOBCELL_HTTP_PORT=str(port), JOBCELL_LOG_FORMAT="json")
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "dispatcher.log"  # a file, not a pipe: DEBUG logs must never block the dispatcher
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "-v", "run"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_for(lambda: status_or_none(url + "/readyz") == 200, 60, "the dispatcher to be ready")
            assert get(url + "/healthz")[0] == 200
            job = diag(queue, sleep_s=0)
            [done] = wait_final(queue, [job])
            assert done.state is JobState.SUCCEEDED
            m = scrape(url)
            assert value(m, "jobcell_attempts_total", outcome="succeeded", tier="small") == 1
            assert value(m, "jobcell_jobs", state="succeeded", size_class="small") == 1
            assert value(m, "process_resident_memory_bytes") > 0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert status_or_none(url + "/healthz") is None  # the server stopped with the dispatcher

    records = [json.loads(line) for line in log_path.read_text().splitlines()]  # every line is one object
    assert any(r["logger"] == "jobcell.observe" and r["message"] == f"serving /metrics, /healthz and /readyz on "
               f"{url}" for r in records)
    [ended] = [r for r in records if r.get("job") == job and "succeeded" in r["message"]]
    assert (ended["attempt"], ended["tier"], ended["level"], ended["logger"]) == (1, "small", "INFO",
                                                                                  "jobcell.dispatcher")
    assert ended["time"].endswith("Z")
    assert any(r["level"] == "DEBUG" for r in records)  # -v still applies


def test_json_log_lines_carry_the_job_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("jobcell.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("job %s attempt %s: launching on %s", 7, 2, "small",
                       extra={"job": 7, "attempt": 2, "tier": "small"})
        logger.info("plain \"quoted\" line\nwith a newline")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # one line per record, whatever the message holds
    first, second, third = (json.loads(x) for x in lines)
    assert {k: first[k] for k in ("level", "logger", "message", "job", "attempt", "tier")} == {
        "level": "WARNING", "logger": "jobcell.test-json", "message": "job 7 attempt 2: launching on small",
        "job": 7, "attempt": 2, "tier": "small"}
    assert second["message"] == "plain \"quoted\" line\nwith a newline" and "job" not in second
    assert third["exception"].startswith("Traceback") and "ValueError: boom" in third["exception"]


def test_the_default_table_names_every_tier_in_metrics():
    """Unit: every (outcome, tier) series exists at 0 before any attempt, for rate() and alerts."""
    table = load_table(TEST_CLASSES)
    observer = PrometheusObserver(table.names, stale_after_s=33)
    server = HttpServer(observer, "127.0.0.1", 0)
    server.start()
    try:
        m = scrape(server.url)
    finally:
        server.stop()
    got = {dict(k)["tier"] for (n, k), _ in m.items() if n == "jobcell_attempts_total"}
    assert got == {"small", "medium", "large"}
    assert not any(n == "jobcell_jobs" for n, _ in m)  # no database given: no job counts, not zeros
