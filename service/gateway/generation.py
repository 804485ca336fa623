"""What both front ends do with a generation request: validate, enqueue one job per image, wait for the
jobs to end, collect the PNGs. HTTP (`routes_*.py`) and gRPC (`grpc_server.py`) only translate.

A request for n images is n jobs with seeds seed .. seed + n - 1, enqueued together or not at all.
Its `id` is the first job's id; `job_ids` lists all n, each followed on its own (status, events,
cancel, result), so grouping needs no state of its own in Redis.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from ..ldm.request import SAMPLERS, GenerationRequest, RequestError, plan
from ..ldm.request_sdxl import Refiner, check_refiner
from ..queue import keys
from ..queue.states import JobState, JobStatus, Webhook
from ..settings import GatewaySettings
from .auth import ApiKeys
from .catalog import Catalog, ModelInfo
from .errors import (
    GatewayError,
    InvalidField,
    JobCancelled,
    JobExpired,
    JobFailed,
    NotFound,
    QueueBytesFull,
    QueueFull,
    Unauthenticated,
    Unavailable,
    UnknownLora,
    WaitInterrupted,
    WaitTimeout,
)
from .job_service import JobService
from .loras import LoraCatalog
from .metrics import GatewayMetrics
from .webhooks import check_url

REJECTION_REASONS: dict[type[GatewayError], str] = {
    InvalidField: "invalid",
    NotFound: "unknown_model",
    UnknownLora: "unknown_lora",
    QueueFull: "queue_full",
    QueueBytesFull: "queue_bytes_full",
    Unauthenticated: "unauthenticated",
}


@dataclass(frozen=True)
class Submission:
    id: str  # the first job's id
    model: str
    job_ids: list[str]
    seeds: list[int]
    received: float  # time.monotonic() when the request came in
    waiting: bool = False  # its jobs push their answers for it (`JobService.answers`)


@dataclass(frozen=True)
class Image:
    job_id: str
    seed: int
    png: bytes


@dataclass(frozen=True)
class Generated:
    id: str
    model: str
    job_ids: list[str]
    images: list[Image]
    timings: dict[str, float]  # queue_ms, inference_ms, total_ms


class Gateway:
    """The state both front ends share: settings, models, the job queue, API keys, metrics."""

    def __init__(
        self, settings: GatewaySettings, catalog: Catalog, jobs: JobService, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.loras = LoraCatalog(settings.lora_dir)
        self.jobs = jobs
        self.metrics = metrics
        self.api_keys = ApiKeys(settings.api_keys)

    def authenticate(self, authorization: str | None) -> str:
        """The caller's owner id (see auth.py)."""
        try:
            return self.api_keys.owner(authorization)
        except Unauthenticated:
            self.metrics.rejected.labels("unauthenticated").inc()
            raise

    def default_model_for(self, task: str) -> str | None:
        """The first served model of a task (None: the default model, which then names its own task)."""
        return next((info.name for info in self.catalog.infos() if info.config.task == task), None)

    async def submit(
        self,
        request: GenerationRequest,
        owner: str,
        *,
        n: int = 1,
        model: str | None = None,
        idempotency_key: str = "",
        webhook: Webhook | None = None,
        waiting: bool = False,
    ) -> Submission:
        """Checks the request against the model and the settings' limits, then enqueues its n images
        (one job each); refusals (422, 404, 429) are counted by reason, nothing enqueued. `waiting`:
        the caller will wait for the images (`wait_for_images`)."""
        received = time.monotonic()
        name = self.catalog.default if model is None else model
        try:
            # A refusal that stands answers before anything is planned (the request's jobs count as on
            # their way to the script until it answers); a retry with an idempotency key may be of one
            # that was accepted: the script answers it its ids.
            with nullcontext() if idempotency_key else self.jobs.admission.reserve(name, n):
                info = self.catalog.get(name)
                if info is None:
                    raise NotFound(f"model {name!r} is not served here; see /v1/models")
                try:
                    requests = plan(request, n, info.config, self.settings.limits())
                except RequestError as e:
                    raise InvalidField(e.field, e.message) from None
                if request.loras:
                    self.loras.check(request.loras, info)
                if webhook is not None:
                    if not self.settings.webhook_secret.get_secret_value():
                        raise InvalidField(
                            "webhook", "webhooks are off here (no LDM_WEBHOOK_SECRET to sign them)"
                        )
                    await check_url(webhook.url, self.settings.webhook_allow)
                if request.refiner is not None:
                    await self._check_refiner(info, request.refiner)
                job_ids, replayed = await self.jobs.submit(
                    name, requests, owner, idempotency_key, webhook, waiting
                )
        except (InvalidField, NotFound, UnknownLora, QueueFull, QueueBytesFull) as e:
            self.metrics.rejected.labels(REJECTION_REASONS[type(e)]).inc()
            raise
        if replayed:  # the same Idempotency-Key: the first call's jobs, with the seeds they were given
            return Submission(job_ids[0], name, job_ids, await self.jobs.seeds(job_ids), received)
        self.metrics.submitted.labels(name).inc(len(job_ids))
        seeds = [int(r.seed or 0) for r in requests]
        return Submission(job_ids[0], name, job_ids, seeds, received, waiting)

    async def _check_refiner(self, base: ModelInfo, refiner: Refiner) -> None:
        """An SDXL hand-off runs on one worker holding both models: 404 for a refiner not served here,
        422 for a model that is no refiner, or when the base's live workers all lack it. While no
        worker serves the base, the job is accepted (workers may be scaling from zero); a worker
        without the refiner then fails it, naming the model."""
        found = self.catalog.get(refiner.model)
        if found is None:
            raise NotFound(f"refiner model {refiner.model!r} is not served here; see /v1/models")
        try:
            check_refiner(refiner, base.config, found.config)
        except RequestError as e:
            raise InvalidField(e.field, e.message) from None
        serving = [models for models in await self.jobs.models_by_worker() if base.name in models]
        if serving and not any(refiner.model in models for models in serving):
            raise InvalidField(
                "refiner", f"no live worker serves {refiner.model!r} together with {base.name!r}"
            )

    def invalid(self, e: RequestError) -> InvalidField:
        """A request an adapter could not map (a bad field), counted as refused."""
        self.metrics.rejected.labels(REJECTION_REASONS[InvalidField]).inc()
        return InvalidField(e.field, e.message)

    async def wait_for_images(
        self, submission: Submission, timeout_s: float | None = None, *, cancelled_ok: bool = False
    ) -> Generated:
        """Waits for the submission's jobs and collects their images; WaitTimeout (the jobs go on),
        JobCancelled (unless `cancelled_ok`: cancelled jobs are left out), JobExpired or JobFailed
        otherwise."""
        timeout = self.settings.request_timeout_s
        timeout = timeout if timeout_s is None else min(timeout, timeout_s)
        remaining = timeout - (time.monotonic() - submission.received)
        ids = submission.job_ids
        try:
            outcomes = None
            if remaining > 0 and submission.waiting:
                outcomes = await self.jobs.waiting.answers(ids, remaining)
            elif remaining > 0 and await self.jobs.waiting.wait(ids, remaining):
                outcomes = await self.jobs.outcomes(ids)
            if outcomes is None:
                raise WaitTimeout(
                    f"no result within {timeout:g} s; the job goes on: follow /v1/jobs/{submission.id}", ids
                )
            return self.generated(submission, outcomes, cancelled_ok=cancelled_ok)
        except Unavailable as e:  # the jobs were accepted and go on: never answer without their ids
            raise WaitInterrupted(
                f"{e.message}; the accepted jobs go on: follow /v1/jobs/{submission.id}", ids
            ) from None

    async def collect(self, submission: Submission, *, cancelled_ok: bool = False) -> Generated:
        """The images of a submission whose jobs have ended, read from their records."""
        outcomes = await self.jobs.outcomes(submission.job_ids)
        return self.generated(submission, outcomes, cancelled_ok=cancelled_ok)

    def generated(
        self,
        submission: Submission,
        outcomes: list[tuple[JobState | None, bytes | None]],
        *,
        cancelled_ok: bool = False,
    ) -> Generated:
        states = [state for state, _ in outcomes]
        images = []
        for job_id, seed, (state, png) in zip(submission.job_ids, submission.seeds, outcomes, strict=True):
            if state is None:
                raise JobFailed(f"job {job_id} expired from the queue before its result was read", [job_id])
            if cancelled_ok and state.status == JobStatus.CANCELLED:
                continue
            check_succeeded(state)
            if png is None:
                raise JobFailed(f"the result of job {job_id} has expired", [job_id])
            images.append(Image(job_id, seed, png))
        done = [s for s in states if s is not None]
        waited = time.monotonic() - submission.received
        self.metrics.wait_seconds.labels(submission.model).observe(waited)
        timings = {
            "queue_ms": max(((s.started or s.created) - s.created) for s in done) * 1000,
            "inference_ms": max(((s.finished or 0) - (s.started or 0)) for s in done) * 1000,
            "total_ms": waited * 1000,
        }
        return Generated(submission.id, submission.model, submission.job_ids, images, timings)

    async def models(self) -> list[dict[str, Any]]:
        """The models served, as /v1/models and ListModels give them."""
        live = await self.jobs.workers_by_model()
        models = []
        for info in self.catalog.infos():
            config = info.config
            models.append(
                {
                    "name": info.name,
                    "default": info.name == self.catalog.default,
                    "family": config.family,
                    "width": config.sample_size,
                    "height": config.sample_size,
                    "size_multiple": config.downsample_factor,
                    "default_steps": config.default_steps,
                    "default_guidance_scale": config.default_guidance,
                    "default_sampler": config.default_sampler,
                    "samplers": list(SAMPLERS),
                    "inpainting": config.is_inpainting,
                    "refiner": config.is_refiner,
                    "task": config.task,
                    "live_workers": live.get(info.name, 0),
                    "source": info.source,
                }
            )
        return models

    def lora_list(self) -> list[dict[str, Any]]:
        """The adapters in the LoRA directory, as /v1/loras and ListLoras give them."""
        return [dataclasses.asdict(info) for info in self.loras.available()]

    async def owned_job(self, job_id: str, owner: str) -> JobState:
        """The job, if it exists and the caller may see it; NotFound otherwise (the same for both)."""
        state = await self.jobs.get(job_id) if keys.JOB_ID.match(job_id) else None
        if state is None or not self.api_keys.may_see(owner, state.owner):
            raise NotFound(f"no job {job_id!r}")
        return state

    async def result(self, state: JobState) -> Image | None:
        """The image of a succeeded job (with the seed it was drawn with), None until then or once expired."""
        if state.status != JobStatus.SUCCEEDED or (png := await self.jobs.result(state.id)) is None:
            return None
        request = await self.jobs.request(state.id)
        seed = request.seed if request is not None and request.seed is not None else 0
        return Image(state.id, seed, png)


def check_succeeded(state: JobState) -> None:
    if state.status == JobStatus.SUCCEEDED:
        return
    ids = [state.id]
    if state.status == JobStatus.CANCELLED:
        raise JobCancelled(f"job {state.id} was cancelled", ids)
    if state.status == JobStatus.EXPIRED:
        raise JobExpired(f"job {state.id} expired before a worker started it", ids)
    if state.status == JobStatus.FAILED:
        raise JobFailed(f"job {state.id} failed: {state.error or 'unknown error'}", ids)
    raise JobFailed(f"job {state.id} has not ended ({state.status})", ids)
