"""The worker loop: claim what can be admitted, admit at step boundaries, step the batch, publish.

One iteration is one denoising step of the running batch (or one wait for work when idle):

1. flush the ledger's outbox (results survive a Redis outage there);
2. claim: reclaim idle deliveries (dead or draining workers'), then read new entries, never more
   than the scheduler has free slots for, so what this worker cannot take stays with idle ones
   (while a batch runs, that read rides in the progress round trip, `progress.py`);
3. admit: the scheduler picks who joins; expired jobs leave, the others are prepared (an invalid
   request fails alone) while Redis marks them running (`starts.py`: the answer is applied right
   after the step, before anything of theirs is published);
4. step the batch once; apply the progress round trip if it has come back (cancelled and superseded
   jobs leave, the entries it read wait to be admitted); decode the finished members together and
   store each result with its last progress event, fenced by its attempt; send the next round trip
   when one is due. It goes out on a thread of its own and the loop never waits for it.

Entries become jobs in `intake.py`; every job leaves through `Ledger.leave` (`ledger.py`); a step
that raises is split (`stepping.py`); progress rides `progress.py`; the keeper thread (`keeper.py`) renews
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
from ..queue.connection import client_for, unavailable
from ..queue.delivery import WorkerQueue
from ..queue.states import JobStatus
from ..settings import WorkerSettings
from . import faults, previews, stepping
from .adapters import Adapters
from .intake import Intake
from .keeper import Keeper
from .ledger import Job, Ledger, Outcome
from .metrics import WorkerMetrics
from .progress import Answer, ProgressLine
from .scheduler import Scheduler
from .starts import Starts

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
        self.scheduler = Scheduler(
            settings.max_batch, settings.pixel_budget, settings.max_wait_ms / 1000, settings.admission
        )
        self.batch: DenoisingBatch | None = None
        self.ledger = Ledger(self.queue, metrics, self._detach)
        self.keeper = Keeper(settings, self._queue(), self.ledger, metrics, self._status)
        self.adapters = Adapters(settings, engines, metrics)
        self.draining = False
        self._drain_deadline: float | None = None
        self._wait_s: float | None = None
        self._next_reclaim = 0.0
        self.progress = ProgressLine(self._queue(), settings.progress_interval_ms / 1000)
        self.starts = Starts(self._queue())
        self.intake = Intake(self.queue, engines, self.ledger, self.scheduler, self.adapters, metrics)
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
                self.intake.offer_loaded()
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
        self.starts.close()
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
        busy = self.batch is not None and len(self.batch) > 0
        if not busy and self.progress.in_flight:
            self._collect_progress()  # the batch has emptied: its read comes back within the interval
        models, free = self._read_target()
        if free == 0:
            return
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + RECLAIM_POLL_S
            self.intake.reclaim(models, free, self.settings.reclaim_idle_ms)
            models, free = self._read_target()
            if free == 0:
                return
        if busy:
            return  # a running batch reads through the progress round trip
        block: int | None = IDLE_BLOCK_MS
        if self._wait_s is not None:
            block = max(1, int(self._wait_s * 1000))
        elif self.scheduler.waiting:
            block = None  # taken since the last decision: they are admitted first
        if block is not None and self.adapters.waiting:
            block = min(block, ADAPTER_POLL_MS)  # jobs join as soon as their adapters are in
        self.intake.took(models, free, self.queue.read(models, free, block))

    def _read_target(self) -> tuple[list[str], int]:
        """The streams to look at for new jobs and how many to take: none while draining or full;
        while a batch runs, only its model's stream."""
        free = self.scheduler.free_slots()
        if self.draining or free == 0:
            return [], 0
        group = self.scheduler.group()
        return ([group[0]] if isinstance(group, tuple) else list(self.engines)), free

    # -- admitting and stepping -------------------------------------------------------------------

    def _admit(self) -> None:
        # A job whose adapters are loading may yet join: no stream counts as drained meanwhile.
        drained = () if self.adapters.waiting else self.intake.drained
        decision = self.scheduler.decide(time.time(), self.draining, drained)
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
        self.starts.send(jobs)  # answered while they are prepared and take their first step
        for job in jobs:
            assert job.request is not None
            if self.settings.test_faults:
                faults.inject(job.request.prompt, job.id, job.lease.deliveries, self.settings.stall_timeout_s)
            job.started = time.time()
            self.metrics.queue_wait_seconds.observe(max(0.0, job.started - job.lease.created))
            try:
                member = job.member  # prepared while its claim was on the way (intake.py)
                if member is None:
                    loras = self.adapters.get(job.lease.model, job.request.loras)
                    refiner = self.engines.get(job.request.refiner.model) if job.request.refiner else None
                    member, _tokens = engine.prepare(job.request, job.id, loras=loras, refiner=refiner)
                job.member = None  # the batch holds it now
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
            self._apply_starts()
            self.metrics.busy(0.0)
            return
        active = sum(1 for m in batch.members.values() if not m.done)
        started = time.perf_counter()
        try:
            stepped = stepping.step(batch)  # a member that fails alone fails alone
        except stepping.DeviceLost as e:
            log.critical("the device is lost (%s): exiting, so that other workers take the jobs", e)
            os._exit(3)
        not_started = self._apply_starts()  # before anything of theirs is published
        for key, error in stepped.failed.items():
            if job := self.ledger.get(str(key)):
                self.ledger.leave(job, Outcome.raised(error, "denoising failed: "))
        finished = [m for m in stepped.finished if str(m.key) not in not_started]
        elapsed = time.perf_counter() - started
        if active:
            self.metrics.batch_size.observe(active)
            self.metrics.step_seconds.observe(elapsed)
            adapters = {a.uid for m in batch.members.values() for a, _ in m.loras}
            self.metrics.lora_adapters.observe(len(adapters))
            previews.publish(self.queue, self.engines, list(batch.members.values()), self.ledger.get)
        # A round trip that has come back: who it found cancelled or superseded leaves now (finished or
        # not); the entries it read are taken once this step's results are out (taking them can raise).
        answer = self.progress.poll()
        left = self._stopped(answer)
        done = [m for m in finished if str(m.key) not in left]
        if done:
            decode_start = time.perf_counter()
            self._publish(done)
            elapsed += time.perf_counter() - decode_start
        self.metrics.busy(elapsed)
        self._take(answer)
        self._send_progress(batch)

    def _apply_starts(self) -> set[str]:
        """Jobs admitted this iteration that Redis did not mark running leave (handed back when the
        round trip failed: whether it ran is unknown); returns them."""
        left = set()
        for job, status in self.starts.collect():
            if status == JobStatus.RUNNING.value or self.ledger.get(job.id) is not job:
                continue
            log.info("job %s not started: %s", job.id, status or "redis unavailable")
            self.ledger.leave(job, Outcome.no_longer_ours(status) if status else Outcome.handed_back())
            left.add(job.id)
        return left

    def _send_progress(self, batch: DenoisingBatch) -> None:
        """The next round trip, when one is due: the members' steps, and a read while there is room."""
        models, free = self._read_target()
        if not len(batch) or not self.progress.due(time.monotonic(), reading=free > 0):
            return
        members = list(batch.members.values())
        sent = [(str(m.key), self.ledger.jobs[str(m.key)].lease) for m in members]
        items = [(lease, m.steps_done, m.total_steps) for (_, lease), m in zip(sent, members, strict=True)]
        self.progress.send(items, sent, models, free)

    def _collect_progress(self) -> None:
        """Applies the round trip out, if any, once back."""
        answer = self.progress.collect()
        self._stopped(answer)
        self._take(answer)

    def _take(self, answer: Answer) -> None:
        if answer.models:
            self.intake.took(answer.models, answer.count, answer.entries)

    def _stopped(self, answer: Answer) -> set[str]:
        """Jobs no longer `running` (cancelled, superseded) leave the batch; returns them."""
        left = set()
        for key, lease in answer.sent:
            status = answer.statuses.get(lease.job_id, JobStatus.RUNNING.value)
            job = self.ledger.get(key)
            if status == JobStatus.RUNNING.value or job is None or job.lease != lease:
                continue  # still running, or already gone
            log.info("job %s leaves the batch: %s", key, status)
            self.ledger.leave(job, Outcome.no_longer_ours(status))
            left.add(key)
        return left

    def _publish(self, members: list[Member]) -> None:
        """Decodes finished members together (one by one if that fails); each result goes out at once,
        with the member's last progress event."""
        jobs = [self.ledger.jobs[str(m.key)] for m in members]
        engine = self.engines[jobs[0].lease.model]
        try:
            images = engine.decode_members(members)  # each by its own decoder (a refiner's after a hand-off)
        except Exception as e:
            if len(jobs) > 1:
                log.warning("decoding %d images failed (%s): decoding them one by one", len(jobs), e)
                for member in members:
                    self._publish([member])
                return
            log.exception("decoding failed")
            self.ledger.leave(jobs[0], Outcome.raised(e, "decoding failed: "))
            return
        for job, member, image in zip(jobs, members, images, strict=True):
            assert job.request is not None
            png = png_bytes(image, job.request.parameters())
            self.ledger.leave(job, Outcome.succeeded(png, (member.steps_done, member.total_steps)))
