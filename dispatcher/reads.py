"""What the CLI, the dashboard and the client read from the Postgres queue, as typed views (dispatcher/views.py).
Reads only: every change goes through the Queue port (dispatcher/queue.py)."""

from __future__ import annotations

from collections.abc import Sequence

from .database import Database
from .models import Job, JobState
from .views import (
    Attempt,
    DispatcherSeen,
    JobSummary,
    MemorySpan,
    PeakSample,
    Prunable,
    RunningJob,
    StateCount,
    StoredPage,
    StoredResult,
    Timing,
    from_row,
)


class QueueReads:
    db: Database

    def jobs(self, ids: Sequence[int]) -> list[Job]:
        from .queue import job_from_row  # one mapping of a jobs row, kept with the queue that writes it

        return [job_from_row(r) for r in self.db.fetch_all("jobs_by_ids", ids=list(ids))]

    def list_jobs(self, state: str | None = None, size_class: str | None = None, since_s: float | None = None,
                  limit: int = 100) -> list[Job]:
        from .queue import job_from_row

        rows = self.db.fetch_all("list_jobs", state=state, size_class=size_class, since_s=since_s, limit=limit)
        return [job_from_row(r) for r in rows]

    def attempts(self, job_id: int) -> list[Attempt]:
        return [from_row(Attempt, r) for r in self.db.fetch_all("attempts", job_id=job_id)]

    def counts(self) -> list[StateCount]:
        return [from_row(StateCount, r) for r in self.db.fetch_all("counts")]

    def job_metrics(self, pool: str) -> tuple[dict[tuple[str, str], int], int]:
        """For /metrics: job counts by (state, size class), and the memory limits held by `pool`'s running jobs."""
        rows = self.db.fetch_all("job_metrics", pool=pool, running=JobState.RUNNING.value)
        return {(r["state"], r["size_class"]): r["n"] for r in rows}, sum(int(r["pool_bytes"]) for r in rows)

    def pages(self, job_id: int) -> list[StoredPage]:
        return [from_row(StoredPage, r) for r in self.db.fetch_all("pages", job_id=job_id)]

    def result(self, job_id: int) -> StoredResult | None:
        row = self.db.fetch_one("result", job_id=job_id)
        return None if row is None else from_row(StoredResult, row)

    def summary(self, ids: Sequence[int]) -> list[JobSummary]:
        return [from_row(JobSummary, r) for r in self.db.fetch_all("summary", ids=list(ids))]

    def progress(self, ids: Sequence[int]) -> dict[int, tuple[int, int | None]]:
        """Pages stored so far and the page count the cell declared (None until it has), per job."""
        return {r["id"]: (r["pages_stored"], r["pages_total"]) for r in self.db.fetch_all("progress", ids=list(ids))}

    def running_jobs(self) -> list[RunningJob]:
        return [from_row(RunningJob, r) for r in self.db.fetch_all("running_jobs")]

    def dispatchers(self) -> list[DispatcherSeen]:
        """Every dispatcher that ever ran on this queue, with how long it has been silent (silent_s)."""
        return [from_row(DispatcherSeen, r) for r in self.db.fetch_all("dispatchers")]

    def prunable(self, age_s: float) -> list[Prunable]:
        """Finished jobs older than age_s, with how many pages and attempts each would take along."""
        return [from_row(Prunable, r) for r in self.db.fetch_all("prunable", age_s=age_s)]

    # -- the dashboard's charts (dispatcher/web.py) -------------------------------------------------------

    def budget_history(self, window_s: float, limit: int = 10_000) -> list[MemorySpan]:
        """The attempts that held memory in the last window_s seconds, oldest first."""
        return [from_row(MemorySpan, r) for r in self.db.fetch_all("budget_history", window_s=window_s,
                                                                    limit=limit)]

    def peak_samples(self, window_s: float, limit: int = 200_000) -> list[PeakSample]:
        """Attempts that ended on their own in the last window_s seconds: what calibrates the class table."""
        return [from_row(PeakSample, r) for r in self.db.fetch_all("peak_samples", window_s=window_s, limit=limit)]

    def recent_timings(self, limit: int) -> list[Timing]:
        """The latest jobs that have run, newest first: their attempts' run time and submit-to-end time."""
        return [from_row(Timing, r) for r in self.db.fetch_all("recent_timings", limit=limit)]
