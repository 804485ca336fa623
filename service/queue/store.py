"""The job store, the client side of the protocol: enqueue, status, result, events, cancel.
The gateway and the tests use it; the worker's side lives in `delivery.py`."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..ldm.request import GenerationRequest
from . import keys
from .scripts import SCRIPTS
from .states import JobState, JobStatus

if TYPE_CHECKING:
    from ..settings import QueueSettings

log = logging.getLogger(__name__)


class BacklogFull(Exception):
    """The model's backlog is at its bound: refuse (HTTP 429 / RESOURCE_EXHAUSTED), retry later."""

    def __init__(self, model: str, backlog: int) -> None:
        super().__init__(f"the queue of model {model!r} is full ({backlog} jobs waiting or running)")
        self.model = model
        self.backlog = backlog


def connect(url: str, socket_timeout_s: float = 10.0) -> redis.Redis:
    """A client that retries a command on a dropped connection, with exponential backoff; callers
    still see ConnectionError while Redis stays down, and try again later."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


def text(value: bytes | str | None) -> str:
    """Redis replies are bytes (results are binary); protocol fields are UTF-8 text."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def backlog(client: redis.Redis, model: str) -> int:
    """Jobs of a model queued or held by a worker (acknowledged entries are deleted from the stream)."""
    return int(client.xlen(keys.jobs(model)))


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        result_ttl_s: int = 3600,
        max_backlog: int = 1000,
        job_timeout_s: float = 600,
    ) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.max_backlog = max_backlog
        self.job_timeout_s = job_timeout_s
        self._enqueue = client.register_script(SCRIPTS["enqueue"])
        self._cancel = client.register_script(SCRIPTS["cancel"])

    @classmethod
    def from_settings(cls, settings: QueueSettings) -> JobStore:
        return cls(
            connect(settings.redis_url),
            result_ttl_s=settings.result_ttl_s,
            max_backlog=settings.max_backlog,
            job_timeout_s=settings.job_timeout_s,
        )

    def enqueue(
        self,
        model: str,
        request: GenerationRequest,
        *,
        owner: str = "",
        timeout_s: float | None = None,
        job_id: str | None = None,
    ) -> str:
        """Checks the backlog, adds the job to the model's stream and creates its hash, atomically;
        returns the job id. The request carries its seed (`request.resolve` drew it), so every attempt
        draws the same image. Retrying with the same `job_id` does not add it twice."""
        if not keys.MODEL_NAME.match(model):
            raise ValueError(f"invalid model name {model!r}")
        if request.seed is None:
            raise ValueError("the request has no seed: resolve it (service.ldm.request.plan) first")
        job_id = job_id or uuid.uuid4().hex
        if not keys.JOB_ID.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        timeout = self.job_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError("timeout_s must be positive")
        now = time.time()
        ttl = int(timeout + self.result_ttl_s) + 1
        reply = self._enqueue(
            keys=[keys.jobs(model), keys.job(job_id), keys.events(job_id)],
            args=[job_id, model, owner, request.to_json(), now, now + timeout, self.max_backlog, ttl],
        )
        outcome = text(reply[0])
        if outcome == "full":
            raise BacklogFull(model, int(reply[1]))
        return job_id

    def get(self, job_id: str) -> JobState | None:
        fields = self.redis.hgetall(keys.job(job_id))
        if not fields:
            return None
        values = {text(k): text(v) for k, v in fields.items() if text(k) not in ("spec", "entry")}
        return JobState.model_validate({k: v for k, v in values.items() if v != ""})

    def request(self, job_id: str) -> GenerationRequest | None:
        """What the job draws (its spec)."""
        raw = self.redis.hget(keys.job(job_id), "spec")
        return None if raw is None else GenerationRequest.from_json(raw)

    def result(self, job_id: str) -> bytes | None:
        """The PNG of a succeeded job, until its TTL runs out."""
        data = self.redis.get(keys.result(job_id))
        assert data is None or isinstance(data, bytes)
        return data

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancels a queued or running job (a running one leaves its batch at the next step boundary).
        Returns the status the job ends in, or None if there is no such job."""
        model = self.redis.hget(keys.job(job_id), "model")
        if model is None:
            return None
        reply = text(
            self._cancel(
                keys=[keys.jobs(text(model)), keys.job(job_id), keys.events(job_id)],
                args=[keys.GROUP, time.time(), self.result_ttl_s],
            )
        )
        if reply == "missing":
            return None
        return JobStatus.CANCELLED if reply == "ok" else JobStatus(reply)

    def events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, dict[str, str]]]:
        """Events after `after` (an event id; "0-0" replays from the start), waiting up to `block_ms`
        for the first one. Types: queued, running, progress (step, steps), then a terminal status."""
        reply: Any = self.redis.xread({keys.events(job_id): after}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, str]]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append((text(entry_id), {text(k): text(v) for k, v in fields.items()}))
        return out

    def backlog(self, model: str) -> int:
        return backlog(self.redis, model)

    def dead_letters(self, model: str, count: int = 100) -> list[dict[str, str]]:
        entries = cast(Any, self.redis.xrange(keys.dead(model), count=count))
        return [{text(k): text(v) for k, v in fields.items()} for _id, fields in entries]

    def workers(self) -> list[str]:
        """Names of the workers whose heartbeat is live."""
        prefix = len(keys.worker(""))
        return sorted(text(k)[prefix:] for k in self.redis.scan_iter(match=keys.WORKER_PATTERN, count=100))
