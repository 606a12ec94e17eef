"""`jobcell` command line: migrate, classes, submit, run, cancel, status, show."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any

from jobcell import Client, __version__

from .calibrate import Policy, recommend, to_toml
from .classes import SizeClassTable, format_bytes, parse_seconds
from .errors import JobcellError, NotFound
from .models import ALL_TIERS, Job, JobState, NewJob
from .observe import use_json_logs
from .queue import PostgresQueue
from .retention import prune
from .settings import Settings, load_settings
from .views import NO_RESULT
from .wiring import (
    build_dispatcher,
    build_http,
    build_manifests,
    build_queue,
    build_retention,
    build_store,
    build_webhooks,
)

log = logging.getLogger("jobcell")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _minutes(s: float) -> str:
    return f"{s / 60:g} min" if s >= 60 else f"{s:g} s"


def _input_size(n: int) -> str:
    """Input bounds as users write them: 5 MB stays 5 MB, not 4.8 MiB."""
    return f"{n // 1_000_000} MB" if n % 1_000_000 == 0 else format_bytes(n)


def cmd_classes(s: Settings, a: argparse.Namespace) -> int:
    t = s.table()
    if a.recommend or a.write:
        return _recommend(s, t, a)
    if a.json:
        print(json.dumps([c.model_dump() for c in t.classes], indent=2))
        return 0
    rows = [(c.name, f"< {_input_size(c.max_input_bytes)}" if c.max_input_bytes else "rest",
             format_bytes(c.memory_limit_bytes), c.max_running, f"{c.cpus:g}", _minutes(c.timeout_s))
            for c in t.classes]
    print(_table(rows, ["class", "input bytes", "memory limit", "max running", "cpus", "timeout"]))
    return 0


def _recommend(s: Settings, t: SizeClassTable, a: argparse.Namespace) -> int:
    """The table with limits calibrated from the peaks recorded over --since; --write saves it to apply."""
    try:
        window_s = parse_seconds(a.since)
    except ValueError as e:
        raise JobcellError(f"--since: {e}") from None
    cal = recommend(t, build_queue(s).peak_samples(window_s), Policy(sizing=s.sizing))
    if a.json:
        print(_json({"classes": [dict(asdict(r), oom_rate=r.oom_rate, frees_bytes=r.frees_bytes) for r in cal.classes],
                     "median_peak_bytes": cal.median_peak, "median_reserved_now_bytes": cal.median_reserved_now,
                     "median_reserved_after_bytes": cal.median_reserved_after,
                     "table": [c.model_dump() for c in cal.table.classes]}))
    else:
        rows = [(r.name, format_bytes(r.limit_bytes), r.attempts, format_bytes(r.peak_p50), format_bytes(r.peak_high),
                 format_bytes(r.peak_max), format_bytes(r.need_p50), f"{r.oom_rate:.1%}", r.moved_up,
                 format_bytes(r.recommended_bytes), format_bytes(r.frees_bytes), r.note) for r in cal.classes]
        print(_table(rows, ["class", "limit", "attempts", "peak p50", "p95", "max", "need p50", "oom", "moved up",
                            "recommended", "frees/job", "why"]))
        if cal.median_peak:
            now, after = cal.median_reserved_now or 0, cal.median_reserved_after or 0
            print(f"\nmedian succeeded attempt: peak {format_bytes(cal.median_peak)}, reserved "
                  f"{format_bytes(now)} ({now / cal.median_peak:.1f}x) now, {format_bytes(after)} "
                  f"({after / cal.median_peak:.1f}x) with the recommended table")
        else:
            print(f"\nno attempt ran to its end in the last {a.since}: nothing to learn from yet")
    if a.write:
        with open(a.write, "w") as f:
            f.write(to_toml(cal.table))
        print(f"wrote {a.write}: apply it with JOBCELL_CLASSES_FILE={a.write} (every dispatcher of the queue)",
              file=sys.stderr if a.json else sys.stdout)
    return 0


def cmd_migrate(s: Settings, a: argparse.Namespace) -> int:
    q = build_queue(s)
    applied = q.migrate()
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


DIAG_PARAMS = {"alloc_mib": float, "sleep_s": float, "step_sleep_s": float, "exit_code": int, "message": str,
               "need_mib": float}


def _parse_diag(spec: str) -> dict[str, Any]:
    """'alloc_mib=700,sleep_s=1,exit_code=0' -> params of the job image's diagnostic workload, checked here."""
    out: dict[str, Any] = {}
    usage = "expected key=value pairs such as alloc_mib=700,sleep_s=1 (keys: " + ", ".join(DIAG_PARAMS) + ")"
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise JobcellError(f"--diag {spec!r}: {usage}")
    for part in parts:
        key, sep, value = part.partition("=")
        kind = DIAG_PARAMS.get(key.strip())
        if not sep or kind is None:
            raise JobcellError(f"--diag {part!r}: {usage}")
        try:
            out[key.strip()] = kind(value)
        except ValueError:
            raise JobcellError(f"--diag {part!r}: {key} takes a number") from None
    if not 0 <= out.get("exit_code", 0) <= 255:
        raise JobcellError("--diag exit_code: an exit code is 0 to 255")
    return out


def cmd_submit(s: Settings, a: argparse.Namespace) -> int:
    table = s.table()
    if a.size_class and a.size_class not in table.names:
        raise JobcellError(f"--class {a.size_class!r}: no such class; known: {', '.join(table.names)}")
    if a.lang and not re.fullmatch(r"[A-Za-z_]+(\+[A-Za-z_]+)*", a.lang):
        raise JobcellError(f"--lang {a.lang!r}: expected tesseract language codes such as eng or eng+deu")
    q = build_queue(s)
    if a.diag is not None:
        job_id, _ = q.submit(_diag_job(a, table))
        print(f"job {job_id}: diag:{a.diag}")
        return _wait(q, [job_id]) if a.wait else 0
    if not a.paths:
        raise JobcellError("nothing to submit: give one or more paths (or s3:// URIs), or --diag")
    client = Client(s, queue=q)
    ids = []
    for src in a.paths:
        job = client.submit(src, size_class=a.size_class, priority=a.priority, lang=a.lang,
                            max_attempts=a.max_attempts, force=a.force, webhook_url=a.webhook)
        ids.append(job.id)
        print(f"job {job.id}: {src} ({job.size_class})" + ("" if job.new else f" already submitted: {job.state}"
                                                           " (`jobcell retry` runs it again, --force makes a new job)"))
    return _wait(q, ids) if a.wait else 0


def _diag_job(a: argparse.Namespace, table: SizeClassTable) -> NewJob:
    return NewJob(document_uri="diag:", document_bytes=0, unique_key=f"diag:{uuid.uuid4()}", source=f"diag:{a.diag}",
                  size_class=a.size_class or table.classes[0].name, workload="diag", params=_parse_diag(a.diag),
                  priority=a.priority, max_attempts=a.max_attempts)


def _pages(stored: int, total: int | None) -> str:
    return f"{stored}/{total}" if total is not None else (str(stored) if stored else "-")


NO_DISPATCHER_S = 60.0  # four heartbeats at the default lease


def _no_dispatcher(q: PostgresQueue) -> str | None:
    """Why nothing will run, if no dispatcher has been seen lately."""
    recent = [d for d in q.dispatchers() if d.silent_s < NO_DISPATCHER_S]
    if recent:
        return None
    return ("no dispatcher has been seen in the last minute: is `jobcell run` running for this database? "
            "(the jobs wait queued until one is)")


class _Rate:
    """Pages per second as this client watched them arrive, for an ETA; None until two readings differ."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.first: dict[int, tuple[float, int]] = {}
        self.clock = clock

    def eta_s(self, job_id: int, stored: int, total: int | None) -> float | None:
        now = self.clock()
        t0, n0 = self.first.setdefault(job_id, (now, stored))
        if total is None or stored <= n0 or now <= t0:
            return None
        return (total - stored) / ((stored - n0) / (now - t0))


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f", about {seconds:.0f} s left" if seconds < 90 else f", about {seconds / 60:.0f} min left"


def _wait(q: PostgresQueue, ids: list[int]) -> int:
    """Follow the jobs until each is final: a live progress display on a terminal, plain lines otherwise."""
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pages"),
                   TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            tasks = {i: bar.add_task(f"job {i}", total=None) for i in ids}

            def show(job: Job, stored: int, total: int | None, changed: str | None) -> None:
                if changed:
                    bar.console.print(changed, highlight=False, markup=False)
                bar.update(tasks[job.id], completed=stored, total=total,
                           description=f"job {job.id} {job.state.value} on {job.tier}")
            jobs = _follow(q, ids, show)
    else:
        rate, shown = _Rate(), dict[int, tuple[int, float]]()  # pages last printed, and when

        def plain(job: Job, stored: int, total: int | None, changed: str | None) -> None:
            if changed:
                print(changed, flush=True)
            eta = rate.eta_s(job.id, stored, total)
            last, at = shown.get(job.id, (0, 0.0))
            if stored > last and (time.monotonic() - at >= 5 or stored == total):  # pages as they arrive
                shown[job.id] = (stored, time.monotonic())
                print(f"job {job.id}: page {_pages(stored, total)} stored{_eta(eta)}", flush=True)
        jobs = _follow(q, ids, plain)
    failed = [j.id for j in jobs if j.state is not JobState.SUCCEEDED]
    print()
    print(_summary(q, ids))
    print(f"\n{len(jobs) - len(failed)} succeeded, {len(failed)} failed or cancelled")
    return 1 if failed else 0


def _follow(q: PostgresQueue, ids: list[int],
            show: Callable[[Job, int, int | None, str | None], None]) -> list[Job]:
    """Poll until every job is final, telling `show` each job's pages and any change of state."""
    seen: dict[int, tuple[str, int]] = {}
    checked_at, warned = time.monotonic(), False
    while True:
        jobs = q.jobs(ids)
        if not warned and time.monotonic() - checked_at > 5 and any(not j.state.final for j in jobs):
            checked_at = time.monotonic()
            why = _no_dispatcher(q)
            if why:
                print(f"jobcell: warning: {why}", file=sys.stderr, flush=True)
                warned = True
        progress = q.progress([j.id for j in jobs if j.state is not JobState.QUEUED])
        for j in jobs:
            now, changed = (j.state.value, j.attempt), None
            if seen.get(j.id) != now:
                seen[j.id] = now
                extra = f": {j.reason}" if j.reason else ""
                changed = f"job {j.id}: {j.state.value} (attempt {j.attempt}, tier {j.tier}){extra}"
            show(j, *progress.get(j.id, (0, None)), changed)
        if all(j.state.final for j in jobs):
            return jobs
        time.sleep(0.5)


def _summary(q: PostgresQueue, ids: list[int]) -> str:
    rows = [(r.id, os.path.basename(r.source) or r.source, r.state, r.page_count, r.path,
             format_bytes(r.peak), None if r.duration_s is None else f"{r.duration_s:.1f} s",
             (r.reason or "")[:90] if r.state != "succeeded" else "")
            for r in q.summary(ids)]
    return _table(rows, ["job", "document", "outcome", "pages", "attempts (tier outcome)", "peak", "time", "reason"])


def cmd_report(s: Settings, a: argparse.Namespace) -> int:
    q = build_queue(s)
    missing = sorted(set(a.ids) - {j.id for j in q.jobs(a.ids)})
    if missing:
        raise NotFound(f"no job {', '.join(map(str, missing))}")
    if a.json:
        print(_json(q.summary(a.ids)))
        return 0
    print(_summary(q, a.ids))
    return 0


def cmd_run(s: Settings, a: argparse.Namespace) -> int:
    http = build_http(s)  # JOBCELL_HTTP_PORT: metrics and probes, answering from before the engine is reached
    if http is not None:
        http.start()
    try:
        d = build_dispatcher(s, migrate=a.migrate, observer=http.observer if http is not None else None)

        def on_term(signum: int, _frame: Any) -> None:
            log.info("%s received: %s", signal.Signals(signum).name,
                     "draining running jobs" if a.drain else "stop claiming, leave running jobs for adoption")
            d.stop(drain=a.drain)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        workers = [w for w in (build_manifests(s, build_queue(s, give_up_after_s=None)),
                               build_retention(s, build_queue(s, give_up_after_s=None), build_store(s)),
                               build_webhooks(s))
                   if w is not None]  # each on a thread of its own: never in the dispatch loop's way
        for w in workers:
            w.start()
        d.run()
        for w in workers:
            w.stop()
    finally:
        if http is not None:
            http.stop()
    return 0


def cmd_retry(s: Settings, a: argparse.Namespace) -> int:
    client = Client(s)
    for job_id in a.ids:
        job = client.retry(job_id, a.max_attempts)
        print(f"job {job_id}: queued again on {job.tier} (attempts so far {job.attempt}, up to {job.max_attempts})")
    return _wait(client.queue, a.ids) if a.wait else 0


def cmd_cancel(s: Settings, a: argparse.Namespace) -> int:
    q = build_queue(s)
    for job_id in a.ids:
        state = q.cancel(job_id)
        print(f"job {job_id}: " + ("cancel requested; its container will be killed" if state == "running"
                                   else f"{state}"))
    return 0


def cmd_pause(s: Settings, a: argparse.Namespace) -> int:
    p = Client(s).pause(a.size_class or ALL_TIERS, a.reason)
    what = "every class" if p.scope == ALL_TIERS else f"class {p.scope}"
    print(f"paused {what}: no new job of it starts (running ones go on); `jobcell resume` lifts it")
    return 0


def cmd_resume(s: Settings, a: argparse.Namespace) -> int:
    scope = a.size_class or ALL_TIERS
    what = "every class" if scope == ALL_TIERS else f"class {scope}"
    if Client(s).resume(scope):
        print(f"resumed {what}")
    else:
        print(f"{what} was not paused" + (" (a pause of a single class is lifted with --class)"
                                           if scope == ALL_TIERS and Client(s).paused() else ""))
    return 0


def _ago(t: datetime | None, now: datetime) -> str:
    return "-" if t is None else f"{(now - t).total_seconds():.0f} s"


def _json(value: Any) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.isoformat()
        return asdict(v) if is_dataclass(v) and not isinstance(v, type) else str(v)
    return json.dumps(value, indent=2, default=plain)


def cmd_status(s: Settings, a: argparse.Namespace) -> int:
    q = build_queue(s)
    counts = q.counts()
    classes = [c.name for c in s.table().classes]
    states = [st.value for st in JobState]
    grid = {(r.state, r.size_class): r.n for r in counts}
    running, now, paused = q.running_jobs(), q.now(), q.paused()
    seen = [d for d in q.dispatchers() if d.silent_s < NO_DISPATCHER_S]
    why = _no_dispatcher(q)
    if a.json:
        print(_json({"counts": {st: {c: grid.get((st, c), 0) for c in classes} for st in states},
                     "running": running, "dispatchers": seen, "paused": paused,
                     "budget_bytes": _budget(s), "warning": why}))
        return 0
    print(_table([[st, *[grid.get((st, c), 0) for c in classes]] for st in states], ["state", *classes]))
    print()
    for d in seen:
        print(f"dispatcher {d.id}: pool {d.pool}, {d.runtime}, up {_ago(d.started_at, now)}")
    for p in paused:
        what = "every class" if p.scope == ALL_TIERS else f"class {p.scope}"
        print(f"paused: {what} since {_ago(p.paused_at, now)} ago" + (f": {p.reason}" if p.reason else "")
              + " (`jobcell resume` lifts it)")
    if why:
        print(f"warning: {why}")
    if running:
        print(_table([(r.id, r.tier, format_bytes(r.memory_limit_bytes), format_bytes(r.memory_now),
                       r.attempt, _pages(r.pages_stored, r.pages_total), r.pool, r.lease_owner,
                       _ago(r.started_at, now)) for r in running],
                     ["running", "tier", "limit", "memory now", "attempt", "pages", "pool", "dispatcher", "for"]))
    else:
        print("no job running")
    by_pool: dict[str, int] = {}
    for r in running:
        by_pool[r.pool] = by_pool.get(r.pool, 0) + r.memory_limit_bytes
    for pool, used in sorted(by_pool.items()):
        budget = _budget(s)
        share = f" of the {format_bytes(budget)} budget ({used / budget:.0%})" if budget else ""
        print(f"pool {pool}: {format_bytes(used)} of memory limits in use{share}")
    return 0


def _budget(s: Settings) -> int | None:
    """The budget as this configuration gives it; a share of memory is resolved against this host's RAM
    (the dispatcher's host, where the Docker engine usually is)."""
    try:
        return s.budget_bytes(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return None


def cmd_show(s: Settings, a: argparse.Namespace) -> int:
    q = build_queue(s)
    j = q.get(a.id)
    if a.text:
        pages = q.pages(j.id)
        if not pages:
            print(f"job {j.id} ({j.state.value}) has no stored pages", file=sys.stderr)
            return 1
        for p in pages:
            print(f"=== page {p.page} ===")
            print(p.text)
        return 0
    if a.json:
        attempts = [{k: v for k, v in asdict(r).items() if k != "log_tail"} for r in q.attempts(j.id)]
        print(_json({**_job_json(j, q.progress([j.id]).get(j.id, (0, None))), "attempts": attempts}))
        return 0
    print(f"job {j.id}: {j.state.value}  class {j.size_class}  tier {j.tier}  attempts {j.attempt}/{j.max_attempts}")
    stored = f", stored as {j.document_uri}" if j.source and j.source != j.document_uri else ""
    print(f"document: {j.source or j.document_uri} ({format_bytes(j.document_bytes)}{stored}), workload {j.workload}")
    if j.reason:
        print(f"reason: {j.reason}")
    done, total = q.progress([j.id]).get(j.id, (0, None))
    if done or total is not None:
        print(f"pages: {_pages(done, total)} stored")
    rows = [(r.attempt, r.tier, format_bytes(r.memory_limit_bytes), r.outcome or "running",
             r.exit_code, format_bytes(r.peak_memory_bytes), format_bytes(r.need_bytes),
             None if r.duration_s is None else f"{r.duration_s:.1f} s", r.error or r.kill_reason)
            for r in q.attempts(j.id)]
    if rows:
        print()
        print(_table(rows, ["attempt", "tier", "limit", "outcome", "exit", "peak", "need", "duration", "reason"]))
    return 0


def _job_json(j: Job, pages: tuple[int, int | None] = (0, None)) -> dict[str, Any]:
    return {"id": j.id, "state": j.state.value, "size_class": j.size_class, "tier": j.tier, "attempt": j.attempt,
            "max_attempts": j.max_attempts, "reason": j.reason, "source": j.source or j.document_uri,
            "metadata": j.metadata, "pages_done": pages[0], "pages_total": pages[1],
            "created_at": j.created_at.isoformat(), "finished_at": j.finished_at and j.finished_at.isoformat()}


def cmd_list(s: Settings, a: argparse.Namespace) -> int:
    if a.state and a.state not in {st.value for st in JobState}:
        raise JobcellError(f"--state {a.state!r}: one of {', '.join(st.value for st in JobState)}")
    try:
        since_s = parse_seconds(a.since) if a.since else None
    except ValueError as e:
        raise JobcellError(f"--since: {e}") from None
    q = build_queue(s)
    jobs = q.list_jobs(a.state, a.size_class, since_s, a.limit)
    progress = q.progress([j.id for j in jobs])
    if a.json:
        print(json.dumps([_job_json(j, progress.get(j.id, (0, None))) for j in jobs], indent=2))
        return 0
    rows = [(j.id, j.state.value, j.size_class, j.tier, j.attempt, _pages(*progress.get(j.id, (0, None))),
             os.path.basename(j.source or j.document_uri)[:40], (j.reason or "")[:60]) for j in jobs]
    print(_table(rows, ["job", "state", "class", "tier", "attempts", "pages", "document", "reason"]))
    return 0


def cmd_prune(s: Settings, a: argparse.Namespace) -> int:
    try:
        age_s = parse_seconds(a.older_than)
    except ValueError as e:
        raise JobcellError(f"--older-than: {e}") from None
    done = prune(build_queue(s), build_store(s), age_s, dry_run=not a.yes)
    if not a.yes:
        print(f"would delete {done.jobs} finished job(s) older than {a.older_than}: {done.attempts} attempt(s), "
              f"{done.pages} page(s), and their stored documents no other job uses (dry run: add --yes)")
        return 0
    print(f"deleted {done.jobs} job(s) with their attempts, pages and results, and {done.documents} stored "
          "document(s)")
    return 0


def cmd_export(s: Settings, a: argparse.Namespace) -> int:
    q = build_queue(s)
    j = q.get(a.id)
    result = q.result(j.id) or NO_RESULT
    pages = [{"page": p.page, "dpi": p.dpi, "width": p.width, "height": p.height, "text": p.text,
              "mean_confidence": p.mean_confidence, "words": p.words} for p in q.pages(j.id)]
    doc = {
        "job": {"id": j.id, "state": j.state.value, "source": j.document_uri, "size_class": j.size_class,
                "tier": j.tier, "attempts": j.attempt, "reason": j.reason},
        "media_type": result.media_type,
        "page_count": result.page_count,
        "complete": result.completed_at is not None,
        "pages": pages,
        "manifest": {"status": result.manifest_status, "model": result.model,
                     "content": result.manifest},
    }
    text = json.dumps(doc, indent=2, default=str)
    if a.output == "-":
        print(text)
    else:
        with open(a.output, "w") as f:
            f.write(text + "\n")
        print(f"job {j.id}: {len(pages)} pages written to {a.output}")
    return 0


def cmd_web(s: Settings, a: argparse.Namespace) -> int:
    from .web import serve  # the dashboard's module is loaded by this command only

    return serve(s, budget=_budget(s))


def _bounded(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{n} is out of range: {low} to {high}")
        return n
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobcell", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"jobcell {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the queue schema (idempotent)").set_defaults(fn=cmd_migrate)
    c = sub.add_parser("classes", help="print the size-class table, or one calibrated from recorded peaks")
    c.add_argument("--json", action="store_true")
    c.add_argument("--recommend", action="store_true",
                   help="per class: recorded peaks, OOM rate, and the limit they call for (reads the queue)")
    c.add_argument("--since", default="30d", metavar="AGE", help="--recommend: attempts of this period (30d)")
    c.add_argument("--write", metavar="FILE", help="--recommend, and save the table as TOML for JOBCELL_CLASSES_FILE")
    c.set_defaults(fn=cmd_classes)
    sm = sub.add_parser("submit", help="store documents and enqueue one job each")
    sm.add_argument("paths", nargs="*", metavar="PATH|s3://bucket/key")
    sm.add_argument("--priority", type=_bounded(-1000, 1000), default=0, help="higher runs first (-1000 to 1000)")
    sm.add_argument("--wait", action="store_true", help="show progress until every job ends; non-zero if any failed")
    sm.add_argument("--class", dest="size_class", help="force a size class instead of choosing by size")
    sm.add_argument("--max-attempts", type=_bounded(1, 100), default=None, help="1 to 100")
    sm.add_argument("--force", action="store_true", help="a new job even if the same document was submitted")
    sm.add_argument("--lang", help="tesseract languages for these documents, e.g. eng+deu (default: the image's)")
    sm.add_argument("--webhook", metavar="URL", help="POST a signed event to this URL when each job ends")
    sm.add_argument("--diag", metavar="SPEC", help="a diagnostic job instead of a document: "
                    "alloc_mib=N,sleep_s=S,exit_code=C,message=TEXT")
    sm.set_defaults(fn=cmd_submit)
    r = sub.add_parser("run", help="run the dispatcher")
    r.add_argument("--drain", action="store_true", help="on SIGTERM, wait for running jobs instead of leaving them")
    r.add_argument("--migrate", action="store_true", help="apply migrations first")
    r.set_defaults(fn=cmd_run)
    rt = sub.add_parser("retry", help="run failed or cancelled jobs again, keeping their attempts")
    rt.add_argument("ids", nargs="+", type=int)
    rt.add_argument("--max-attempts", type=_bounded(1, 100), default=None, help="more attempts (default: "
                    "JOBCELL_MAX_ATTEMPTS)")
    rt.add_argument("--wait", action="store_true", help="show progress until every job ends")
    rt.set_defaults(fn=cmd_retry)
    cn = sub.add_parser("cancel", help="cancel jobs; a running one is killed within seconds")
    cn.add_argument("ids", nargs="+", type=int)
    cn.set_defaults(fn=cmd_cancel)
    st = sub.add_parser("status", help="counts by state and class, running jobs, memory in use")
    st.add_argument("--json", action="store_true", help="the same as one JSON object")
    st.set_defaults(fn=cmd_status)
    for name, fn, says in (("pause", cmd_pause, "start no new job of a class (default: any class)"),
                           ("resume", cmd_resume, "lift a pause")):
        ps = sub.add_parser(name, help=says)
        ps.add_argument("--class", dest="size_class", help="one size class (default: the whole queue)")
        if name == "pause":
            ps.add_argument("--reason", help="shown by `jobcell status`")
        ps.set_defaults(fn=fn)
    rp = sub.add_parser("report", help="one line per job: outcome, pages, tiers tried, peak memory, time")
    rp.add_argument("ids", nargs="+", type=int)
    rp.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    rp.set_defaults(fn=cmd_report)
    sh = sub.add_parser("show", help="a job and every attempt")
    sh.add_argument("id", type=int)
    sh.add_argument("--text", action="store_true", help="print the OCR text page by page instead")
    sh.add_argument("--json", action="store_true", help="the job and its attempts as JSON")
    sh.set_defaults(fn=cmd_show)
    ls = sub.add_parser("list", help="jobs, newest first, by state, class and age")
    ls.add_argument("--state", help="queued, running, succeeded, failed or cancelled")
    ls.add_argument("--class", dest="size_class", help="a size class")
    ls.add_argument("--since", metavar="AGE", help="submitted within, e.g. 1h or 7d")
    ls.add_argument("--limit", type=_bounded(1, 10_000), default=100)
    ls.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    ls.set_defaults(fn=cmd_list)
    pr = sub.add_parser("prune", help="delete finished jobs older than a cutoff, with their pages and documents")
    pr.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    pr.add_argument("--yes", action="store_true", help="delete (without it: a dry run that only counts)")
    pr.set_defaults(fn=cmd_prune)
    ex = sub.add_parser("export", help="a job's result as JSON: pages, words with boxes and confidences, manifest")
    ex.add_argument("id", type=int)
    ex.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    ex.set_defaults(fn=cmd_export)
    wb = sub.add_parser("web", help="the dashboard: queue, memory budget, each job's attempts (JOBCELL_WEB_*)")
    wb.set_defaults(fn=cmd_web)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = load_settings()
        if s.log_format == "json":  # settings are read after logging starts; nothing has logged yet
            use_json_logs()
        if getattr(a, "max_attempts", 0) is None:
            a.max_attempts = s.max_attempts
        return int(a.fn(s, a))
    except JobcellError as e:
        print(f"jobcell: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C during --wait: the jobs go on; say so, no traceback
        print("\njobcell: interrupted (submitted jobs keep running; `jobcell status` shows them)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jobcell status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
