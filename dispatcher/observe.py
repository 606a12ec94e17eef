"""The dispatcher seen from outside: Prometheus metrics, /healthz and /readyz, and JSON log lines.

Off unless JOBCELL_HTTP_PORT is set (dispatcher/wiring.py builds it). The loop only calls the Observer port
(dispatcher/ports.py), so prometheus_client stays out of the pure core.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .models import MIB, JobState, Outcome
from .ports import Finish, Observer

log = logging.getLogger("jobcell.observe")

# Waits go from "claimed at once" to "queued behind a day's backlog"; runs from a blank page to a long scan.
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
RUN_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
PEAK_BUCKETS = tuple(float(2**i * MIB) for i in range(4, 17))  # 16 MiB to 64 GiB: where tiers are set

JobMetrics = Callable[[str], tuple[dict[tuple[str, str], int], int]]  # PostgresQueue.job_metrics


class PrometheusObserver(Observer):
    """The loop's Observer: counts attempts as they end and remembers how its last pass went (for the probes).
    Every metric lives in a registry of its own, so that several dispatchers in one process never collide."""

    def __init__(self, tiers: Sequence[str], stale_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.tiers = list(tiers)
        self.stale_after_s = stale_after_s
        self._clock = clock
        r = self.registry
        self.attempts = Counter("jobcell_attempts", "Attempts ended, by outcome and the tier they ran on",
                                ["outcome", "tier"], registry=r)
        self.oom_escalations = Counter("jobcell_oom_escalations", "OOM kills that moved a job to the next tier, "
                                       "by the tier it was killed on", ["tier"], registry=r)
        self.queue_wait = Histogram("jobcell_queue_wait_seconds", "From a job becoming runnable to its attempt "
                                    "being claimed", ["tier"], buckets=WAIT_BUCKETS, registry=r)
        self.run_time = Histogram("jobcell_attempt_run_seconds", "How long each attempt's unit ran", ["tier"],
                                  buckets=RUN_BUCKETS, registry=r)
        self.peak_memory = Histogram("jobcell_attempt_peak_memory_bytes", "Peak memory of each attempt (its "
                                     "limit when OOM-killed)", ["tier"], buckets=PEAK_BUCKETS, registry=r)
        self.ticks = Counter("jobcell_loop_passes", "Passes of the dispatcher loop, by result", ["result"],
                             registry=r)
        # Every known series from the start: rate() and increase() need a 0 before the first event.
        for tier in self.tiers:
            for outcome in Outcome:
                self.attempts.labels(outcome.value, tier)
            for metric in (self.oom_escalations, self.queue_wait, self.run_time, self.peak_memory):
                metric.labels(tier)
        for result in ("ok", "failed"):
            self.ticks.labels(result)
        self._lock = threading.Lock()
        self._since = clock()
        self._last: float | None = None
        self._ok = False
        self._reason = ""
        self._loop: threading.Thread | None = None

    # -- Observer port --------------------------------------------------------------------------------

    def attempt_ended(self, finish: Finish, tier: str, wait_s: float) -> None:
        try:  # called between recording an attempt's end and removing its unit: a metric must not get between
            self.attempts.labels(finish.outcome.value, tier).inc()
            if (finish.outcome is Outcome.OOM and finish.next_state == JobState.QUEUED.value
                    and finish.next_tier != tier):
                self.oom_escalations.labels(tier).inc()
            self.queue_wait.labels(tier).observe(wait_s)
            self.run_time.labels(tier).observe(finish.duration_s)
            if finish.exit.peak_memory_bytes:
                self.peak_memory.labels(tier).observe(finish.exit.peak_memory_bytes)
        except Exception:
            log.exception("metrics: job %s attempt %s not counted", finish.job_id, finish.attempt)

    def ticked(self, ok: bool, reason: str = "") -> None:
        self.ticks.labels("ok" if ok else "failed").inc()
        first = (reason.strip().splitlines() or [""])[0][:200]  # a probe answers in one line
        with self._lock:
            self._last, self._ok, self._reason = self._clock(), ok, first
            self._loop = threading.current_thread()

    # -- probes ---------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """Alive: the loop thread runs and has ended a pass lately (a pass stuck past stale_after_s is not)."""
        now = self._clock()
        with self._lock:
            last, loop = self._last, self._loop
        if loop is not None and not loop.is_alive():
            return False, "the dispatcher loop has stopped"
        if last is None:
            waited = now - self._since
            if waited <= self.stale_after_s:
                return True, f"starting: no pass of the loop has ended yet ({waited:.0f} s)"
            return False, (f"no pass of the loop has ended in the {waited:.0f} s since start (limit "
                           f"{self.stale_after_s:.0f} s): waiting for the database or the runtime?")
        age = now - last
        if age > self.stale_after_s:
            return False, f"the loop last ended a pass {age:.0f} s ago (limit {self.stale_after_s:.0f} s)"
        return True, f"ok: the loop ended a pass {age:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready: the last pass reached the database and the runtime without an error, and lately (the queue
        waits a database outage out inside one pass, so a pass that does not end is not ready either)."""
        now = self._clock()
        with self._lock:
            last, ok, reason, loop = self._last, self._ok, self._reason, self._loop
        if loop is not None and not loop.is_alive():
            return False, "not ready: the dispatcher loop has stopped"
        if last is None:
            return False, "not ready: no pass of the loop has reached the database and the runtime yet"
        if now - last > self.stale_after_s:
            return False, f"not ready: no pass of the loop has ended in {now - last:.0f} s"
        if not ok:
            return False, f"not ready: the last pass failed ({reason})"
        return True, "ready"

    # -- the database's view --------------------------------------------------------------------------

    def watch_queue(self, read: JobMetrics, pool: str, budget_bytes: int) -> None:
        """Jobs by state and class, and `pool`'s memory in use against its budget, read at every scrape."""
        self.registry.register(QueueCollector(read, pool, budget_bytes, self.tiers))


class QueueCollector(Collector):
    """Read from the database when scraped, so the numbers are the queue's, not one dispatcher's memory of it.
    A failed read is reported as jobcell_queue_up 0, never as a failed scrape."""

    def __init__(self, read: JobMetrics, pool: str, budget_bytes: int, classes: Sequence[str]) -> None:
        self._read, self._pool, self._budget, self._classes = read, pool, budget_bytes, list(classes)
        self._was_up = True

    def collect(self) -> Iterable[Metric]:
        budget = GaugeMetricFamily("jobcell_memory_budget_bytes", "Memory limits this pool may hold at once",
                                   labels=["pool"])
        budget.add_metric([self._pool], self._budget)
        yield budget
        up = GaugeMetricFamily("jobcell_queue_up", "1 if this scrape could read the queue's database")
        try:
            counts, in_use = self._read(self._pool)
        except Exception as e:
            if self._was_up:  # once per outage: the loop logs the outage itself
                log.warning("metrics: cannot read the queue (%s: %s)", type(e).__name__, e)
            self._was_up = False
            up.add_metric([], 0)
            yield up
            return
        self._was_up = True
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("jobcell_jobs", "Jobs by state and size class", labels=["state", "size_class"])
        classes = self._classes + sorted({c for _, c in counts} - set(self._classes))  # retired classes too
        for state in JobState:
            for c in classes:
                jobs.add_metric([state.value, c], counts.get((state.value, c), 0))
        yield jobs
        used = GaugeMetricFamily("jobcell_memory_in_use_bytes", "Memory limits held by this pool's running jobs",
                                 labels=["pool"])
        used.add_metric([self._pool], in_use)
        yield used


# -- the HTTP server ----------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpServer:
    """/metrics, /healthz and /readyz on a thread of their own. The port is bound at construction, so that a
    port in use is refused at start; port 0 takes a free one (see .port)."""

    def __init__(self, observer: PrometheusObserver, host: str, port: int) -> None:
        self.observer = observer
        server = _Server6 if ":" in host else _Server
        self._server = server((host, port), _handler(observer))
        self._thread = threading.Thread(target=self._server.serve_forever, name="jobcell-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s", self.url)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5.0)
        self._server.server_close()


def _handler(observer: PrometheusObserver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "jobcell"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    encode, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, content_type, encode(observer.registry))
                elif path in ("/healthz", "/readyz"):
                    ok, why = observer.health() if path == "/healthz" else observer.ready()
                    self._send(200 if ok else 503, "text/plain; charset=utf-8", why.encode() + b"\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")
            except Exception as e:
                log.exception("%s failed", path)
                self._send(500, "text/plain; charset=utf-8", f"{type(e).__name__}\n".encode())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth INFO
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


# -- JSON logs ----------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line (JOBCELL_LOG_FORMAT=json): time, level, logger, message, and the job, attempt
    and tier a log call passes with extra=, so that a log store can select one job's lines."""

    FIELDS = ("job", "attempt", "tier")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in self.FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def use_json_logs(logger: logging.Logger | None = None) -> None:
    """Switch the handlers of `logger` (the root's by default) to JSON lines."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(JsonFormatter())
