"""The composition root: the one place that picks concrete adapters and wires them to the core."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from .classes import check_budget, parse_bytes
from .database import Database
from .errors import ConfigError
from .loop import Dispatcher, LoopConfig
from .manifest import ManifestWorker, Summariser
from .observe import HttpServer, PrometheusObserver
from .outcome import Backoff
from .ports import DocumentStore, Runtime
from .queue import PostgresQueue
from .retention import RetentionWorker
from .routing import RoutedRuntime, routed_budgets
from .settings import Settings
from .store import LocalStore, S3Store
from .webhooks import WebhookDeliverer, WebhookOptions

if TYPE_CHECKING:  # the Docker SDK and the runtimes load only where a dispatcher starts: CLI reads stay quick
    import docker

log = logging.getLogger("jobcell.wiring")


def build_queue(s: Settings, *, give_up_after_s: float | None = 60.0) -> PostgresQueue:
    return PostgresQueue(s.dsn(), s.table(), lease_ttl_s=s.lease_ttl_s, give_up_after_s=give_up_after_s)


def build_store(s: Settings) -> DocumentStore:
    if s.s3.bucket:
        return S3Store(s.s3.bucket, s.s3.prefix, s.s3.endpoint)
    return LocalStore(s.store_dir)


def build_runtime(s: Settings, queue_id: str, store: DocumentStore,
                  client: docker.DockerClient | None = None, name: str | None = None) -> Runtime:
    """The runtime `name` (default: JOBCELL_RUNTIME) as these settings configure it."""
    name = name or s.runtime
    if name == "kubernetes":
        from .runtimes.kubernetes import KubernetesOptions, KubernetesRuntime  # lightkube only where it is used

        return KubernetesRuntime(KubernetesOptions(
            image=s.job_image, namespace=s.k8s.namespace, pool=s.pool, queue_id=queue_id,
            service_account=s.k8s.service_account, user=s.job_user,
            tmpfs_size=s.tmpfs_size.replace("m", "Mi") if s.tmpfs_size.endswith("m") else s.tmpfs_size),
            presign=store.presign)
    if name == "render":
        from .runtimes.render import RenderOptions, RenderRuntime

        assert s.render.service_id is not None  # checked when the settings were loaded
        return RenderRuntime(RenderOptions(service_id=s.render.service_id, api_key=os.environ["RENDER_API_KEY"],
                                           pool=s.pool, queue_id=queue_id, plans=s.render.plans),
                             presign=store.presign)
    if name == "process":
        from .runtimes.process import ProcessOptions, ProcessRuntime

        return ProcessRuntime(ProcessOptions(state_root=s.process.state_dir, pool=s.pool, queue_id=queue_id,
                                             cgroup_root=s.cgroup_root, cap=s.process.cap,
                                             scratch_bytes=parse_bytes(s.scratch_size)), documents=store.open)
    from .runtimes.docker import DockerOptions, DockerRuntime

    options = DockerOptions(image=s.job_image, pool=s.pool, queue_id=queue_id, network_mode=s.network,
                            user=s.job_user, pids_limit=s.pids_limit, tmpfs_size=s.tmpfs_size,
                            scratch_size=s.scratch_size, cpus=s.job_cpus, oci_runtime=s.oci_runtime)
    return DockerRuntime(options, client=client, documents=store.open)


def build_webhooks(s: Settings) -> WebhookDeliverer:
    """Always: jobs may name a URL of their own even where the deployment has none."""
    secret = s.webhook.secret.get_secret_value() if s.webhook.secret else None
    return WebhookDeliverer(Database(s.dsn()), WebhookOptions(url=s.webhook.url, secret=secret,
                                                              timeout_s=s.webhook.timeout_s,
                                                              max_tries=s.webhook.max_tries))


def build_retention(s: Settings, queue: PostgresQueue, store: DocumentStore) -> RetentionWorker | None:
    """Scheduled pruning; None unless JOBCELL_PRUNE_AFTER is set."""
    age_s = s.prune_after_s()
    return None if age_s is None else RetentionWorker(queue, store, age_s, s.prune_every_s)


def build_manifests(s: Settings, queue: PostgresQueue) -> ManifestWorker | None:
    """The LLM manifest step, on the trusted side; None when no OPENAI_API_KEY is set."""
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        return None
    summariser = Summariser(key, os.environ.get("OPENAI_BASE_URL") or None, s.llm_model)
    return ManifestWorker(queue, summariser)


def _engine(s: Settings) -> docker.DockerClient:
    """A client for a reachable engine; waits it out (logged, with backoff) rather than failing the start."""
    import docker

    for attempt in Retrying(retry=retry_if_exception_type(docker.errors.DockerException),
                            wait=wait_exponential_jitter(multiplier=0.5, max=30), before_sleep=_log_engine_retry,
                            reraise=True):
        with attempt:
            client = docker.from_env(timeout=60)
            client.ping()
            return client
    raise AssertionError("unreachable")


def _log_engine_retry(state: RetryCallState) -> None:
    log.warning("Docker engine unavailable (%s); retrying in %.1f s",
                state.outcome.exception() if state.outcome else "?", state.next_action.sleep if state.next_action
                else 0)


def build_http(s: Settings) -> HttpServer | None:
    """/metrics, /healthz and /readyz when JOBCELL_HTTP_PORT is set. Bound here, before the dispatcher waits for
    its engine and database, so that a port in use is refused at start and the probes answer during that wait."""
    if s.http.port is None:
        return None
    # A pass can take a while (parallel launches, an ended unit's output drained): stuck means three polls and
    # half a minute without one ending.
    observer = PrometheusObserver(s.table().names, stale_after_s=3 * s.poll_interval_s + 30)
    try:
        return HttpServer(observer, s.http.host, s.http.port)
    except OSError as e:
        raise ConfigError(f"JOBCELL_HTTP_PORT/JOBCELL_HTTP_HOST: cannot listen on {s.http.host}:{s.http.port} "
                          f"({e.strerror or e})") from None


def build_dispatcher(s: Settings, migrate: bool = False, observer: PrometheusObserver | None = None) -> Dispatcher:
    table = s.table()
    client = None
    if "docker" in s.runtimes():
        import docker

        client = _engine(s)
        try:
            client.images.get(s.job_image)
        except docker.errors.ImageNotFound:
            raise ConfigError(f"the job image {s.job_image!r} is not on this Docker engine: build it "
                              "(scripts/build-job-image.sh) or pull it, or set JOBCELL_JOB_IMAGE") from None
    if s.runtime == "docker" and client is not None:
        info = client.info()
        if s.oci_runtime and s.oci_runtime not in (info.get("Runtimes") or {}):
            raise ConfigError(f"JOBCELL_OCI_RUNTIME={s.oci_runtime}: the Docker engine has no such runtime (it has "
                              f"{', '.join(sorted(info.get('Runtimes') or {}))}): install it and register it under "
                              '"runtimes" in /etc/docker/daemon.json, or unset JOBCELL_OCI_RUNTIME')
        total, cpus = int(info["MemTotal"]), int(info["NCPU"])
    else:  # process: this host's; kubernetes, render: explicit amounts (checked in settings) or none
        total, cpus = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), len(os.sched_getaffinity(0))
    budget, cpu_budget = s.budget_bytes(total), s.cpu_budget_for(cpus)
    budgets = routed_budgets(table, s.runtime, {k: parse_bytes(v) for k, v in s.runtime_budgets.items()})
    check_budget(table, budget, budgets, cpu_budget)
    queue = build_queue(s, give_up_after_s=None)  # the dispatcher waits out a database outage
    if migrate:
        queue.migrate()
    if not s.s3.bucket:
        os.makedirs(s.store_dir, mode=0o700, exist_ok=True)
    queue_id, store = queue.queue_id(), build_store(s)
    runtime = build_runtime(s, queue_id, store, client)
    if len(s.runtimes()) > 1:  # classes routed to other runtimes: one dispatcher, one queue, several runtimes
        others = [build_runtime(s, queue_id, store, client, name) for name in s.runtimes()[1:]]
        runtime = RoutedRuntime(runtime, others, table)
    config = LoopConfig(owner=s.dispatcher_id, pool=s.pool, budget_bytes=budget, budgets=budgets,
                        cpu_budget=cpu_budget, sizing=s.sizing,
                        poll_s=s.poll_interval_s,
                        heartbeat_s=s.lease_ttl_s / 3, reconcile_s=max(2.0, s.lease_ttl_s / 6),
                        backoff=Backoff(s.backoff_exponent, s.backoff_cap_s), job_options=s.job_options(),
                        summarise=bool(os.environ.get("OPENAI_API_KEY")))
    if observer is not None:
        # scrapes read the queue on a connection of their own that never waits out an outage (queue_up 0 instead)
        observer.watch_queue(build_queue(s, give_up_after_s=0).job_metrics, s.pool, budget)
    return Dispatcher(queue, runtime, table, config, observer=observer)
