"""The jobs a worker holds, from claim until they leave, and the one way out: `leave(job, outcome)`.

A job leaves in one of three ways (`Outcome`): with a terminal status to store (succeeded, failed,
expired), handed back to the queue (draining), or gone (no longer this worker's: a newer attempt holds
it, or someone else ended it, e.g. cancelled). Leaving detaches the job from the batch and the
scheduler at once; what must reach Redis (outcomes, hand-backs) waits in an outbox until `flush()`
sends it, so results survive a Redis outage and a job's delivery stays this worker's (renewed by the
keeper) until its outcome is stored. The keeper thread reads the held leases and reports superseded
ones; everything it touches is behind one lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from ..ldm.batch import Member
from ..ldm.request import ResolvedRequest, first_error
from ..queue.delivery import Lease, WorkerQueue
from ..queue.states import JobStatus
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)
STALE = "stale"


@dataclass
class Job:
    lease: Lease
    request: ResolvedRequest | None  # None when the request did not resolve (the job fails at once)
    started: float = 0.0
    member: Member | None = None  # prepared while its claim was on the way (intake.py), else at admission

    @property
    def id(self) -> str:
        return self.lease.job_id


@dataclass(frozen=True)
class Outcome:
    """How a job leaves: `store` a terminal status (with the PNG or the error), `hand_back`, or
    `gone` (why it is no longer ours: "stale", or the status someone else ended it in)."""

    store: JobStatus | None = None
    png: bytes = b""
    error: str = ""
    hand_back: bool = False
    gone: str = ""
    progress: tuple[int, int] | None = None  # (step, steps): the last progress event, sent with the result

    @classmethod
    def succeeded(cls, png: bytes, progress: tuple[int, int] | None = None) -> Outcome:
        return cls(JobStatus.SUCCEEDED, png=png, progress=progress)

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls(JobStatus.FAILED, error=error)

    @classmethod
    def raised(cls, e: Exception, context: str = "") -> Outcome:
        """Failed with an exception's message (a bad field's message names the field)."""
        message = str(first_error(e)) if isinstance(e, ValidationError) else str(e) or type(e).__name__
        return cls.failed(context + message)

    @classmethod
    def expired(cls, error: str) -> Outcome:
        return cls(JobStatus.EXPIRED, error=error)

    @classmethod
    def handed_back(cls) -> Outcome:
        return cls(hand_back=True)

    @classmethod
    def no_longer_ours(cls, reason: str) -> Outcome:
        return cls(gone=reason)


class Ledger:
    def __init__(self, queue: WorkerQueue, metrics: WorkerMetrics, detach: Callable[[str], None]) -> None:
        self.queue = queue
        self.metrics = metrics
        self._detach = detach  # takes a job out of the running batch and the scheduler
        self.jobs: dict[str, Job] = {}
        self._outbox: deque[tuple[Job, Outcome]] = deque()
        self._lock = threading.Lock()
        self._superseded: set[Lease] = set()

    def __len__(self) -> int:
        return len(self.jobs)

    def hold(self, job: Job) -> None:
        with self._lock:
            old = self.jobs.get(job.id)
        if old is not None:  # our own delivery went idle (a long outage) and we took it again
            self.leave(old, Outcome.no_longer_ours(STALE))
        with self._lock:
            self.jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def leave(self, job: Job, outcome: Outcome) -> None:
        """The one way out: detach the job now; store its outcome or hand it back at the next flush."""
        self._detach(job.id)
        if outcome.store is not None or outcome.hand_back:
            self._outbox.append((job, outcome))
            return
        self._release(job)
        if outcome.gone == STALE:
            self.metrics.stale.inc()
        elif outcome.gone == JobStatus.CANCELLED.value:
            self.metrics.jobs.labels(outcome.gone).inc()

    def leave_all(self, jobs: list[Job], outcome: Outcome) -> None:
        for job in jobs:
            self.leave(job, outcome)

    def flush(self) -> None:
        """Sends the outbox in order: outcomes one by one, hand-backs in one round trip. A Redis error
        leaves what was not sent for the next flush."""
        while self._outbox:
            job, outcome = self._outbox[0]
            if outcome.hand_back:
                batch = []
                while self._outbox and self._outbox[0][1].hand_back:
                    batch.append(self._outbox[0][0])
                    self._outbox.popleft()
                self._hand_back(batch)
                continue
            assert outcome.store is not None
            reply = self.queue.complete(
                job.lease, outcome.store, png=outcome.png, error=outcome.error, progress=outcome.progress
            )
            self._outbox.popleft()
            self._release(job)
            self._stored(job, outcome, reply)

    def _hand_back(self, jobs: list[Job]) -> None:
        try:
            replies = self.queue.hand_back([j.lease for j in jobs])
        except Exception:
            self._outbox.extendleft((job, Outcome.handed_back()) for job in reversed(jobs))
            raise
        for job, reply in zip(jobs, replies, strict=True):
            self._release(job)
            if reply == "ok":
                self.metrics.handed_back.inc()

    def _stored(self, job: Job, outcome: Outcome, reply: str) -> None:
        assert outcome.store is not None
        status = outcome.store
        if reply == "ok":
            self.metrics.jobs.labels(status.value).inc()
            if status == JobStatus.SUCCEEDED:
                self.metrics.images.inc()
                self.metrics.observe_success(job.started, job.lease.created)
            log.info("job %s %s%s", job.id, status.value, f": {outcome.error}" * bool(outcome.error))
        elif reply == STALE:
            self.metrics.stale.inc()
            log.warning("job %s: outcome refused, a newer attempt holds the job", job.id)
        else:
            log.info("job %s was already %s", job.id, reply)

    def _release(self, job: Job) -> None:
        with self._lock:
            if self.jobs.get(job.id) is job:  # not a newer attempt of the same job
                del self.jobs[job.id]

    # -- for the keeper thread --------------------------------------------------------------------

    def leases(self) -> list[Lease]:
        with self._lock:
            return [job.lease for job in self.jobs.values()]

    def supersede(self, leases: set[Lease]) -> None:
        """The keeper found these deliveries taken over by another worker."""
        with self._lock:
            self._superseded |= leases

    def drop_superseded(self) -> None:
        """Lets the superseded jobs go (unless their outcome is already waiting: it will be refused)."""
        with self._lock:
            superseded, self._superseded = self._superseded, set()
        waiting = {id(job) for job, _ in self._outbox}
        for lease in superseded:
            job = self.jobs.get(lease.job_id)
            if job is None or job.lease != lease or id(job) in waiting:
                continue  # gone already, a newer attempt of ours, or its outcome will be refused
            log.warning("job %s was reclaimed by another worker: dropping it", job.id)
            self.leave(job, Outcome.no_longer_ours(STALE))
