"""Docker runtime: one sealed, memory-capped container per attempt, through the Docker SDK.

A cell gets no environment of the dispatcher's, no network (network_mode none), no mount but two capped,
noexec tmpfs (/tmp and /scratch), and its one document streamed into its stdin after the header line; it
answers on stdout, which the engine keeps (json-file) so that a restarted dispatcher reads it again from the
first byte. The SDK's high-level create() cannot set StdinOnce, so containers are created with the low-level
API: with StdinOnce, closing our end of the attach is the cell's end of input.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, cast

import docker
from docker.errors import APIError, NotFound
from docker.types import LogConfig

from job_image.contract import ENV_SCRATCH

from ..models import Exit, Handle, LaunchSpec
from ..ports import CellInput
from .base import Hardening, Identity, LabelKeys, OpenDocument, RuntimeBase, last_line, no_documents, tail

log = logging.getLogger("jobcell.docker")

# jobcell.job, .attempt, .pool, .queue, .tier: what running containers are found by after a restart
LABELS = LabelKeys.under("jobcell.")
LABEL_JOB, LABEL_ATTEMPT, LABEL_POOL, LABEL_QUEUE, LABEL_TIER = LABELS


@dataclass(frozen=True)
class DockerOptions:
    image: str = "jobcell-job:dev"
    pool: str = "default"
    queue_id: str = ""  # the queue's identity; with the pool, it scopes which containers are ours
    network_mode: str = "none"  # a cell needs no network: its document comes in on stdin
    user: str = "10001:10001"  # uid:gid
    pids_limit: int = 256
    tmpfs_size: str = "64m"
    scratch_size: str = "512m"  # tmpfs: counted against the memory cap as well, so it is doubly capped
    cpus: float | None = None
    oci_runtime: str | None = None  # the engine's runtime for cells (e.g. crun); None: the engine's default
    stats_every_s: float = 2.0
    start_grace_s: float = 60.0  # a container still 'created' after this lost its launcher
    input_timeout_s: float = 30.0  # per MiB of input streamed into a cell


class DockerRuntime(RuntimeBase):
    name = "docker"

    def __init__(self, options: DockerOptions, client: docker.DockerClient | None = None,
                 documents: OpenDocument = no_documents) -> None:
        self.options = options
        self.identity = Identity(self.name, options.pool, options.queue_id, LABELS)
        self.hardening = Hardening.of(options.user, options.tmpfs_size, options.scratch_size, options.pids_limit)
        self.client = client or docker.from_env(timeout=60)
        self.documents = documents  # the store, read on the trusted side and streamed into the cell
        self._peaks: dict[str, int] = {}  # container id -> highest memory usage sampled
        self._now: dict[str, int] = {}  # container id -> memory usage at the last sample
        self._sampler: threading.Thread | None = None
        self._sampler_lock = threading.Lock()

    # -- launch ---------------------------------------------------------------------------------------

    def container_config(self, spec: LaunchSpec) -> dict[str, Any]:
        """The sealed create() arguments (low-level API); public so tests and docs show what a cell gets."""
        o, h = self.options, self.hardening
        tmpfs = "rw,noexec,nosuid,nodev,size="
        scratch = f"{tmpfs}{h.scratch_for(spec.memory_limit_bytes)},uid={h.uid},gid={h.gid},mode=0700"
        host: dict[str, Any] = dict(
            mem_limit=spec.memory_limit_bytes,
            memswap_limit=spec.memory_limit_bytes,  # equal: no swap, so the cap is a real cap
            pids_limit=h.pids_limit,
            read_only=h.read_only_root,
            tmpfs={"/tmp": f"{tmpfs}{h.tmpfs_bytes}", "/scratch": scratch},
            cap_drop=list(h.drop_capabilities),
            security_opt=[f"no-new-privileges:{str(h.no_new_privileges).lower()}"],
            network_mode=o.network_mode,
            init=True,  # tini as pid 1: the cell's zombies are reaped, signals reach the job
            log_config=LogConfig(type="json-file", config={"max-size": "64m", "max-file": "2"}),
        )
        if o.cpus:
            host["nano_cpus"] = int(o.cpus * 1e9)
        if o.oci_runtime:
            host["runtime"] = o.oci_runtime
        return dict(
            image=o.image,
            name=self.container_name(spec),
            user=f"{h.uid}:{h.gid}",
            environment={ENV_SCRATCH: "/scratch"},  # nothing of the dispatcher's: no secret, no URL
            labels=self.identity.labels(spec.job_id, spec.attempt, spec.tier),
            stdin_open=True,
            detach=False,  # with stdin_open, what makes the SDK set StdinOnce
            host_config=host,
        )

    def container_name(self, spec: LaunchSpec) -> str:
        """The attempt's name, scoped to this queue and pool: two deployments on one engine never collide."""
        return f"jobcell-{self.options.queue_id[:12] or 'noqueue'}-{self.options.pool}-{spec.job_id}-{spec.attempt}"

    def launch(self, spec: LaunchSpec, cell: CellInput) -> Handle:
        # opened first: a document that is gone fails the launch before any container exists
        document = self.documents(cell.document_uri)[0] if cell.header.document_bytes else None
        with contextlib.ExitStack() as stack:
            if document is not None:
                stack.enter_context(document)
            return self._launch(spec, cell, document)

    def _launch(self, spec: LaunchSpec, cell: CellInput, document: BinaryIO | None) -> Handle:
        cfg = self.container_config(spec)
        host = self.client.api.create_host_config(**cfg.pop("host_config"))
        try:
            ref = str(self.client.api.create_container(host_config=host, **cfg)["Id"])
        except APIError as e:
            if e.status_code != 409:
                raise
            # The name is the attempt: it already exists, so this attempt was launched before. Never twice.
            existing = self.client.api.inspect_container(cfg["name"])
            if existing["Config"]["Labels"].get(LABEL_QUEUE) != self.options.queue_id:
                raise  # a name we did not make: never take over another deployment's container
            ref = str(existing["Id"])
            log.info("job %s attempt %s: container already exists, not launching again", spec.job_id, spec.attempt)
        if self.client.api.inspect_container(ref)["State"]["Status"] == "created":
            self._start_with_input(ref, cell, document)
        self._start_sampling()
        return self.handle(ref, spec.job_id, spec.attempt)

    def _start_with_input(self, ref: str, cell: CellInput, document: BinaryIO | None) -> None:
        """Attach to stdin, start, stream the header and the document, then close: the cell's end of input."""
        attached = self.client.api.attach_socket(ref, params={"stdin": 1, "stream": 1})
        sock = cast(socket.socket, getattr(attached, "_sock", attached))
        sock.settimeout(self.options.input_timeout_s)  # a cell that stops reading cannot hold a launch thread
        try:
            self.client.api.start(ref)
            sock.sendall(cell.header_line())
            if document is not None:
                writer = sock.makefile("wb")
                shutil.copyfileobj(document, writer, 1024 * 1024)
                writer.flush()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:  # it ended early, or stopped reading
            log.info("container %s stopped reading its input early (%s)", ref[:12], type(e).__name__)
        finally:
            attached.close()

    def output(self, handle: Handle) -> Iterator[bytes]:
        try:
            yield from self.client.api.logs(handle.ref, stdout=True, stderr=False, stream=True, follow=True)
        except NotFound:
            return

    # -- watch ----------------------------------------------------------------------------------------

    def poll(self, handle: Handle) -> Exit | None:
        try:
            c = self.client.containers.get(handle.ref)
        except NotFound:
            return Exit(exit_code=None, lost=True, reason="the container vanished")
        state = c.attrs["State"]
        if state["Status"] == "created":
            # Only its launcher starts a cell (it alone streams the input): one still unstarted after the
            # grace period lost its launcher (a dispatcher killed between create and start).
            if _age_s(c.attrs["Created"]) < self.options.start_grace_s:
                return None
            return Exit(exit_code=None, lost=True, reason="created but never started: its dispatcher died while "
                                                          "launching it")
        if state["Status"] in ("running", "restarting", "paused"):
            return None
        # stderr only: stdout is the result channel (page text, often medical), never copied into logs
        stderr = c.logs(stdout=False, stderr=True, tail=200).decode(errors="replace")
        oom = bool(state.get("OOMKilled"))
        peak = self._peaks.get(handle.ref)
        self._forget(handle.ref)
        ran = _age_s(state["StartedAt"]) - _age_s(state["FinishedAt"]) if state.get("FinishedAt") else None
        return Exit(exit_code=int(state["ExitCode"]), oom_killed=oom, peak_memory_bytes=peak,
                    log_tail=tail(stderr), reason=last_line(stderr), ran_s=ran if ran and ran > 0 else None)

    def _start_sampling(self) -> None:
        """From the first unit launched or adopted on: peaks are measured whether or not anyone calls watch()."""
        with self._sampler_lock:
            if self._sampler is None:
                self._sampler = threading.Thread(target=self._sample_forever, name="jobcell-docker-stats",
                                                 daemon=True)
                self._sampler.start()

    def _sample_forever(self) -> None:
        """Keep the highest memory usage seen per container: the fallback when a job cannot report its own
        peak (killed at its deadline, crashed hard), and what operators watch live. On its own thread: a stats
        call can take a second."""
        while True:
            try:
                for c in self.client.api.containers(filters={"label": f"{LABEL_POOL}={self.options.pool}"}):
                    peak, now = _cgroup_memory(c["Id"]) or self._stats_memory(c["Id"])
                    if peak:
                        self._peaks[c["Id"]] = max(self._peaks.get(c["Id"], 0), peak)
                    if now:
                        self._now[c["Id"]] = now
            except Exception as e:  # the engine is down or the container just went: try again later
                log.debug("memory sampling skipped: %s", e)
            time.sleep(self.options.stats_every_s)

    def _stats_memory(self, cid: str) -> tuple[int, int]:
        """(peak, now) from the engine's stats API: where the container's cgroup is not visible from here."""
        mem = cast(dict[str, Any], self.client.api.stats(cid, stream=False, one_shot=True)).get("memory_stats") or {}
        return int(mem.get("max_usage") or mem.get("usage") or 0), int(mem.get("usage") or 0)

    def _forget(self, ref: str) -> None:
        self._peaks.pop(ref, None)
        self._now.pop(ref, None)

    def memory_now(self, handle: Handle) -> int | None:
        return self._now.get(handle.ref)

    def kill(self, handle: Handle) -> None:
        try:
            self.client.api.kill(handle.ref)
        except NotFound:
            pass
        except APIError as e:
            if e.status_code != 409:  # 409: not running: ended, or created and never started
                raise
            if self.client.api.inspect_container(handle.ref)["State"]["Status"] == "created":
                self.cleanup(handle)  # never started, so nothing to read: gone, and read as lost

    def cleanup(self, handle: Handle) -> None:
        try:
            self.client.api.remove_container(handle.ref, force=True, v=True)
        except NotFound:
            pass
        except APIError as e:
            if e.status_code != 409:  # 409: a removal already in progress (another dispatcher's cleanup)
                raise
        self._forget(handle.ref)

    def owned(self) -> Sequence[Handle]:
        ours = [f"{k}={v}" for k, v in self.identity.selector().items()]
        # the low-level list: one call, no inspect per container that could race a removal
        found = self.client.api.containers(all=True, filters={"label": ours})
        out = self.identity.handles((c["Id"], str(c.get("Names")), c.get("Labels")) for c in found)
        if out:
            self._start_sampling()  # a restarted dispatcher's containers are sampled again from here
        return out

    def watch(self, wake: Callable[[], None]) -> None:
        threading.Thread(target=self._events, args=(wake,), name="jobcell-docker-events", daemon=True).start()

    def _events(self, wake: Callable[[], None]) -> None:
        filters = {"type": "container", "event": "die", "label": f"{LABEL_POOL}={self.options.pool}"}
        while True:
            try:
                for _ in self.client.events(decode=True, filters=filters):
                    wake()
            except Exception as e:  # the engine went away; the loop keeps polling meanwhile
                log.warning("docker event stream lost (%s); reconnecting", e)
            time.sleep(2.0)


def _age_s(created: str) -> float:
    """Seconds since an engine timestamp (RFC 3339 with nanoseconds, which fromisoformat cannot take)."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", created).replace("Z", "+00:00")
    return time.time() - datetime.fromisoformat(stamp).timestamp()


# Where a container's memory cgroup is when the dispatcher shares the engine's host (cgroupfs and systemd drivers,
# v1 and v2). Reading it costs the engine nothing; each stats call costs dockerd CPU (issue 12).
_CGROUP_DIRS = ("/sys/fs/cgroup/memory/docker/{id}", "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope",
                "/sys/fs/cgroup/system.slice/docker-{id}.scope", "/sys/fs/cgroup/docker/{id}")


def _cgroup_memory(cid: str) -> tuple[int, int] | None:
    """(peak, now) of a container from its cgroup files, or None where they cannot be read from here."""
    for template in _CGROUP_DIRS:
        base = template.format(id=cid)
        for peak_file, now_file in (("memory.max_usage_in_bytes", "memory.usage_in_bytes"),
                                    ("memory.peak", "memory.current")):
            try:
                with open(f"{base}/{peak_file}") as p, open(f"{base}/{now_file}") as n:
                    return int(p.read()), int(n.read())
            except (OSError, ValueError):
                continue
    return None
