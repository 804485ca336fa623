"""From stream entries to jobs the scheduler may admit: claim each entry (its attempt number, or
dead-lettering), resolve its request against the model (an invalid one fails here, alone), load its
LoRA adapters off the loop if they are not in memory, then offer it to the scheduler.

A new entry whose spec rides in it (a small one, `INLINE_SPEC_BYTES`) is resolved and prepared (text
encoded, noise drawn) while its claim is on its way to Redis and back (`WorkerQueue.claim_later`: sent
first, its answer read after): the claim's round trip, a write Redis fsyncs before it answers, no
longer comes before the preparation. What the claim answers decides, as always: a job it does not give this
worker (cancelled meanwhile, dead-lettered) is dropped with its prepared member; one whose spec is
not the entry's (never, but the hash is the authority) is prepared again at admission.

It also remembers which streams the last read found empty (`drained`): a read of `count` entries
that got fewer leaves nothing behind, so a lone job from there has no batch-mate to wait for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ..ldm.batch import Member
from ..ldm.engine import Engine
from ..ldm.request import ResolvedRequest
from ..queue.delivery import Entry, Lease, WorkerQueue
from ..queue.inputs import request_from
from ..queue.states import JobStatus
from .adapters import Adapters
from .ledger import Job, Ledger, Outcome
from .metrics import WorkerMetrics
from .scheduler import Candidate, Scheduler

log = logging.getLogger(__name__)


class Intake:
    def __init__(
        self,
        queue: WorkerQueue,
        engines: dict[str, Engine],
        ledger: Ledger,
        scheduler: Scheduler,
        adapters: Adapters,
        metrics: WorkerMetrics,
    ) -> None:
        self.queue = queue
        self.engines = engines
        self.ledger = ledger
        self.scheduler = scheduler
        self.adapters = adapters
        self.metrics = metrics
        self.drained: set[str] = set()  # models whose stream held nothing more at the last read

    def took(self, models: Sequence[str], count: int, entries: list[Entry]) -> None:
        """Takes what a read of `count` entries per stream got; a stream that gave fewer holds nothing
        more for now."""
        for model in models:
            if sum(e.model == model for e in entries) < count:
                self.drained.add(model)
            else:
                self.drained.discard(model)
        self.take(entries, reclaimed=False)

    def reclaim(self, models: list[str], free: int, idle_ms: int) -> None:
        """Takes idle deliveries one at a time: a reclaimed job may be a suspect, which runs alone."""
        taken = 0
        for model in models:
            while taken < free and self.scheduler.free_slots() > 0:
                entries = self.queue.reclaim(model, idle_ms, 1)
                if not entries:
                    break
                taken += len(entries)
                self.take(entries, reclaimed=True)

    def take(self, entries: list[Entry], reclaimed: bool) -> None:
        if not entries:
            return
        if reclaimed:
            self.metrics.reclaimed.inc(len(entries))
        early: dict[str, tuple[ResolvedRequest, Member]] = {}
        if not reclaimed and any(e.spec for e in entries):
            on_the_way = self.queue.claim_later(entries)
            for e in entries:
                if e.spec and (prepared := self._prepare(e)) is not None:
                    early[e.job_id] = prepared
            answers = on_the_way()
        else:
            answers = self.queue.claim(entries)
        for claimed in answers:
            if claimed.outcome == "dead":
                log.warning("job %s: %s", claimed.entry.job_id, claimed.detail)
                self.metrics.dead_lettered.inc()
                self.metrics.jobs.labels(JobStatus.FAILED.value).inc()
            elif claimed.lease is None:
                log.debug("job %s: nothing to run (%s)", claimed.entry.job_id, claimed.outcome)
            else:
                same = claimed.entry.spec == claimed.lease.spec_json  # the hash's spec decides
                self._accept(claimed.lease, early.get(claimed.entry.job_id) if same else None)

    def _prepare(self, entry: Entry) -> tuple[ResolvedRequest, Member] | None:
        """The entry's request resolved and its member prepared, before the claim is known; None for
        one that needs more (adapters, a refiner) or fails (the claimed job then fails as usual)."""
        engine = self.engines[entry.model]
        try:
            request = engine.resolve(request_from(entry.spec, {}))
            if request.loras or request.refiner is not None:
                return None
            member, _tokens = engine.prepare(request, entry.job_id)
        except Exception:
            return None
        return request, member

    def _accept(self, lease: Lease, prepared: tuple[ResolvedRequest, Member] | None = None) -> None:
        """Resolves the request against the model; an invalid one fails here, alone."""
        engine = self.engines[lease.model]
        if prepared is not None:
            job = Job(lease, prepared[0], member=prepared[1])
            self.ledger.hold(job)
            self._offer(job)
            return
        try:
            request = engine.resolve(request_from(lease.spec_json, lease.inputs))
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
            Candidate(job.id, group, h * w, lease.deadline, time.time(), solo, lease.started, lease.model)
        )

    def offer_loaded(self) -> None:
        """Jobs whose adapters have been loaded meanwhile wait to be admitted; a failed load fails its job."""
        for loaded in self.adapters.done():
            job = loaded.key
            if isinstance(job, Job) and self.ledger.get(job.id) is job:  # not left meanwhile
                if loaded.error:
                    self.ledger.leave(job, Outcome.failed(loaded.error))
                else:
                    self._offer(job)
