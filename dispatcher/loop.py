"""The dispatcher: claim, launch, watch, heartbeat, reconcile. Talks only to the Queue and Runtime ports."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from job_image.contract import (
    EXIT_BAD_INPUT,
    DocumentInfo,
    Header,
    JobOptions,
    Limits,
    PageResult,
    oversized,
    reason_text,
)

from .channel import ChannelReader, Refused
from .classes import SizeClassTable, format_bytes
from .errors import DocumentMissing
from .models import Exit, Handle, Job, JobState, KillReason, LaunchSpec, Outcome
from .outcome import Backoff, classify, decide
from .ports import CellInput, Claimed, Completed, Finish, Observer, Queue, Runtime, Unobserved

log = logging.getLogger("jobcell.dispatcher")


@dataclass(frozen=True)
class LoopConfig:
    owner: str
    pool: str
    budget_bytes: int  # the default runtime's
    poll_s: float = 1.0
    heartbeat_s: float = 10.0
    reconcile_s: float = 5.0
    max_claim: int = 32
    io_threads: int = 8  # engine calls (launch, inspect, logs, remove) run side by side
    backoff: Backoff = field(default_factory=Backoff)
    job_options: JobOptions = field(default_factory=lambda: JobOptions())  # handed to every cell in its header
    output_limits: Limits = field(default_factory=Limits)
    summarise: bool = False  # a manifest worker on the trusted side summarises succeeded documents
    drain_output_s: float = 30.0  # how long an ended unit's output may take to be read to its end
    budgets: dict[str, int] = field(default_factory=dict)  # runtimes that classes are routed to, by name
    cpu_budget: float | None = None  # CPUs the default runtime's cells may use at once; None: not counted
    sizing: bool = True  # cells may stop before any work when their estimate exceeds their cap, and move up


@dataclass
class Watched:
    job: Job
    spec: LaunchSpec
    handle: Handle | None
    started: float  # wall clock, so that an adopted unit keeps its original deadline
    killing: KillReason | None = None
    reader: ChannelReader | None = None
    reading: threading.Thread | None = None
    refused: str | None = None
    abandoned: bool = False  # our lease went to another dispatcher: stop reading, never kill

    @property
    def max_attempts(self) -> int:
        return self.job.max_attempts

    @property
    def key(self) -> tuple[int, int]:
        return self.spec.job_id, self.spec.attempt


class Dispatcher:
    def __init__(self, queue: Queue, runtime: Runtime, table: SizeClassTable, config: LoopConfig,
                 clock: Callable[[], float] = time.time, observer: Observer | None = None) -> None:
        self.queue = queue
        self.observer = observer or Unobserved()
        self.runtime = runtime
        self.table = table
        self.cfg = config
        self.clock = clock
        self.watched: dict[tuple[int, int], Watched] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.draining = False
        self._next_heartbeat = 0.0
        self._next_reconcile = 0.0
        self._errors = 0
        self._pool = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="jobcell-io")

    # -- main loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until stop(): with drain, wait for running units; without, leave them for the next dispatcher."""
        cpus = "not counted" if self.cfg.cpu_budget is None else f"{self.cfg.cpu_budget:g}"
        log.info("dispatcher %s started: pool %s, memory budget %s, CPU budget %s, runtime %s", self.cfg.owner,
                 self.cfg.pool, format_bytes(self.cfg.budget_bytes), cpus, self.runtime.name)
        self.queue.watch(self.wake.set)
        self.runtime.watch(self.wake.set)
        while not (self.stopping.is_set() and (not self.draining or not self.watched)):
            delay = self.cfg.poll_s
            try:
                self.tick()
                self._errors = 0
            except Exception as e:  # database or engine down: back off, keep every unit, lose nothing
                self._errors += 1
                delay = min(30.0, 0.5 * 2 ** min(self._errors, 6)) * random.uniform(1.0, 1.25)
                log.warning("tick failed (%s: %s); retrying in %.1f s", type(e).__name__, e, delay)
                self.observer.ticked(False, f"{type(e).__name__}: {e}")
            else:
                self.observer.ticked(True)
            self.wake.wait(delay)
            self.wake.clear()
        if not self.draining:
            self._leave()
        self._pool.shutdown(wait=True)
        log.info("dispatcher %s stopped", self.cfg.owner)

    def stop(self, drain: bool = False) -> None:
        self.draining = drain
        self.stopping.set()
        self.wake.set()

    def tick(self) -> None:
        now = self.clock()
        if now >= self._next_reconcile:
            self.reconcile()
            self._next_reconcile = now + self.cfg.reconcile_s
        if now >= self._next_heartbeat:
            self.heartbeat()
            self._next_heartbeat = now + self.cfg.heartbeat_s
        self.watch_units()
        if not self.stopping.is_set():
            self.claim_and_launch()

    # -- steps ----------------------------------------------------------------------------------------

    def claim_and_launch(self) -> None:
        claimed = self.queue.claim(self.cfg.owner, self.cfg.pool, self.cfg.budget_bytes, self.cfg.max_claim,
                                   self.cfg.budgets, self.cfg.cpu_budget)
        fresh = [Watched(c.job, c.spec, None, self.clock()) for c in claimed]
        for w in fresh:
            self.watched[w.key] = w
        # Launches are I/O on the engine: side by side, as `docker run`s in parallel would be.
        failures = [e for e in self._pool.map(self._launch, fresh) if e is not None]
        if failures:
            raise failures[0]  # the engine may be down: let the loop back off before claiming more

    def _launch(self, w: Watched) -> Exception | None:
        spec = w.spec
        log.info("job %s attempt %s: launching on %s (%s)", *w.key, spec.tier, format_bytes(spec.memory_limit_bytes),
                 extra={"job": spec.job_id, "attempt": spec.attempt, "tier": spec.tier})
        too_large = oversized(w.job.document_bytes, self.cfg.job_options)
        if too_large:  # refused before any cell starts: nothing to stream, nothing to retry
            self._finish(w, Exit(exit_code=EXIT_BAD_INPUT, reason=too_large))
            return None
        try:
            header = self._header(w)
            w.handle = self.runtime.launch(spec, CellInput(header, spec.document_uri))
        except DocumentMissing as e:  # nothing was started; no retry can bring the document back
            log.warning("job %s attempt %s: %s", *w.key, e)
            self._finish(w, Exit(exit_code=EXIT_BAD_INPUT, reason=str(e)))
            return None
        except Exception as e:
            log.error("job %s attempt %s: launch failed: %s", *w.key, e)
            self._finish(w, Exit(exit_code=None, lost=True, reason=f"launch failed: {e}"))
            return e
        self.queue.started(spec.job_id, spec.attempt, w.handle.runtime, w.handle.ref)
        self._read_output(w, header.done_pages)
        return None

    def _header(self, w: Watched) -> Header:
        spec, job = w.spec, w.job
        return Header(job_id=spec.job_id, attempt=spec.attempt, tier=spec.tier,
                      memory_limit_bytes=spec.memory_limit_bytes, workload=spec.workload, params=spec.params,
                      done_pages=self.queue.done_pages(spec.job_id, spec.attempt),
                      document_name=(job.source or job.document_uri).rsplit("/", 1)[-1][-200:],
                      document_bytes=job.document_bytes, options=self.cfg.job_options, cpus=self._cpus(spec.tier),
                      larger_tier=self._may_move_up(spec.tier))

    def _may_move_up(self, tier: str) -> bool:
        return self.cfg.sizing and self.table.next_tier(self.table.resolve(tier).name) is not None

    def _cpus(self, tier: str) -> float | None:
        """The CPUs admission counted this cell for, which its workers keep to; None where nothing counts them
        (no CPU budget, or a tier routed to a runtime whose cells have machines of their own)."""
        c = self.table.resolve(tier)
        return None if self.cfg.cpu_budget is None or c.runtime in self.cfg.budgets else c.cpus

    # -- the result channel ---------------------------------------------------------------------------

    def _read_output(self, w: Watched, earlier_pages: list[int]) -> None:
        """Read the unit's output on a thread of its own, storing each checked page as it comes."""
        job_id, attempt = w.key

        def store(page: PageResult) -> bool:
            return self.queue.put_page(job_id, attempt, page)

        def declare(doc: DocumentInfo) -> None:
            self.queue.declare_pages(job_id, attempt, doc.pages)

        w.reader = ChannelReader(job_id, attempt, frozenset(earlier_pages), self.cfg.job_options.max_pages,
                                 store, declare, self.cfg.output_limits)
        w.reading = threading.Thread(target=self._follow, args=(w,), name=f"jobcell-out-{job_id}-{attempt}",
                                     daemon=True)
        w.reading.start()

    def _follow(self, w: Watched) -> None:
        reader, handle = w.reader, w.handle
        assert reader is not None and handle is not None
        failures, last_look = 0, False
        while True:
            try:
                skip = reader.consumed  # a stream read again starts from its first byte
                for chunk in self.runtime.output(handle):
                    if w.abandoned:
                        return
                    if skip:
                        taken = min(skip, len(chunk))
                        chunk, skip = chunk[taken:], skip - taken
                    if chunk:
                        reader.feed(chunk)
                if self.runtime.poll(handle) is None:
                    # the stream ended but the unit runs on: the engine restarted, a proxy dropped us
                    raise ConnectionError("its output stream ended while it still runs")
                if not reader.done and not last_look:
                    # Ended without its done record: one more read after a moment, for what an engine that
                    # was away (live-restore) copies from the unit's pipe into its log only now.
                    last_look = True
                    self.stopping.wait(1.0)
                    continue
                reader.feed_all(())
                return
            except Refused as e:
                if w.abandoned:
                    return
                w.refused = reason_text(str(e))
                log.warning("job %s attempt %s: refused its output: %s; killing", *w.key, w.refused)
                if w.killing is None:
                    self._kill(w, KillReason.REFUSED)
                return
            except Exception as e:  # the engine or the database went away: read again from where we were
                failures += 1
                if self.stopping.is_set() or w.key not in self.watched:
                    return
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("job %s attempt %s: reading its output failed (%s: %s); again in %.1f s", *w.key,
                            type(e).__name__, e, delay)
                self.stopping.wait(delay)

    def watch_units(self) -> None:
        """Poll every unit; each unit's error is its own, unless all fail (then the engine is down: back off)."""
        now = self.clock()
        live = [w for w in self.watched.values() if w.handle is not None]
        polled = list(self._pool.map(self._poll, live))
        failed = [err for _, _, err in polled if err is not None]
        ended = [(w, e) for w, e, _ in polled if e is not None]
        failed += [err for err in self._pool.map(self._finish_safely, ended) if err is not None]
        if failed and len(failed) >= len(live):
            raise failed[0]
        for w, e, err in polled:
            if err is None and e is None and w.killing is None and now - w.started > w.spec.timeout_s:
                log.warning("job %s attempt %s: past the %s deadline (%.0f s); killing", *w.key, w.spec.tier,
                            w.spec.timeout_s)
                self._kill(w, KillReason.DEADLINE)

    def _poll(self, w: Watched) -> tuple[Watched, Exit | None, Exception | None]:
        assert w.handle is not None
        try:
            return w, self.runtime.poll(w.handle), None
        except Exception as e:
            log.warning("job %s attempt %s: poll failed (%s: %s); trying again next tick", *w.key,
                        type(e).__name__, e)
            return w, None, e

    def _finish_safely(self, we: tuple[Watched, Exit]) -> Exception | None:
        try:
            self._finish(*we)
        except Exception as e:
            log.warning("job %s attempt %s: recording its end failed (%s: %s); trying again next tick",
                        *we[0].key, type(e).__name__, e)
            return e
        return None

    def heartbeat(self) -> None:
        self.queue.alive(self.cfg.owner, self.cfg.pool, self.runtime.name)
        samples = [(w.spec.job_id, w.spec.attempt, m) for w in list(self.watched.values())
                   if w.handle is not None and (m := self.runtime.memory_now(w.handle)) is not None]
        self.queue.observe_memory(samples)
        keys = {w.spec.job_id: w for w in self.watched.values()}
        ours, cancels = self.queue.heartbeat(self.cfg.owner, list(keys))
        for job_id, w in keys.items():
            if job_id not in ours:
                # Our lease was taken back (we were cut off too long): another dispatcher may have adopted the
                # unit and be watching it now. Never kill it here; reconcile kills it only if no running
                # attempt is its own.
                log.error("job %s attempt %s: lease lost; no longer watching its unit (left to whoever owns "
                          "the job now)", *w.key)
                w.abandoned = True
                del self.watched[w.key]
            elif job_id in cancels and w.killing is None:
                log.info("job %s attempt %s: cancel requested; killing", *w.key)
                self._kill(w, KillReason.CANCEL)

    def reconcile(self) -> None:
        """Adopt units whose job we may own, kill units whose job moved on, reap leases with no unit."""
        keep: list[int] = []
        for h in self.runtime.owned():
            key = (h.job_id, h.attempt)
            if key in self.watched:
                keep.append(h.job_id)
                continue
            claimed = self.queue.adopt(self.cfg.owner, self.cfg.pool, h.job_id, h.attempt)
            if claimed is not None:
                self._adopt(claimed, h)
                keep.append(h.job_id)
            elif self.queue.attempt_is_current(h.job_id, h.attempt):
                keep.append(h.job_id)  # another live dispatcher's unit
            else:
                log.warning("job %s attempt %s: unit belongs to no running attempt; removing it", *key)
                self.runtime.kill(h)
                self.runtime.cleanup(h)
        for job_id in self.queue.reap(self.cfg.pool, keep):
            log.warning("job %s: lease expired and no unit is left; attempt recorded as lost", job_id)

    # -- helpers --------------------------------------------------------------------------------------

    def _adopt(self, claimed: Claimed, handle: Handle) -> None:
        started = claimed.started_at.timestamp() if claimed.started_at else self.clock()
        w = Watched(claimed.job, claimed.spec, handle, started)
        self.watched[w.key] = w
        self._read_output(w, self.queue.done_pages(*w.key))
        log.info("job %s attempt %s: adopted a running unit (no relaunch)", *w.key)

    def _kill(self, w: Watched, reason: KillReason) -> None:
        # Recorded before the kill, so that whoever reads the exit knows the SIGKILL was ours, not an OOM.
        self.queue.mark_killing(w.spec.job_id, w.spec.attempt, reason)
        w.killing = reason
        if w.handle:
            self.runtime.kill(w.handle)

    def _finish(self, w: Watched, ended: Exit) -> None:
        if w.reading is not None:  # every byte the unit wrote is read (or refused) before it is judged
            w.reading.join(5.0 if ended.lost else self.cfg.drain_output_s)
        killed_by = w.killing or self.queue.kill_reason(*w.key)
        if w.refused is not None:
            killed_by = KillReason.REFUSED
            ended = replace(ended, reason=f"refused the cell's results: it {w.refused}")
        ended = replace(ended, reason=reason_text(ended.reason))
        outcome = classify(ended, killed_by)
        completed = None
        reader = w.reader
        if outcome is Outcome.SUCCEEDED:
            why = self._incomplete(w)
            if why is not None:  # an exit code is only a claim: success needs the whole result
                outcome, ended = Outcome.ERROR, replace(ended, reason=why)
            elif reader is not None and reader.document is not None:
                completed = Completed(reader.document.media_type, reader.document.pages, self.cfg.summarise)
        ended = replace(ended, peak_memory_bytes=self._peak(w, ended, outcome))
        need = reader.need_bytes if reader is not None else None
        d = decide(outcome, tier=w.spec.tier, attempt=w.spec.attempt, max_attempts=w.max_attempts,
                   table=self.table, backoff=self.cfg.backoff, exit_reason=ended.reason, need_bytes=need)
        result = Finish(job_id=w.spec.job_id, attempt=w.spec.attempt, outcome=outcome, exit=ended,
                        duration_s=ended.ran_s if ended.ran_s is not None else max(0.0, self.clock() - w.started),
                        next_state=d.state.value,
                        next_tier=d.tier, delay_s=d.delay_s, reason=d.reason, completed=completed, need_bytes=need)
        if self.queue.finish(self.cfg.owner, result):
            level = logging.INFO if outcome is Outcome.SUCCEEDED or d.state is not JobState.FAILED else logging.WARNING
            log.log(level, "job %s attempt %s: %s (exit %s, peak %s) -> %s%s", *w.key, outcome.value,
                    ended.exit_code, format_bytes(ended.peak_memory_bytes), d.state.value,
                    f": {d.reason}" if d.reason else "",
                    extra={"job": w.spec.job_id, "attempt": w.spec.attempt, "tier": w.spec.tier})
            # queue wait: from when the job became runnable (scheduled_at) to when this attempt was taken
            self.observer.attempt_ended(result, w.spec.tier, max(0.0, w.started - w.job.scheduled_at.timestamp()))
            if w.handle:
                self.runtime.cleanup(w.handle)
        else:
            # Not ours any more: whoever owns the job now reads this unit's end itself; reconcile removes it
            # if no running attempt is its own. Removing it here would make the owner record it lost.
            log.warning("job %s attempt %s: ended as %s but the lease was no longer ours; left to its owner",
                        *w.key, outcome.value)
        self.watched.pop(w.key, None)

    @staticmethod
    def _incomplete(w: Watched) -> str | None:
        """Why an exit 0 is not a success: output not read to its end, or not a whole result."""
        if w.reader is None or (w.reading is not None and w.reading.is_alive()):
            return "its output could not be read to the end"
        return w.reader.incomplete()

    @staticmethod
    def _peak(w: Watched, ended: Exit, outcome: Outcome) -> int | None:
        """The runtime's own measure, else the cell's report; never past the limit the cgroup enforced."""
        limit = w.spec.memory_limit_bytes
        if outcome is Outcome.OOM:  # it reached its limit, whatever could be sampled before the kill
            return limit
        measures = [m for m in (ended.peak_memory_bytes, w.reader.peak_bytes if w.reader else None) if m]
        seen = max(measures) if measures else None
        return min(seen, limit) if seen is not None and limit else seen

    def _leave(self) -> None:
        """Stop without draining: units keep running and our leases expire now, for prompt adoption."""
        if self.watched:
            log.info("leaving %d running unit(s) for the next dispatcher to adopt", len(self.watched))
        try:
            self.queue.release(self.cfg.owner)
        except Exception as e:
            log.warning("could not release leases (%s); they will expire on their own", e)
