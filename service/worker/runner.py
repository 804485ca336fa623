"""The worker loop: claim what can be admitted, admit at step boundaries, step the batch, publish.

One iteration is one denoising step of the running batch (or one wait for work when idle):

1. flush the ledger's outbox (results survive a Redis outage there);
2. claim: reclaim idle deliveries (dead or draining workers'), then read new entries, never more
   than the scheduler has free slots for, so what this worker cannot take stays with idle ones
   (while a batch runs, that read rides in the previous step's progress round trip);
3. admit: the scheduler picks who joins; expired jobs leave, the others are started and prepared
   (an invalid request fails alone);
4. step the batch once, publish progress (which reports cancelled and superseded jobs: they leave
   at the next boundary), decode the finished members together and store each result, fenced by
   its attempt. Progress (and the read of step 2) goes out on a thread of its own during the next
   step (off the denoising path), in line when members finish (their last event precedes the result).

Every job leaves through `Ledger.leave` (`ledger.py`); a step that raises is split (`stepping.py`);
progress rides `progress.py`; the keeper thread (`keeper.py`) renews
deliveries and the heartbeat while the loop moves. SIGTERM drains: stop claiming, hand back what
waits, finish the batch within the grace period, hand back the rest, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from types import FrameType
from typing import Any

import redis

from ..ldm.batch import DenoisingBatch, Member
from ..ldm.engine import Engine
from ..ldm.images import png_bytes
from ..ldm.request import GenerationRequest
from ..queue.connection import client_for, unavailable
from ..queue.delivery import Entry, Lease, WorkerQueue
from ..queue.states import JobStatus
from ..settings import WorkerSettings
from . import faults, previews, stepping
from .adapters import Adapters
from .keeper import Keeper
from .ledger import Job, Ledger, Outcome
from .metrics import WorkerMetrics
from .progress import Progress, ProgressLine, Sent
from .scheduler import Candidate, Scheduler

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 500  # an idle worker waits this long on the streams between reclaim scans
RECLAIM_POLL_S = 0.5
ADAPTER_POLL_MS = 20
REDIS_ERRORS = redis.RedisError  # progress and sign-off are best effort, whatever Redis says


class Worker:
    def __init__(self, settings: WorkerSettings, engines: dict[str, Engine], metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.engines = engines
        self.metrics = metrics
        self.name = settings.name
        self.queue = self._queue()
        self.scheduler = Scheduler(settings.max_batch, settings.pixel_budget, settings.max_wait_ms / 1000)
        self.batch: DenoisingBatch | None = None
        self.ledger = Ledger(self.queue, metrics, self._detach)
        self.keeper = Keeper(settings, self._queue(), self.ledger, metrics, self._status)
        self.adapters = Adapters(settings, engines, metrics)
        self.draining = False
        self._drain_deadline: float | None = None
        self._wait_s: float | None = None
        self._next_reclaim = 0.0
        self._read_ahead = False  # the last step's round trip also read new entries
        self.progress = ProgressLine(self._queue())
        self._started = time.time()

    def _queue(self) -> WorkerQueue:
        s = self.settings
        return WorkerQueue(
            client_for(s),
            self.name,
            list(self.engines),
            max_deliveries=s.max_deliveries,
            result_ttl_s=s.result_ttl_s,
            min_replicas=s.redis_min_replicas,
            replica_wait_ms=s.redis_wait_ms,
        )

    def _status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "models": list(self.engines),
            "draining": self.draining,
            "started": self._started,
        }

    def _detach(self, job_id: str) -> None:
        if self.batch is not None:
            self.batch.remove(job_id)
        self.scheduler.leave(job_id)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.keeper.start()
        log.info("worker %s serving %s", self.name, ", ".join(self.engines))
        failures = 0
        groups_ready = False
        while True:
            self.keeper.beat()
            try:
                if not groups_ready:
                    self.queue.ensure_groups()
                    groups_ready = True
                if self.draining and self._drain():
                    break
                self.ledger.flush()
                self.ledger.drop_superseded()
                self._offer_loaded()
                self._claim()
                self._admit()
                self._step()
                self.ledger.flush()
                failures = 0
            except redis.RedisError as e:
                if "NOGROUP" in str(e):
                    log.warning("consumer group missing (Redis lost its data?): creating it again")
                    groups_ready = False
                    continue
                # Down, out of memory, read-only after a failover, or an answer we did not expect: a
                # worker that exits would only crash-loop; it backs off and tries again.
                failures += 1
                self.metrics.redis_errors.inc()
                delay = min(5.0, 0.1 * 2 ** min(failures, 6)) * (0.5 + random.random() / 2)
                level = logging.WARNING if unavailable(e) else logging.ERROR
                log.log(level, "redis: %s; retrying in %.1f s", e or type(e).__name__, delay)
                if self.draining and self._drain_deadline and time.monotonic() > self._drain_deadline:
                    log.warning("drain deadline passed without redis: leaving the rest to be reclaimed")
                    break
                time.sleep(delay)
        self.keeper.stop()
        self.adapters.close()
        self.progress.close()
        with contextlib.suppress(REDIS_ERRORS):
            self.queue.sign_off()
        log.info("worker %s stopped", self.name)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.draining:
            self.draining = True
            self._drain_deadline = time.monotonic() + self.settings.drain_grace_s

    def _drain(self) -> bool:
        """One drain iteration; True when the worker may exit."""
        self._collect_progress()
        waiting = [self.ledger.jobs[c.key] for c in self.scheduler.take_waiting()]
        waiting += [job for job in self.adapters.take_waiting() if isinstance(job, Job)]
        if waiting:
            log.info("draining: handing back %d waiting jobs", len(waiting))
            self.ledger.leave_all(waiting, Outcome.handed_back())
        assert self._drain_deadline is not None
        late = time.monotonic() >= self._drain_deadline
        if self.batch is not None and len(self.batch) and not late:
            return False
        running = [job for key in list(self.scheduler.running) if (job := self.ledger.get(key))]
        if running:
            log.info("drain grace over: handing back %d running jobs", len(running))
            self.ledger.leave_all(running, Outcome.handed_back())
        self.batch = None
        self.ledger.flush()
        return True

    # -- claiming ---------------------------------------------------------------------------------

    def _claim(self) -> None:
        read_ahead, self._read_ahead = self._read_ahead, False
        models, free = self._read_target()
        if free == 0:
            return
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + RECLAIM_POLL_S
            self._reclaim(models, free)
            models, free = self._read_target()
            if free == 0:
                return
        busy = self.batch is not None and len(self.batch) > 0
        if busy:
            if read_ahead:  # the last step's progress round trip has just looked
                return
            block: int | None = None
        elif self._wait_s is not None:
            block = max(1, int(self._wait_s * 1000))
        else:
            block = IDLE_BLOCK_MS
        if block is not None and self.adapters.waiting:
            block = min(block, ADAPTER_POLL_MS)  # jobs join as soon as their adapters are in
        self._take(self.queue.read(models, free, block), reclaimed=False)

    def _read_target(self) -> tuple[list[str], int]:
        """The streams to look at for new jobs and how many to take: none while draining or full;
        while a batch runs, only its model's stream."""
        free = self.scheduler.free_slots()
        if self.draining or free == 0:
            return [], 0
        group = self.scheduler.group()
        return ([group[0]] if isinstance(group, tuple) else list(self.engines)), free

    def _reclaim(self, models: list[str], free: int) -> None:
        """Takes idle deliveries one at a time: a reclaimed job may be a suspect, which runs alone."""
        taken = 0
        for model in models:
            while taken < free and self.scheduler.free_slots() > 0:
                entries = self.queue.reclaim(model, self.settings.reclaim_idle_ms, 1)
                if not entries:
                    break
                taken += len(entries)
                self._take(entries, reclaimed=True)

    def _take(self, entries: list[Entry], reclaimed: bool) -> None:
        if not entries:
            return
        if reclaimed:
            self.metrics.reclaimed.inc(len(entries))
        for claimed in self.queue.claim(entries):
            if claimed.outcome == "dead":
                log.warning("job %s: %s", claimed.entry.job_id, claimed.detail)
                self.metrics.dead_lettered.inc()
                self.metrics.jobs.labels(JobStatus.FAILED.value).inc()
            elif claimed.lease is None:
                log.debug("job %s: nothing to run (%s)", claimed.entry.job_id, claimed.outcome)
            else:
                self._accept(claimed.lease)

    def _accept(self, lease: Lease) -> None:
        """Resolves the request against the model; an invalid one fails here, alone."""
        engine = self.engines[lease.model]
        try:
            request = engine.resolve(GenerationRequest.from_json(lease.spec_json))
        except Exception as e:  # a bad spec, an unreadable image, anything the model refuses
            job = Job(lease, None)
            self.ledger.hold(job)
            self.ledger.leave(job, Outcome.raised(e))
            return
        job = Job(lease, request)
        self.ledger.hold(job)
        if self.adapters.ready(lease.model, request.loras):
            self._offer(job)
        else:
            self.adapters.fetch(lease.model, request.loras, job)

    def _offer(self, job: Job) -> None:
        assert job.request is not None
        lease = job.lease
        f = self.engines[lease.model].config.downsample_factor
        h, w = job.request.height // f, job.request.width // f
        group, solo = (lease.model, h, w), lease.deliveries > 1
        self.scheduler.offer(
            Candidate(job.id, group, h * w, lease.deadline, time.time(), solo, lease.started)
        )

    def _offer_loaded(self) -> None:
        """Jobs whose adapters have been loaded meanwhile wait to be admitted; a failed load fails its job."""
        for loaded in self.adapters.done():
            job = loaded.key
            if isinstance(job, Job) and self.ledger.get(job.id) is job:  # not left meanwhile
                if loaded.error:
                    self.ledger.leave(job, Outcome.failed(loaded.error))
                else:
                    self._offer(job)

    # -- admitting and stepping -------------------------------------------------------------------

    def _admit(self) -> None:
        decision = self.scheduler.decide(time.time(), self.draining)
        self._wait_s = decision.wait_s
        for c in decision.expire:
            self.ledger.leave(
                self.ledger.jobs[c.key], Outcome.expired("deadline passed before the job started")
            )
        if not decision.admit:
            return
        jobs = [self.ledger.jobs[c.key] for c in decision.admit]
        engine = self.engines[jobs[0].lease.model]
        if self.batch is None or not len(self.batch):
            self.batch = engine.new_batch()
        busy_start = time.perf_counter()
        for job, status in zip(jobs, self.queue.start([j.lease for j in jobs]), strict=True):
            if status != JobStatus.RUNNING.value:
                log.info("job %s not started: %s", job.id, status)
                self.ledger.leave(job, Outcome.no_longer_ours(status))
                continue
            assert job.request is not None
            if self.settings.test_faults:
                faults.inject(job.request.prompt, job.id, job.lease.deliveries, self.settings.stall_timeout_s)
            job.started = time.time()
            self.metrics.queue_wait_seconds.observe(max(0.0, job.started - job.lease.created))
            try:
                loras = self.adapters.get(job.lease.model, job.request.loras)
                refiner = self.engines.get(job.request.refiner.model) if job.request.refiner else None
                member, _tokens = engine.prepare(job.request, job.id, loras=loras, refiner=refiner)
            except Exception as e:
                log.warning("job %s failed to prepare: %s", job.id, e)
                self.ledger.leave(job, Outcome.raised(e))
                continue
            if self.settings.test_faults:
                faults.poison(job.request.prompt, member)
            self.batch.add(member)
        self.metrics.busy(time.perf_counter() - busy_start)

    def _step(self) -> None:
        batch = self.batch
        if batch is None or not len(batch):
            self.metrics.busy(0.0)
            return
        active = sum(1 for m in batch.members.values() if not m.done)
        started = time.perf_counter()
        try:
            stepped = stepping.step(batch)  # a member that fails alone fails alone
        except stepping.DeviceLost as e:
            log.critical("the device is lost (%s): exiting, so that other workers take the jobs", e)
            os._exit(3)
        for key, error in stepped.failed.items():
            self.ledger.leave(self.ledger.jobs[str(key)], Outcome.raised(error, "denoising failed: "))
        finished = stepped.finished
        elapsed = time.perf_counter() - started
        if active:
            self.metrics.batch_size.observe(active)
            self.metrics.step_seconds.observe(elapsed)
            adapters = {a.uid for m in batch.members.values() for a, _ in m.loras}
            self.metrics.lora_adapters.observe(len(adapters))
            previews.publish(self.queue, self.engines, list(batch.members.values()), self.ledger.get)
        # The last step's progress went out while this step ran: who it found cancelled or
        # superseded leaves now (finished or not), and the jobs it read wait to be admitted.
        left = self._collect_progress()
        finished = [m for m in finished if str(m.key) not in left]
        members = [*batch.members.values(), *finished]
        sent = [(str(m.key), self.ledger.jobs[str(m.key)].lease) for m in members]
        items = [(lease, m.steps_done, m.total_steps) for (_, lease), m in zip(sent, members, strict=True)]
        models, free = self._read_target()
        self._read_ahead = free > 0
        if not finished and len(batch):
            # Off the critical path: the round trip overlaps the next step's UNet call.
            self.progress.send_later(items, sent, models, free)
            self.metrics.busy(elapsed)
            return
        # In line when members finish (their last progress event must precede their result) and
        # when the batch empties (nothing stays in flight while the worker waits for work).
        left = self._apply_progress(*self.progress.send_now(self.queue, items, sent, models, free))
        done = [m for m in finished if str(m.key) not in left]
        if done:
            decode_start = time.perf_counter()
            self._publish([self.ledger.jobs[str(m.key)] for m in done], done)
            elapsed += time.perf_counter() - decode_start
        self.metrics.busy(elapsed)

    def _collect_progress(self) -> set[str]:
        """Applies the progress round trip in flight, if any; returns the jobs that left."""
        return self._apply_progress(*self.progress.collect())

    def _apply_progress(self, sent: Sent, progress: Progress) -> set[str]:
        """Jobs no longer `running` (cancelled, superseded) leave the batch; new entries are taken."""
        statuses, entries = progress
        left = set()
        for key, lease in sent:
            status = statuses.get(lease.job_id, JobStatus.RUNNING.value)
            job = self.ledger.get(key)
            if status == JobStatus.RUNNING.value or job is None or job.lease != lease:
                continue  # still running, or already gone
            log.info("job %s leaves the batch: %s", key, status)
            self.ledger.leave(job, Outcome.no_longer_ours(status))
            left.add(key)
        self._take(entries, reclaimed=False)
        return left

    def _publish(self, jobs: list[Job], members: list[Member]) -> None:
        """Decodes finished members together, each by its own decoder (a refiner's after a hand-off),
        one by one if that fails; each result goes out at once."""
        engine = self.engines[jobs[0].lease.model]
        try:
            images = engine.decode_members(members)
        except Exception as e:
            if len(jobs) > 1:
                log.warning("decoding %d images failed (%s): decoding them one by one", len(jobs), e)
                for job, member in zip(jobs, members, strict=True):
                    self._publish([job], [member])
                return
            log.exception("decoding failed")
            self.ledger.leave(jobs[0], Outcome.raised(e, "decoding failed: "))
            return
        for job, image in zip(jobs, images, strict=True):
            assert job.request is not None
            self.ledger.leave(job, Outcome.succeeded(png_bytes(image, job.request.parameters())))
