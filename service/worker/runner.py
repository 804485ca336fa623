"""The worker loop: claim what can be admitted, admit at step boundaries, step the batch, publish.

One iteration is one denoising step of the running batch (or one wait for work when idle):

1. store the outcomes waiting in the outbox (results survive a Redis outage there);
2. claim: reclaim idle deliveries (dead or draining workers'), then read new entries, never more
   than the scheduler has free slots for, so what this worker cannot take stays with idle ones
   (while a batch runs, that read rides in the previous step's progress round trip);
3. admit: the scheduler picks who joins; expired jobs are ended, the others started and prepared
   (an invalid request fails alone);
4. step the batch once, publish progress (which reports cancelled and superseded jobs: they leave
   at the next boundary), decode the finished members together and store each result, fenced by
   its attempt. Progress (and the read of step 2) goes out on a thread of its own while the next
   step runs, so a busy worker's Redis round trips stay off the denoising path; it is sent in line
   when members finish, so their last progress event comes before their result.

A keeper thread renews this worker's deliveries and heartbeat while the loop is busy in torch, but
only while the loop moves: a loop that has not iterated for stall_timeout_s (a hung device call, a
deadlock) is stuck, /healthz says so (503, for the liveness probe), and its jobs and heartbeat are
left to expire so that other workers take the jobs over.
SIGTERM drains: stop claiming, hand back what waits, finish the batch within the grace period, hand
back the rest, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType

import redis
import torch

from ..ldm.batch import DenoisingBatch
from ..ldm.engine import Engine, ResolvedRequest
from ..ldm.images import png_bytes
from ..queue.delivery import Entry, Lease, WorkerQueue
from ..queue.jobs import connect
from ..queue.spec import JobSpec, JobStatus
from ..settings import WorkerSettings
from .metrics import WorkerMetrics
from .requests import error_message, generation_request
from .scheduler import Candidate, Scheduler

log = logging.getLogger(__name__)

CRASH_PROMPT = "__crash_worker__"  # with LDM_TEST_FAULTS=1 only: the worker dies when it admits this job
# With LDM_TEST_FAULTS=1 only: the loop hangs for 4 x stall_timeout_s when it admits this job on its
# first delivery (as a hung device call would), then goes on.
STALL_PROMPT = "__stall_worker__"
IDLE_BLOCK_MS = 500  # an idle worker waits this long on the streams between reclaim scans
RECLAIM_POLL_S = 0.5
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


@dataclass
class Job:
    lease: Lease
    request: ResolvedRequest | None  # None when the spec did not resolve (the job fails at once)
    started: float = 0.0

    @property
    def id(self) -> str:
        return self.lease.job_id


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: JobStatus
    png: bytes = b""
    error: str = ""


class Worker:
    def __init__(self, settings: WorkerSettings, engines: dict[str, Engine], metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.engines = engines
        self.metrics = metrics
        self.name = settings.name
        self.queue = self._queue()
        self.scheduler = Scheduler(settings.max_batch, settings.pixel_budget, settings.max_wait_ms / 1000)
        self.jobs: dict[str, Job] = {}  # every job held: waiting, running or in the outbox
        self.outbox: deque[Outcome] = deque()
        self.batch: DenoisingBatch | None = None
        self.draining = False
        self._drain_deadline: float | None = None
        self._wait_s: float | None = None
        self._next_reclaim = 0.0
        self._read_ahead = False  # the last step's round trip also read new entries
        # Progress goes out on a thread of its own, during the next step (see _step).
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self._io_queue = self._queue()
        self._in_flight: tuple[Future[tuple[dict[str, str], list[Entry]]], list[tuple[str, Lease]]] | None = (
            None
        )
        self._lock = threading.Lock()
        self._superseded: set[Lease] = set()
        self._stop = threading.Event()
        self._started = time.time()
        self._beat = time.monotonic()  # the loop's last iteration

    def _queue(self) -> WorkerQueue:
        s = self.settings
        return WorkerQueue(
            connect(s.redis_url),
            self.name,
            list(self.engines),
            max_deliveries=s.max_deliveries,
            result_ttl_s=s.result_ttl_s,
        )

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        keeper = threading.Thread(target=self._keep, name="keeper", daemon=True)
        keeper.start()
        log.info("worker %s serving %s", self.name, ", ".join(self.engines))
        failures = 0
        groups_ready = False
        while True:
            self._beat = time.monotonic()
            self.metrics.loop_timestamp.set(time.time())
            try:
                if not groups_ready:
                    self.queue.ensure_groups()
                    groups_ready = True
                if self.draining and self._drain():
                    break
                self._flush()
                self._drop_superseded()
                self._claim()
                self._admit()
                self._step()
                self._flush()
                failures = 0
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning("consumer group missing (Redis lost its data?): creating it again")
                groups_ready = False
            except REDIS_ERRORS as e:
                failures += 1
                self.metrics.redis_errors.inc()
                delay = min(5.0, 0.1 * 2 ** min(failures, 6)) * (0.5 + random.random() / 2)
                log.warning("redis unavailable (%s); retrying in %.1f s", e, delay)
                if self.draining and self._drain_deadline and time.monotonic() > self._drain_deadline:
                    log.warning("drain deadline passed without redis: leaving the rest to be reclaimed")
                    break
                time.sleep(delay)
        self._stop.set()
        keeper.join(timeout=5)
        self._io.shutdown(wait=True)
        with contextlib.suppress(*REDIS_ERRORS):
            self.queue.sign_off()
        log.info("worker %s stopped", self.name)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.draining:
            self.draining = True
            self._drain_deadline = time.monotonic() + self.settings.drain_grace_s

    def _drain(self) -> bool:
        """One drain iteration; True when the worker may exit."""
        self._settle()
        waiting = [self.jobs[c.key] for c in self.scheduler.take_waiting()]
        if waiting:
            log.info("draining: handing back %d waiting jobs", len(waiting))
            self._hand_back(waiting)
        assert self._drain_deadline is not None
        late = time.monotonic() >= self._drain_deadline
        if self.batch is not None and len(self.batch) and not late:
            return False
        running = [self.jobs[key] for key in list(self.scheduler.running) if key in self.jobs]
        if running:
            log.info("drain grace over: handing back %d running jobs", len(running))
            self._hand_back(running)
        self.batch = None
        self._flush()
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
                old = self.jobs.get(claimed.lease.job_id)
                if old is not None:  # our own delivery went idle (a long outage) and we took it again
                    self._drop(old)
                self._accept(claimed.lease)

    def _accept(self, lease: Lease) -> None:
        """Resolves the spec against the model; an invalid one fails here, alone."""
        engine = self.engines[lease.model]
        try:
            request = engine.resolve(generation_request(JobSpec.model_validate_json(lease.spec_json)))
        except Exception as e:  # invalid spec, unreadable image, anything the engine refuses
            job = Job(lease, None)
            self._hold(job)
            self._end(job, JobStatus.FAILED, error=error_message(e))
            return
        f = engine.config.downsample_factor
        h, w = request.height // f, request.width // f
        self._hold(Job(lease, request))
        self.scheduler.offer(
            Candidate(
                lease.job_id, (lease.model, h, w), h * w, lease.deadline, time.time(), lease.deliveries > 1
            )
        )

    # -- admitting and stepping -------------------------------------------------------------------

    def _admit(self) -> None:
        decision = self.scheduler.decide(time.time(), self.draining)
        self._wait_s = decision.wait_s
        for c in decision.expire:
            self._end(self.jobs[c.key], JobStatus.EXPIRED, error="deadline passed before the job started")
        if not decision.admit:
            return
        jobs = [self.jobs[c.key] for c in decision.admit]
        model = jobs[0].lease.model
        engine = self.engines[model]
        if self.batch is None or not len(self.batch):
            self.batch = engine.new_batch()
        busy_start = time.perf_counter()
        for job, status in zip(jobs, self.queue.start([j.lease for j in jobs]), strict=True):
            if status != JobStatus.RUNNING.value:
                log.info("job %s not started: %s", job.id, status)
                self._forget(job, status)
                continue
            assert job.request is not None
            if self.settings.test_faults and job.request.prompt == CRASH_PROMPT:
                log.error("fault injection: crashing on job %s", job.id)
                os._exit(1)
            if self.settings.test_faults and job.request.prompt == STALL_PROMPT and job.lease.deliveries == 1:
                log.error("fault injection: the loop hangs on job %s", job.id)
                time.sleep(4 * self.settings.stall_timeout_s)
            job.started = time.time()
            self.metrics.queue_wait_seconds.observe(max(0.0, job.started - job.lease.created))
            try:
                member, _tokens = engine.prepare(job.request, job.id)
            except Exception as e:
                log.warning("job %s failed to prepare: %s", job.id, e)
                self._end(job, JobStatus.FAILED, error=error_message(e))
                continue
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
            finished = batch.step()
        except Exception as e:  # an engine failure we cannot pin on one member fails its batch
            log.exception("denoising step failed")
            self._settle()
            for key in list(batch.members):
                batch.remove(key)
                self._end(
                    self.jobs[str(key)], JobStatus.FAILED, error=f"denoising failed: {error_message(e)}"
                )
            return
        elapsed = time.perf_counter() - started
        if active:
            self.metrics.batch_size.observe(active)
            self.metrics.step_seconds.observe(elapsed)
        # The last step's progress went out while this step ran: who it found cancelled or
        # superseded leaves now (finished or not), and the jobs it read wait to be admitted.
        left = self._settle()
        finished = [m for m in finished if str(m.key) not in left]
        members = [*batch.members.values(), *finished]
        sent = [(str(m.key), self.jobs[str(m.key)].lease) for m in members]
        items = [(lease, m.steps_done, m.total_steps) for (_, lease), m in zip(sent, members, strict=True)]
        models, free = self._read_target()
        self._read_ahead = free > 0
        if not finished and len(batch):
            # Off the critical path: the round trip overlaps the next step's UNet call.
            self._in_flight = (self._io.submit(self._io_queue.progress_and_read, items, models, free), sent)
            self.metrics.busy(elapsed)
            return
        # In line when members finish (their last progress event must precede their result) and
        # when the batch empties (nothing stays in flight while the worker waits for work).
        try:
            statuses, entries = self.queue.progress_and_read(items, models, free)
        except REDIS_ERRORS as e:  # progress is best effort; results wait in the outbox
            log.warning("progress not published: %s", e)
            statuses, entries = {}, []
        left = self._apply(sent, statuses, entries)
        done = [m for m in finished if str(m.key) not in left]
        if done:
            decode_start = time.perf_counter()
            self._publish([self.jobs[str(m.key)] for m in done], [m.final_latent() for m in done])
            elapsed += time.perf_counter() - decode_start
        self.metrics.busy(elapsed)

    def _settle(self) -> set[str]:
        """Applies the progress round trip in flight, if any; returns the jobs that left."""
        if self._in_flight is None:
            return set()
        future, sent = self._in_flight
        self._in_flight = None
        try:
            statuses, entries = future.result()
        except REDIS_ERRORS as e:  # progress is best effort
            log.warning("progress not published: %s", e)
            return set()
        return self._apply(sent, statuses, entries)

    def _apply(
        self, sent: list[tuple[str, Lease]], statuses: dict[str, str], entries: list[Entry]
    ) -> set[str]:
        """Jobs no longer `running` (cancelled, superseded) leave the batch; new entries are taken."""
        left = set()
        for key, lease in sent:
            status = statuses.get(lease.job_id, JobStatus.RUNNING.value)
            job = self.jobs.get(key)
            if status == JobStatus.RUNNING.value or job is None or job.lease != lease:
                continue  # still running, or already gone
            if self.batch is not None:
                self.batch.remove(key)
            log.info("job %s leaves the batch: %s", key, status)
            self._forget(job, status)
            left.add(key)
        self._take(entries, reclaimed=False)
        return left

    def _publish(self, jobs: list[Job], latents: list[torch.Tensor]) -> None:
        """Decodes finished members together; each result goes out at once."""
        engine = self.engines[jobs[0].lease.model]
        try:
            images = engine.decode(torch.cat(latents))
        except Exception as e:
            log.exception("decoding failed")
            for job in jobs:
                self._end(job, JobStatus.FAILED, error=f"decoding failed: {error_message(e)}")
            return
        for job, image in zip(jobs, images, strict=True):
            assert job.request is not None
            self._end(job, JobStatus.SUCCEEDED, png=png_bytes(image, job.request.parameters()))

    # -- ending jobs ------------------------------------------------------------------------------

    def _end(self, job: Job, status: JobStatus, png: bytes = b"", error: str = "") -> None:
        """Queues the outcome; the delivery stays ours (renewed) until the outcome is stored."""
        self.scheduler.leave(job.id)
        self.outbox.append(Outcome(job, status, png, error))

    def _flush(self) -> None:
        while self.outbox:
            outcome = self.outbox[0]
            job = outcome.job
            reply = self.queue.finish(job.lease, outcome.status, png=outcome.png, error=outcome.error)
            self.outbox.popleft()
            self._release(job)
            if reply == "ok":
                self.metrics.jobs.labels(outcome.status.value).inc()
                if outcome.status == JobStatus.SUCCEEDED:
                    now = time.time()
                    self.metrics.images.inc()
                    self.metrics.inference_seconds.observe(max(0.0, now - job.started))
                    self.metrics.total_seconds.observe(max(0.0, now - job.lease.created))
                log.info(
                    "job %s %s%s", job.id, outcome.status.value, f": {outcome.error}" * bool(outcome.error)
                )
            elif reply == "stale":
                self.metrics.stale.inc()
                log.warning("job %s: outcome refused, a newer attempt holds the job", job.id)
            else:
                log.info("job %s was already %s", job.id, reply)

    def _forget(self, job: Job, status: str) -> None:
        """Drops a job that is no longer ours to finish (superseded, or ended by someone else)."""
        self.scheduler.leave(job.id)
        self._release(job)
        if status == "stale":
            self.metrics.stale.inc()
        elif status == JobStatus.CANCELLED.value:
            self.metrics.jobs.labels(status).inc()

    def _hand_back(self, jobs: list[Job]) -> None:
        for job in jobs:
            if self.batch is not None:
                self.batch.remove(job.id)
            self.scheduler.leave(job.id)
        replies = self.queue.hand_back([j.lease for j in jobs])
        for job, reply in zip(jobs, replies, strict=True):
            self._release(job)
            if reply == "ok":
                self.metrics.handed_back.inc()

    def _drop_superseded(self) -> None:
        with self._lock:
            superseded, self._superseded = self._superseded, set()
        for lease in superseded:
            job = self.jobs.get(lease.job_id)
            if job is None or job.lease != lease or any(o.job is job for o in self.outbox):
                continue  # gone already, a newer attempt of ours, or its outcome will be refused
            log.warning("job %s was reclaimed by another worker: dropping it", job.id)
            self._drop(job)

    def _drop(self, job: Job) -> None:
        """Drops a superseded job from the batch (if it is there) and from everything held."""
        if self.batch is not None:
            self.batch.remove(job.id)
        self._forget(job, "stale")

    def _hold(self, job: Job) -> None:
        with self._lock:
            self.jobs[job.id] = job

    def _release(self, job: Job) -> None:
        with self._lock:
            if self.jobs.get(job.id) is job:  # not a newer attempt of the same job
                del self.jobs[job.id]

    # -- the keeper thread ------------------------------------------------------------------------

    def healthy(self) -> bool:
        """False while the loop is stuck: it has not iterated for stall_timeout_s."""
        return time.monotonic() - self._beat <= self.settings.stall_timeout_s

    def _keep(self) -> None:
        """Renews this worker's deliveries and heartbeat while the loop moves, on a connection of its
        own. While the loop is stuck it renews nothing: the heartbeat expires and the deliveries go
        idle, so other workers reclaim the jobs (and fencing refuses whatever this one does later)."""
        queue = self._queue()
        interval = self.settings.reclaim_idle_ms / 1000 / 3
        stuck = False
        while not self._stop.is_set():
            if not self.healthy():
                if not stuck:
                    log.error(
                        "the worker loop has not moved for %.0f s: no longer renewing its %d jobs or the "
                        "heartbeat, so that other workers take the jobs over",
                        time.monotonic() - self._beat,
                        len(self.jobs),
                    )
                stuck = True
                self._stop.wait(interval)
                continue
            if stuck:
                log.warning("the worker loop moves again")
                stuck = False
            with self._lock:
                leases = [job.lease for job in self.jobs.values()]
            try:
                stale = queue.refresh(leases)
                if stale:
                    with self._lock:
                        self._superseded |= stale
                queue.heartbeat(self._heartbeat(len(leases)), ttl_s=interval * 3)
                for model in self.engines:
                    self.metrics.queue_backlog.labels(model).set(queue.lag(model))
            except REDIS_ERRORS as e:
                log.debug("keeper: redis unavailable (%s)", e)
            except Exception:
                log.exception("keeper failed")
            self._stop.wait(interval)

    def _heartbeat(self, held: int) -> dict[str, object]:
        s = self.settings
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "models": list(self.engines),
            "device": s.device,
            "max_batch": s.max_batch,
            "held": held,
            "draining": self.draining,
            "started": self._started,
        }
