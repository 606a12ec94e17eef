"""The composition root: the one place that picks concrete adapters and wires them to the core."""

from __future__ import annotations

import os
from pathlib import Path

from .classes import check_budget
from .loop import Dispatcher, LoopConfig
from .outcome import Backoff
from .ports import DocumentStore
from .queue import PostgresQueue
from .runtimes.docker import DockerOptions, DockerRuntime
from .settings import Settings
from .store import LocalStore, S3Store


def build_queue(s: Settings, *, give_up_after_s: float | None = 60.0) -> PostgresQueue:
    return PostgresQueue(s.dsn(), s.table(), lease_ttl_s=s.lease_ttl_s, give_up_after_s=give_up_after_s)


def build_store(s: Settings) -> DocumentStore:
    if s.s3_bucket:
        return S3Store(s.s3_bucket, s.s3_prefix, s.s3_endpoint)
    return LocalStore(s.store_dir)


def build_runtime(s: Settings) -> DockerRuntime:
    mount = s.store_mount or str(Path(s.store_dir).resolve())
    env = s.passed_env()
    if s.s3_endpoint:
        env.setdefault("JOBCELL_S3_ENDPOINT", s.s3_endpoint)
    return DockerRuntime(DockerOptions(
        image=s.job_image, pool=s.pool, network_mode=s.network, user=s.job_user, pids_limit=s.pids_limit,
        tmpfs_size=s.tmpfs_size, cpus=s.job_cpus, store_source=None if s.s3_bucket else mount, env=env))


def build_dispatcher(s: Settings) -> Dispatcher:
    table = s.table()
    runtime = build_runtime(s)
    budget = s.budget_bytes(runtime.memory_total())
    check_budget(table, budget)
    if not s.s3_bucket:
        os.makedirs(s.store_dir, exist_ok=True)
    queue = build_queue(s, give_up_after_s=None)  # the dispatcher waits out a database outage
    config = LoopConfig(owner=s.dispatcher_id, pool=s.pool, budget_bytes=budget, poll_s=s.poll_interval_s,
                        heartbeat_s=s.lease_ttl_s / 3, reconcile_s=max(2.0, s.lease_ttl_s / 6),
                        backoff=Backoff(s.backoff_exponent, s.backoff_cap_s))
    return Dispatcher(queue, runtime, table, config)
