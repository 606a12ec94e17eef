"""Configuration from JOBCELL_* environment variables, validated once at start."""

from __future__ import annotations

import os
import re
import socket
from typing import Literal
from urllib.parse import urlsplit

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from job_image.contract import JobOptions

from .classes import SizeClassTable, load_table_from, parse_bytes, parse_seconds
from .errors import ConfigError


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _long_secret(v: SecretStr | None) -> SecretStr | None:
    if v is not None and len(v.get_secret_value()) < 16:  # they guard medical text: no guessable secrets
        raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 24`)")
    return v


class ProcessSettings(_Group):
    """JOBCELL_PROCESS_*: the process runtime."""

    state_dir: str = "var/process-units"  # logs, pids and exit codes of its units
    cap: Literal["auto", "rlimit", "watchdog"] = "auto"


class KubernetesSettings(_Group):
    """JOBCELL_K8S_*: the Kubernetes runtime."""

    namespace: str = "jobcell"
    service_account: str | None = None


class RenderSettings(_Group):
    """JOBCELL_RENDER_*: the Render runtime. Its cells' own base service (never the dispatcher's: a one-off job
    inherits its base service's environment) and tier -> planId as JSON; the API key is RENDER_API_KEY, read
    from the environment only."""

    service_id: str | None = None
    plans: dict[str, str] = Field(default_factory=dict)

    @field_validator("plans")
    @classmethod
    def _plans(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {tier: plan for tier, plan in v.items() if not re.fullmatch(r"plan-(srv|crn)-\d{3}", plan)}
        if bad:
            raise ValueError(f"{bad} are not Render instance type ids: use plan-srv-006 (starter, 512 MB), "
                             "plan-srv-008 (standard, 2 GB), plan-srv-010 (pro, 4 GB), plan-srv-011 (pro plus, 8 GB),"
                             " plan-srv-013 (16 GB) or plan-srv-014 (32 GB); plan-crn-* for a cron job base")
        return v


class S3Settings(_Group):
    """JOBCELL_S3_*: the object store for documents (else a local directory, JOBCELL_STORE_DIR)."""

    bucket: str | None = None
    endpoint: str | None = None
    prefix: str = "documents/"


class HttpSettings(_Group):
    """JOBCELL_HTTP_*: the dispatcher's /metrics, /healthz and /readyz (dispatcher/observe.py): off unless a port
    is given; loopback by default, since metrics name pools and classes (0.0.0.0 in a pod, for the kubelet)."""

    port: int | None = Field(default=None, ge=1, le=65535)
    host: str = Field(default="127.0.0.1", min_length=1)


class WebhookSettings(_Group):
    """JOBCELL_WEBHOOK_*: the deployment's URL, told of every job's end (jobs may name their own too); every
    request is signed with the secret, and none is sent without one (dispatcher/webhooks.py)."""

    url: str | None = None
    secret: SecretStr | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    max_tries: int = Field(default=10, ge=1, le=100)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_webhook_url(v)

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        return _long_secret(v)


class WebSettings(_Group):
    """JOBCELL_WEB_*: `jobcell web` (dispatcher/web.py). Loopback by default, and it refuses to start without a
    token or a basic-auth user and password, since the pages show documents' text (often medical)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8088, ge=1, le=65535)
    token: SecretStr | None = None
    user: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    actions: bool = False  # cancel and retry buttons; off: the dashboard only reads

    @field_validator("token", "password")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        return _long_secret(v)


class Settings(BaseSettings, JobOptions):
    """Every field is JOBCELL_<NAME>; the README's configuration table lists them. Each runtime's and each
    endpoint's settings form a group of their own (JOBCELL_K8S_NAMESPACE is `k8s.namespace`): the variables stay
    flat, as deployments set them. The cells' options come from the contract's JobOptions, so they are validated
    here, once, at start."""

    # A group's variables are JOBCELL_<GROUP>_<FIELD>: split once, after the group's name
    model_config = SettingsConfigDict(env_prefix="JOBCELL_", extra="ignore", frozen=True, env_nested_delimiter="_",
                                      env_nested_max_split=1)

    database_url: SecretStr | None = None
    classes: str | None = None  # JSON table; wins over classes_file
    classes_file: str | None = None
    memory_budget: str = "75%"  # bytes ("6GiB") or a share of the engine's memory ("75%")
    pool: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,63}$")
    dispatcher_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    runtime: Literal["docker", "process", "kubernetes", "render"] = "docker"
    # Budgets of the runtimes that classes are routed to (a class's "runtime"), as JSON: {"render": "16GiB"}
    runtime_budgets: dict[Literal["docker", "process", "kubernetes", "render"], str] = Field(default_factory=dict)
    # CPUs the cells of this host may use at once (a class's "cpus" each, 1 by default): "auto" is the engine's
    # CPUs for docker and process, and no CPU admission for kubernetes and render (their schedulers place cells
    # by CPU themselves); "off", or a number such as 2 or 3.5
    cpu_budget: str = "auto"
    process: ProcessSettings = Field(default_factory=ProcessSettings)
    cgroup_root: str | None = None  # process runtime on cgroup v2: a delegated cgroup with +memory
    k8s: KubernetesSettings = Field(default_factory=KubernetesSettings)
    render: RenderSettings = Field(default_factory=RenderSettings)
    job_image: str = "jobcell-job:dev"
    network: str = "none"  # Docker network of job containers: none, since a cell's input comes on stdin
    job_user: str = "10001:10001"
    pids_limit: int = Field(default=256, ge=16)
    tmpfs_size: str = Field(default="64m", pattern=r"^\d+[kmg]$")
    scratch_size: str = Field(default="512m", pattern=r"^\d+[kmg]$")  # capped, noexec; counts against memory
    job_cpus: float | None = Field(default=None, gt=0)
    # Docker: the OCI runtime cells start with (e.g. crun, registered in /etc/docker/daemon.json "runtimes");
    # unset: the engine's default (runc)
    oci_runtime: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # A cell that estimates, once its document is validated, that it needs more than its cap stops before any
    # work and moves to the tier that holds the estimate (no OOM on the way); off: it runs until its cap says
    sizing: bool = True
    # and every field of JobOptions (JOBCELL_DPI, JOBCELL_MAX_PAGES, ...): what every cell is told
    llm_model: str = "gpt-4o-mini"  # the manifest step, on the trusted side, when OPENAI_API_KEY is set
    store_dir: str = "var/store"
    s3: S3Settings = Field(default_factory=S3Settings)
    lease_ttl_s: float = Field(default=30.0, ge=3)
    poll_interval_s: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_exponent: float = Field(default=4.0, ge=0)
    backoff_cap_s: float = Field(default=3600.0, gt=0)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for log shippers
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    # Retention on a schedule: every dispatcher prunes finished jobs older than this (e.g. 30d), with their
    # pages, results and stored documents, each prune_every_s; unset: nothing is deleted unless `jobcell prune`
    prune_after: str | None = None
    prune_every_s: float = Field(default=3600.0, ge=1)
    web: WebSettings = Field(default_factory=WebSettings)

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        if v.strip().endswith("%"):
            share = float(v.strip()[:-1])
            if not 0 < share <= 100:
                raise ValueError("a share of memory must be between 0% and 100%")
        else:
            parse_bytes(v)
        return v.strip()

    @field_validator("cpu_budget")
    @classmethod
    def _cpus(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("auto", "off"):
            try:
                n = float(v)
            except ValueError:
                raise ValueError("write auto, off, or a number of CPUs such as 2 or 3.5") from None
            if not 0 < n <= 4096:
                raise ValueError("a number of CPUs must be above 0")
        return v

    def cpu_budget_for(self, host_cpus: int) -> float | None:
        """The CPU budget of this dispatcher's own runtime, given the CPUs of the host its cells run on."""
        if self.cpu_budget == "off" or (self.cpu_budget == "auto" and self.runtime in ("kubernetes", "render")):
            return None
        return float(host_cpus) if self.cpu_budget == "auto" else float(self.cpu_budget)

    @field_validator("runtime_budgets")
    @classmethod
    def _budgets(cls, v: dict[str, str]) -> dict[str, str]:
        for name, amount in v.items():
            try:
                parse_bytes(amount)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return v

    def runtimes(self) -> list[str]:
        """Every runtime this dispatcher starts cells on: its own, then those classes are routed to."""
        routed = sorted({c.runtime for c in self.table().classes if c.runtime and c.runtime != self.runtime})
        return [self.runtime, *routed]

    @field_validator("prune_after")
    @classmethod
    def _age(cls, v: str | None) -> str | None:
        if v is not None and parse_seconds(v) < 3600:
            raise ValueError("keep finished jobs at least an hour (e.g. 30d, 12h)")
        return v

    def prune_after_s(self) -> float | None:
        return None if self.prune_after is None else parse_seconds(self.prune_after)

    def table(self) -> SizeClassTable:
        return load_table_from(self.classes, self.classes_file)

    def budget_bytes(self, total_bytes: int) -> int:
        if self.memory_budget.endswith("%"):
            return int(total_bytes * float(self.memory_budget[:-1]) / 100)
        return parse_bytes(self.memory_budget)

    def dsn(self) -> str:
        if self.database_url is None:
            raise ConfigError("JOBCELL_DATABASE_URL is not set: point it at Postgres, "
                              "e.g. postgresql://jobcell:secret@localhost:5432/jobcell")
        dsn = self.database_url.get_secret_value()
        try:
            conninfo_to_dict(dsn)
        except ProgrammingError:
            raise ConfigError("JOBCELL_DATABASE_URL is not a connection URL: expected "
                              "postgresql://user:password@host:5432/dbname") from None
        return dsn

    def job_options(self) -> JobOptions:
        return JobOptions(**{name: getattr(self, name) for name in JobOptions.model_fields})


def check_webhook_url(url: str) -> str:
    """An absolute http(s) URL, or a ValueError that says so."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not a webhook URL: expected http(s)://host/path")
    return url


# Settings that gave cells credentials or a shared store; refused so that an upgrade cannot silently keep them.
RETIRED = {
    "JOBCELL_JOB_ENV": "cells hold no credentials any more; the dispatcher stores what they emit and runs the "
                       "LLM manifest itself (set OPENAI_API_KEY for the dispatcher)",
    "JOBCELL_JOB_DATABASE_URL": "cells no longer reach the database; the dispatcher stores their pages",
    "JOBCELL_STORE_MOUNT": "cells no longer mount the store; each is handed its one document on stdin",
    "JOBCELL_K8S_ENV_SECRET": "job pods get no Secret any more; only the dispatcher holds credentials",
    "JOBCELL_K8S_STORE_CLAIM": "job pods mount no store; each fetches its one document by a presigned URL",
}


def load_settings() -> Settings:
    """Settings from the environment, or a ConfigError that names each bad variable and what to fix."""
    retired = [f"  - {name}: {why}; unset it" for name, why in RETIRED.items() if os.environ.get(name)]
    if retired:
        raise ConfigError("\n".join(["invalid configuration:", *retired]))
    try:
        s = Settings()
    except ValidationError as err:
        lines = ["invalid configuration:"]
        for e in err.errors():
            name = "JOBCELL_" + "_".join(str(p) for p in e["loc"]).upper()
            lines.append(f"  - {name}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None
    except ValueError as err:  # pydantic-settings' own parse errors
        raise ConfigError(f"invalid configuration: {err}") from None
    s.table()  # a bad size-class table is refused at start, not at the first job
    if s.runtime in ("kubernetes", "render") and s.memory_budget.endswith("%"):
        raise ConfigError(f"JOBCELL_MEMORY_BUDGET must be an amount (e.g. 8GiB) with JOBCELL_RUNTIME={s.runtime}: "
                          "a share of the dispatcher's own memory says nothing about where jobs run")
    if s.webhook.url and s.webhook.secret is None:
        raise ConfigError("JOBCELL_WEBHOOK_URL needs JOBCELL_WEBHOOK_SECRET (at least 16 characters): webhooks are "
                          "only sent signed, so that receivers can tell them from forgeries")
    for runtime in s.runtimes():  # the dispatcher's own runtime and every one a class is routed to
        where = f"JOBCELL_RUNTIME={runtime}" if runtime == s.runtime else f"a class routed to {runtime}"
        if runtime in ("kubernetes", "render") and not s.s3.bucket:
            raise ConfigError(f"{where} needs JOBCELL_S3_BUCKET: its cells cannot be streamed their document, so "
                              "each fetches it from the object store by a presigned URL")
        if runtime == "render" and not (s.render.service_id and os.environ.get("RENDER_API_KEY")):
            raise ConfigError(f"{where} needs RENDER_API_KEY and JOBCELL_RENDER_SERVICE_ID, the id of the cells' "
                              "own base service (jobcell-cell in render.yaml), never the dispatcher's own")
    return s
