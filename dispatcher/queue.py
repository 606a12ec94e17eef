"""The Postgres adapter of the Queue port (psycopg 3). All SQL is named, in sql/queries.sql."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from job_image.contract import PageResult

from .classes import Admission, SizeClassTable
from .database import Conn, Database, Row
from .errors import ConfigError, NotFound, StateError
from .models import Job, JobState, KillReason, LaunchSpec, NewJob, Outcome, Pause, Running
from .ports import Claimed, Finish
from .reads import QueueReads
from .sql import migrations

log = logging.getLogger("jobcell.queue")
NOTIFY_CHANNEL = "jobcell_jobs"  # dispatchers: new work or a cancel (a hint)
EVENTS_CHANNEL = "jobcell_events"  # applications: every state change, {"job", "state", "attempt", "tier"}


def job_from_row(row: Row) -> Job:
    return Job(
        id=row["id"], state=JobState(row["state"]), document_uri=row["document_uri"],
        document_bytes=row["document_bytes"], workload=row["workload"], params=row["params"],
        size_class=row["size_class"], tier=row["tier"], priority=row["priority"], attempt=row["attempt"],
        max_attempts=row["max_attempts"], scheduled_at=row["scheduled_at"], created_at=row["created_at"],
        cancel_requested=row["cancel_requested"], lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"], reason=row["reason"], finished_at=row["finished_at"],
        memory_limit_bytes=row["memory_limit_bytes"], pool=row["pool"], source=row.get("source"),
        metadata=row.get("metadata") or {}, pages_total=row.get("pages_total"), webhook_url=row.get("webhook_url"))


class PostgresQueue(QueueReads):
    """The Queue port: claims (admission), leases, fenced finishes, adoption and reaping; the typed reads for
    the CLI, the dashboard and the client come from QueueReads."""


    def __init__(self, dsn: str, table: SizeClassTable, *, lease_ttl_s: float = 30.0,
                 give_up_after_s: float | None = None, reserve_after_s: float = 120.0) -> None:
        self.db = Database(dsn, give_up_after_s)
        self._table = table
        self.lease_ttl_s = lease_ttl_s
        self.reserve_after_s = reserve_after_s

    def close(self) -> None:
        self.db.close()

    # -- schema ---------------------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending migrations under an advisory lock; safe to run concurrently and repeatedly."""
        def apply(conn: Conn) -> list[str]:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('jobcell-migrate'))")
            conn.execute("CREATE TABLE IF NOT EXISTS jobcell_migrations (version integer PRIMARY KEY, "
                         "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in conn.execute("SELECT version FROM jobcell_migrations").fetchall()}
            applied = []
            for version, name, sql in migrations():
                if version not in done:
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO jobcell_migrations (version, name) VALUES (%s, %s)",
                                 (version, name))
                    applied.append(name)
            return applied
        return self.db.run(apply)

    # -- Queue port -----------------------------------------------------------------------------------

    def submit(self, job: NewJob) -> tuple[int, bool]:
        def go(conn: Conn) -> tuple[int, bool]:
            row = self.db.one(conn, "submit", unique_key=job.unique_key, document_uri=job.document_uri,
                              source=job.source, document_bytes=job.document_bytes, workload=job.workload,
                              params=Jsonb(job.params), size_class=job.size_class, priority=job.priority,
                              max_attempts=job.max_attempts, metadata=Jsonb(job.metadata),
                              webhook_url=job.webhook_url)
            if row is not None:
                return row["id"], True
            existing = self.db.one(conn, "id_by_unique_key", unique_key=job.unique_key)
            assert existing is not None
            return existing["id"], False
        return self.db.run(go)

    def claim(self, owner: str, pool: str, budget_bytes: int, limit: int,
              budgets: Mapping[str, int] | None = None, cpu_budget: float | None = None) -> list[Claimed]:
        def go(conn: Conn) -> list[Claimed]:
            self.db.one(conn, "lock_pool", pool=pool)
            running = [Running(r["id"], r["tier"], r["memory_limit_bytes"])
                       for r in self.db.all(conn, "running_in_pool", pool=pool)]
            admission = Admission(self._table, budget_bytes, running, self.reserve_after_s, budgets, cpu_budget)
            taken: list[Claimed] = []
            for row in self.db.all(conn, "claimable", per_tier=max(limit, 8)):
                if len(taken) >= limit:
                    break
                tier = row["tier"] if row["tier"] in admission.slots else self._table.for_size(
                    row["document_bytes"]).name  # a class renamed or removed since: as if submitted now
                if not admission.consider(row["id"], tier, float(row["waited_s"])):
                    continue
                cls = self._table.get(tier)
                got = self.db.one(conn, "take", id=row["id"], owner=owner, ttl=self.lease_ttl_s, pool=pool,
                                memory_limit_bytes=cls.memory_limit_bytes)
                if got is None:
                    continue
                admission.take(tier)
                job = job_from_row(got)
                self.db.one(conn, "insert_attempt", job_id=job.id, attempt=job.attempt, dispatcher=owner,
                          pool=pool, tier=tier, memory_limit_bytes=cls.memory_limit_bytes)
                taken.append(Claimed(job, self._spec(job, tier)))
            return taken
        return self.db.run(go)

    def _spec(self, job: Job, tier: str) -> LaunchSpec:
        cls = self._table.resolve(tier, job.memory_limit_bytes)  # adopted: its class may be gone since
        limit = job.memory_limit_bytes or cls.memory_limit_bytes  # what its unit was started with
        return LaunchSpec(job_id=job.id, attempt=job.attempt, tier=cls.name, memory_limit_bytes=limit,
                          timeout_s=cls.timeout_s, document_uri=job.document_uri, workload=job.workload,
                          params=dict(job.params))

    def started(self, job_id: int, attempt: int, runtime: str, handle: str) -> None:
        self.db.run(lambda c: self.db.one(c, "started", job_id=job_id, attempt=attempt, runtime=runtime,
                                      handle=handle))

    def heartbeat(self, owner: str, job_ids: Sequence[int]) -> tuple[set[int], set[int]]:
        if not job_ids:
            return set(), set()
        rows = self.db.run(lambda c: self.db.all(c, "heartbeat", owner=owner, ids=list(job_ids),
                                             ttl=self.lease_ttl_s))
        return {r["id"] for r in rows}, {r["id"] for r in rows if r["cancel_requested"]}

    def mark_killing(self, job_id: int, attempt: int, reason: KillReason) -> None:
        self.db.run(lambda c: self.db.one(c, "mark_killing", job_id=job_id, attempt=attempt, reason=reason.value))

    def kill_reason(self, job_id: int, attempt: int) -> KillReason | None:
        row = self.db.run(lambda c: self.db.one(c, "kill_reason", job_id=job_id, attempt=attempt))
        return KillReason(row["kill_reason"]) if row and row["kill_reason"] else None

    def finish(self, owner: str, result: Finish) -> bool:
        e = result.exit

        def go(conn: Conn) -> bool:
            moved = self.db.one(conn, "finish_job", job_id=result.job_id, attempt=result.attempt, owner=owner,
                              state=result.next_state, tier=result.next_tier, reason=result.reason,
                              delay_s=result.delay_s)
            if moved is None:
                return False
            self.db.one(conn, "finish_attempt", job_id=result.job_id, attempt=result.attempt,
                      outcome=result.outcome.value, exit_code=e.exit_code, oom_killed=e.oom_killed,
                      peak_memory_bytes=e.peak_memory_bytes, duration_s=result.duration_s,
                      # a succeeded job's last stderr line is progress, not a reason
                      error=None if result.outcome is Outcome.SUCCEEDED else e.reason or None,
                      log_tail=e.log_tail or None, need_bytes=result.need_bytes)
            done = result.completed
            if done is not None:
                self.db.one(conn, "complete", job_id=result.job_id, media_type=done.media_type,
                          page_count=done.page_count)
                self.db.one(conn, "manifest_due", job_id=result.job_id,
                          status="pending" if done.summarise else "skipped")
            return True
        return self.db.run(go)

    # -- Results port ---------------------------------------------------------------------------------

    def done_pages(self, job_id: int, before_attempt: int) -> list[int]:
        rows = self.db.run(lambda c: self.db.all(c, "done_pages", job_id=job_id, before_attempt=before_attempt))
        return [r["page"] for r in rows]

    def put_page(self, job_id: int, attempt: int, page: PageResult) -> bool:
        words = Jsonb([w.model_dump() for w in page.words])
        row = self.db.run(lambda c: self.db.one(
            c, "put_page", job_id=job_id, attempt=attempt, page=page.page, dpi=page.dpi, width=page.width,
            height=page.height, text=page.text, words=words, mean_confidence=page.mean_confidence,
            ocr_seconds=page.ocr_seconds))
        return bool(row and row["current"])

    def declare_pages(self, job_id: int, attempt: int, pages: int) -> None:
        self.db.run(lambda c: self.db.one(c, "declare_pages", job_id=job_id, attempt=attempt, pages=pages))

    def adopt(self, owner: str, pool: str, job_id: int, attempt: int) -> Claimed | None:
        def go(conn: Conn) -> Claimed | None:
            row = self.db.one(conn, "adopt", owner=owner, pool=pool, job_id=job_id, attempt=attempt,
                            ttl=self.lease_ttl_s)
            if row is None:
                return None
            job = job_from_row(row)
            self.db.one(conn, "adopted", owner=owner, job_id=job_id, attempt=attempt)
            attempts = self.db.all(conn, "attempts", job_id=job_id)
            started = next((a["started_at"] or a["claimed_at"] for a in attempts if a["attempt"] == attempt), None)
            return Claimed(job, self._spec(job, job.tier), started)
        return self.db.run(go)

    def attempt_is_current(self, job_id: int, attempt: int) -> bool:
        return self.db.run(lambda c: self.db.one(c, "attempt_is_current", job_id=job_id, attempt=attempt)) is not None

    def reap(self, pool: str, keep: Sequence[int]) -> list[int]:
        def go(conn: Conn) -> list[int]:
            rows = self.db.all(conn, "reap", pool=pool, keep=list(keep))
            if rows:
                self.db.one(conn, "lose_attempts", ids=[r["id"] for r in rows], attempts=[r["attempt"] for r in rows])
            return [r["id"] for r in rows]
        return self.db.run(go)

    def observe_memory(self, samples: Sequence[tuple[int, int, int]]) -> None:
        if samples:
            self.db.run(lambda c: self.db.one(c, "observe_memory", jobs=[s[0] for s in samples],
                                          attempts=[s[1] for s in samples], used=[s[2] for s in samples]))

    def alive(self, owner: str, pool: str, runtime: str) -> None:
        self.db.run(lambda c: self.db.one(c, "alive", owner=owner, pool=pool, runtime=runtime))

    def release(self, owner: str) -> None:
        self.db.run(lambda c: self.db.one(c, "release", owner=owner))

    def cancel(self, job_id: int) -> str:
        row = self.db.run(lambda c: self.db.one(c, "cancel", job_id=job_id))
        if row is None:
            raise NotFound(f"no job {job_id}")
        return str(row["state"])

    def pause(self, scope: str, reason: str | None = None) -> Pause:
        row = self.db.run(lambda c: self.db.one(c, "pause", scope=self._table.pause_scope(scope), reason=reason))
        assert row is not None
        return Pause(**row)

    def resume(self, scope: str) -> bool:
        return self.db.run(lambda c: self.db.one(c, "resume", scope=self._table.pause_scope(scope))) is not None

    def paused(self) -> list[Pause]:
        return [Pause(**r) for r in self.db.run(lambda c: self.db.all(c, "paused"))]

    def retry(self, job_id: int, more_attempts: int) -> Job:
        """Run a failed or cancelled job again, keeping its history; NotFound/JobcellError otherwise."""
        row = self.db.run(lambda c: self.db.one(c, "retry", job_id=job_id, more=more_attempts))
        if row is None:
            state = self.get(job_id).state.value  # NotFound for an unknown id
            raise StateError(f"job {job_id} is {state}: only a failed or cancelled job can be retried")
        return job_from_row(row)

    def get(self, job_id: int) -> Job:
        row = self.db.run(lambda c: self.db.one(c, "get", job_id=job_id))
        if row is None:
            raise NotFound(f"no job {job_id}")
        return job_from_row(row)

    def queue_id(self) -> str:
        """This queue's identity (created by the first migration)."""
        try:
            row = self.db.run(lambda c: self.db.one(c, "queue_id"))
        except psycopg.errors.UndefinedTable:
            raise ConfigError("the database has no jobcell schema yet: run `jobcell migrate` "
                              "(or start the dispatcher with `jobcell run --migrate`)") from None
        assert row is not None
        return str(row["value"])

    def now(self) -> datetime:
        row = self.db.run(lambda c: self.db.one(c, "now"))
        assert row is not None
        return row["now"]  # type: ignore[no-any-return]

    # -- manifests (dispatcher.manifest.ManifestStore) ------------------------------------------------

    def pending_manifests(self, limit: int) -> list[tuple[int, int]]:
        rows = self.db.run(lambda c: self.db.all(c, "pending_manifests", limit=limit, hold_s=600))
        return [(r["job_id"], r["tries"]) for r in rows]

    def page_texts(self, job_id: int) -> list[tuple[int, str]]:
        return [(r["page"], r["text"]) for r in self.db.run(lambda c: self.db.all(c, "page_texts", job_id=job_id))]

    def put_manifest(self, job_id: int, status: str, model: str | None, manifest: dict[str, Any] | None,
                     error: str | None = None, retry_in_s: float = 0.0) -> None:
        self.db.run(lambda c: self.db.one(c, "put_manifest", job_id=job_id, status=status, model=model,
                                      manifest=None if manifest is None else Jsonb(manifest), error=error,
                                      delay_s=retry_in_s))

    # -- retention --------------------------------------------------------------------------------------

    def prune(self, ids: Sequence[int], age_s: float) -> tuple[list[int], list[str]]:
        """Delete those jobs (re-checked: still finished and old) with everything of theirs; the ids deleted,
        and the document URIs no remaining job refers to (the caller removes them from the store)."""
        def go(conn: Conn) -> tuple[list[int], list[str]]:
            gone = self.db.all(conn, "prune", ids=list(ids), age_s=age_s)
            uris = sorted({r["document_uri"] for r in gone})
            kept = {r["document_uri"] for r in self.db.all(conn, "documents_in_use", uris=uris)}
            return [r["id"] for r in gone], [u for u in uris if u not in kept]
        return self.db.run(go)

    # -- notifications --------------------------------------------------------------------------------

    def watch(self, wake: Callable[[], None]) -> None:
        threading.Thread(target=self._listen, args=(wake,), name="jobcell-listen", daemon=True).start()

    def _listen(self, wake: Callable[[], None]) -> None:
        backoff = 0.5
        while not self.db.closed.is_set():
            try:
                with psycopg.connect(self.db.dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = 0.5
                    wake()  # we may have missed notifications while disconnected
                    while not self.db.closed.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            wake()
            except psycopg.Error as e:
                if not self.db.closed.is_set():
                    log.warning("LISTEN connection lost (%s); polling until it is back", e)
            self.db.closed.wait(backoff)
            backoff = min(backoff * 2, 30.0)
