"""Retention: finished jobs older than a cutoff go, with their attempts, pages, results and the stored documents
no other job uses. Run by hand (`jobcell prune`) or on a schedule by the dispatcher (JOBCELL_PRUNE_AFTER)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .background import Periodic
from .ports import DocumentStore
from .queue import PostgresQueue

log = logging.getLogger("jobcell.retention")


@dataclass(frozen=True)
class Pruned:
    jobs: int
    attempts: int
    pages: int
    documents: int  # stored documents deleted (0 on a dry run: which would go is only known when deleting)


def prune(queue: PostgresQueue, store: DocumentStore, age_s: float, *, dry_run: bool) -> Pruned:
    """Never a queued or running job, whatever its age; each job is re-checked as it is deleted."""
    old = queue.prunable(age_s)
    attempts, pages = sum(r.attempts for r in old), sum(r.pages for r in old)
    if dry_run or not old:
        return Pruned(len(old), attempts, pages, 0)
    ids, documents = queue.prune([r.id for r in old], age_s)
    for uri in documents:
        store.delete(uri)
    return Pruned(len(ids), attempts, pages, len(documents))


class RetentionWorker(Periodic):
    """Prunes every `every_s` on a thread of its own."""

    name = "retention"

    def __init__(self, queue: PostgresQueue, store: DocumentStore, age_s: float, every_s: float = 3600.0) -> None:
        super().__init__(every_s)
        self.queue, self.store, self.age_s = queue, store, age_s

    def round(self) -> bool:
        done = prune(self.queue, self.store, self.age_s, dry_run=False)
        if done.jobs:
            log.info("retention: deleted %d finished job(s) older than %.0f s, %d page(s), %d stored document(s)",
                     done.jobs, self.age_s, done.pages, done.documents)
        return False
