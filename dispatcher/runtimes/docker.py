"""Docker runtime: one hardened, memory-capped container per attempt, through the Docker SDK."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import docker
from docker.errors import APIError, NotFound
from docker.types import LogConfig

from ..models import Exit, Handle, LaunchSpec
from . import job_env, last_line, peak_from_output, tail

log = logging.getLogger("jobcell.docker")

LABEL_JOB = "jobcell.job"
LABEL_ATTEMPT = "jobcell.attempt"
LABEL_POOL = "jobcell.pool"
LABEL_TIER = "jobcell.tier"
LABEL_QUEUE = "jobcell.queue"


@dataclass(frozen=True)
class DockerOptions:
    image: str = "jobcell-job:dev"
    pool: str = "default"
    queue_id: str = ""  # the queue's identity; with the pool, it scopes which containers are ours
    network_mode: str = "bridge"
    user: str = "10001:10001"
    pids_limit: int = 256
    tmpfs_size: str = "64m"
    cpus: float | None = None
    store_source: str | None = None  # host path or volume name, mounted read-only at /store
    env: dict[str, str] = field(default_factory=dict)  # passed to every job (may hold secrets: never logged)
    stats_every_s: float = 2.0


class DockerRuntime:
    name = "docker"

    def __init__(self, options: DockerOptions, client: docker.DockerClient | None = None) -> None:
        self.options = options
        self.client = client or docker.from_env(timeout=60)
        self._peaks: dict[str, int] = {}  # container id -> highest memory usage sampled

    # -- launch ---------------------------------------------------------------------------------------

    def container_config(self, spec: LaunchSpec) -> dict[str, Any]:
        """The hardened create() arguments; public so tests and docs can show exactly what a job gets."""
        o = self.options
        cfg: dict[str, Any] = dict(
            image=o.image,
            name=spec.name,
            environment={**o.env, **job_env(spec)},
            labels={LABEL_JOB: str(spec.job_id), LABEL_ATTEMPT: str(spec.attempt), LABEL_POOL: o.pool,
                    LABEL_TIER: spec.tier, LABEL_QUEUE: o.queue_id},
            mem_limit=spec.memory_limit_bytes,
            memswap_limit=spec.memory_limit_bytes,  # equal: no swap, so the cap is a real cap
            pids_limit=o.pids_limit,
            read_only=True,
            tmpfs={"/tmp": f"rw,noexec,nosuid,nodev,size={o.tmpfs_size}"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            user=o.user,
            network_mode=o.network_mode,
            log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "1"}),
            detach=True,
        )
        if o.cpus:
            cfg["nano_cpus"] = int(o.cpus * 1e9)
        if o.store_source:
            cfg["volumes"] = {o.store_source: {"bind": "/store", "mode": "ro"}}
        return cfg

    def launch(self, spec: LaunchSpec) -> Handle:
        try:
            container = self.client.containers.create(**self.container_config(spec))
        except APIError as e:
            if e.status_code != 409:
                raise
            # The name is the attempt: it already exists, so this attempt was launched before. Never twice.
            container = self.client.containers.get(spec.name)
            log.info("job %s attempt %s: container already exists, not launching again", spec.job_id, spec.attempt)
        if container.status == "created":
            container.start()
        return Handle(self.name, container.id or spec.name, spec.job_id, spec.attempt)

    # -- watch ----------------------------------------------------------------------------------------

    def poll(self, handle: Handle) -> Exit | None:
        try:
            c = self.client.containers.get(handle.ref)
        except NotFound:
            return Exit(exit_code=None, lost=True, reason="the container vanished")
        state = c.attrs["State"]
        if state["Status"] in ("created", "running", "restarting", "paused"):
            return None
        limit = int(c.attrs["HostConfig"]["Memory"] or 0)
        stdout = c.logs(stdout=True, stderr=False, tail=200).decode(errors="replace")
        stderr = c.logs(stdout=False, stderr=True, tail=200).decode(errors="replace")
        oom = bool(state.get("OOMKilled"))
        peak = peak_from_output(stdout) or self._peaks.get(handle.ref)
        if oom and limit:
            peak = max(peak or 0, limit)
        self._forget(handle.ref)
        return Exit(exit_code=int(state["ExitCode"]), oom_killed=oom, peak_memory_bytes=peak,
                    log_tail=tail(stdout + stderr), reason=last_line(stderr))

    def _sample_forever(self) -> None:
        """Keep the highest memory usage seen per container: the fallback when a job cannot report its own
        peak (killed at its deadline, crashed hard). On its own thread: a stats call can take a second."""
        while True:
            try:
                for c in self.client.api.containers(filters={"label": f"{LABEL_POOL}={self.options.pool}"}):
                    stats = cast(dict[str, Any], self.client.api.stats(c["Id"], stream=False, one_shot=True))
                    mem = stats.get("memory_stats") or {}
                    seen = int(mem.get("max_usage") or mem.get("usage") or 0)
                    if seen:
                        self._peaks[c["Id"]] = max(self._peaks.get(c["Id"], 0), seen)
            except Exception as e:  # the engine is down or the container just went: try again later
                log.debug("memory sampling skipped: %s", e)
            time.sleep(self.options.stats_every_s)

    def _forget(self, ref: str) -> None:
        self._peaks.pop(ref, None)

    def kill(self, handle: Handle) -> None:
        try:
            self.client.containers.get(handle.ref).kill()
        except NotFound:
            pass
        except APIError as e:
            if e.status_code != 409:  # 409: not running any more
                raise

    def cleanup(self, handle: Handle) -> None:
        with contextlib.suppress(NotFound):
            self.client.containers.get(handle.ref).remove(force=True, v=True)  # v: its scratch volume too
        self._forget(handle.ref)

    def owned(self) -> Sequence[Handle]:
        ours = [f"{LABEL_POOL}={self.options.pool}", f"{LABEL_QUEUE}={self.options.queue_id}"]
        # the low-level list: one call, no inspect per container that could race a removal
        found = self.client.api.containers(all=True, filters={"label": ours})
        out = []
        for c in found:
            labels = c.get("Labels") or {}
            try:
                out.append(Handle(self.name, c["Id"], int(labels[LABEL_JOB]), int(labels[LABEL_ATTEMPT])))
            except (KeyError, ValueError):
                log.warning("container %s carries jobcell labels but no job/attempt; ignored", c.get("Names"))
        return out

    def watch(self, wake: Callable[[], None]) -> None:
        threading.Thread(target=self._events, args=(wake,), name="jobcell-docker-events", daemon=True).start()
        threading.Thread(target=self._sample_forever, name="jobcell-docker-stats", daemon=True).start()

    def _events(self, wake: Callable[[], None]) -> None:
        filters = {"type": "container", "event": "die", "label": f"{LABEL_POOL}={self.options.pool}"}
        while True:
            try:
                for _ in self.client.events(decode=True, filters=filters):
                    wake()
            except Exception as e:  # the engine went away; the loop keeps polling meanwhile
                log.warning("docker event stream lost (%s); reconnecting", e)
            time.sleep(2.0)
