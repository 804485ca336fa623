"""The job store, the client side of the protocol: enqueue, status, result, events, cancel.
The gateway and the tests use it; the worker's side lives in `delivery.py`."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.commands.core import Script

from ..ldm.request import GenerationRequest
from . import keys
from .connection import UNAVAILABLE_ERRORS, NotReplicated, client_for, connect, on_replica, unavailable
from .inputs import decode_inputs, request_from, shared_specs
from .scripts import SCRIPTS
from .states import JobState, JobStatus, Webhook

if TYPE_CHECKING:
    from ..settings import QueueSettings

log = logging.getLogger(__name__)
__all__ = [
    "UNAVAILABLE_ERRORS",
    "BacklogBytesFull",
    "BacklogFull",
    "JobStore",
    "backlog",
    "connect",
    "on_replica",
    "text",
    "unavailable",
]


class BacklogFull(Exception):
    """The model's backlog is at its bound: refuse (HTTP 429 / RESOURCE_EXHAUSTED), retry later."""

    def __init__(self, model: str, backlog: int) -> None:
        super().__init__(f"the queue of model {model!r} is full ({backlog} jobs waiting or running)")
        self.model = model
        self.backlog = backlog


class BacklogBytesFull(Exception):
    """The model's backlog holds its bound of bytes (specs and input images of jobs not ended):
    refuse (HTTP 503 / RESOURCE_EXHAUSTED), retry later."""

    def __init__(self, model: str, held: int, bound: int) -> None:
        super().__init__(
            f"the queue of model {model!r} holds {held} bytes of jobs not ended, its bound "
            f"(LDM_MAX_BACKLOG_BYTES = {bound})"
        )
        self.model = model
        self.held = held
        self.bound = bound


def job_state(fields: Any) -> JobState | None:
    """A job hash's fields (HGETALL's reply) as a JobState; None when there is no such hash."""
    if not fields:
        return None
    return JobState.from_hash({text(k): text(v) for k, v in fields.items()})


def text(value: bytes | str | None) -> str:
    """Redis replies are bytes (results are binary); protocol fields are UTF-8 text."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class EnqueueCall:
    model: str
    job_ids: list[str]
    keys: list[str]
    args: list[Any]
    max_bytes: int = 0
    max_backlog: int = 0

    def result(self, reply: Any) -> list[str]:
        """The job ids from the script's reply (those of the first call, for a replayed one)."""
        outcome, detail = text(reply[0]), text(reply[1])
        if outcome == "full":
            raise BacklogFull(self.model, int(detail))
        if outcome == "full_bytes":
            raise BacklogBytesFull(self.model, int(detail), self.max_bytes)
        if outcome == "exists" and detail:  # the idempotency key's first call
            return detail.split(",")
        return self.job_ids

    @staticmethod
    def backlog_after(reply: Any) -> int | None:
        """The backlog once an accepted request's jobs went in (None: not known, e.g. a replay)."""
        return int(text(reply[2])) if len(reply) > 2 and text(reply[0]) == "ok" else None


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
        max_backlog_bytes: int = 64 * 1024 * 1024,
        job_timeout_s: float = 600,
        idempotency_ttl_s: int = 24 * 3600,
        min_replicas: int = 0,
        replica_wait_ms: int = 1000,
    ) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.job_timeout_s = job_timeout_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.min_replicas = min_replicas
        self.replica_wait_ms = replica_wait_ms
        self._enqueue = client.register_script(SCRIPTS["enqueue"])
        self._cancel = client.register_script(SCRIPTS["cancel"])
        self._expire = client.register_script(SCRIPTS["expire"])
        self._recount = client.register_script(SCRIPTS["recount"])

    @classmethod
    def from_settings(cls, settings: QueueSettings) -> JobStore:
        return cls(
            client_for(settings),
            result_ttl_s=settings.result_ttl_s,
            max_backlog=settings.max_backlog,
            max_backlog_bytes=settings.max_backlog_bytes,
            job_timeout_s=settings.job_timeout_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            min_replicas=settings.redis_min_replicas,
            replica_wait_ms=settings.redis_wait_ms,
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
        """One job: `enqueue_many` of one request; returns its id."""
        ids = [job_id] if job_id is not None else None
        return self.enqueue_many(model, [request], owner=owner, timeout_s=timeout_s, job_ids=ids)[0]

    def enqueue_many(
        self,
        model: str,
        requests: list[GenerationRequest],
        *,
        owner: str = "",
        timeout_s: float | None = None,
        job_ids: list[str] | None = None,
        idempotency_key: str = "",
        webhook: Webhook | None = None,
        reply: bool = False,
    ) -> list[str]:
        """Adds one job per request to the model's stream and creates their hashes, all or none, in one
        atomic step that first checks the backlog, in jobs (BacklogFull) and in bytes (BacklogBytesFull);
        returns the job ids. Input images shared by the jobs are stored once (`inputs.py`). Each request
        carries its seed (`request.plan` drew it), so every attempt draws the same image.

        Retrying is safe: with the same `job_ids`, or the same `idempotency_key` (per owner, kept
        `idempotency_ttl_s`), nothing is added twice and the first call's ids come back. `reply`: each
        job's end is also pushed to its reply list, for a caller that waits (`keys.reply`)."""
        call = self.enqueue_call(model, requests, owner, timeout_s, job_ids, idempotency_key, webhook, reply)
        return call.result(self._replicated_call(self._enqueue, call.keys, call.args))

    def _replicated_call(self, script: Script, call_keys: list[str], args: list[Any]) -> Any:
        """Runs the script; with `min_replicas`, WAIT follows it on the same connection (WAIT counts
        its own connection's writes: sent apart, a pooled connection shared by threads could confirm
        another call's writes) and NotReplicated says when too few replicas confirmed them."""
        if not self.min_replicas:
            return script(keys=call_keys, args=args)
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(call_keys), *call_keys, *args)
            pipe.wait(self.min_replicas, self.replica_wait_ms)
            reply, acked = pipe.execute(raise_on_error=False)
            if isinstance(reply, redis.exceptions.NoScriptError) and attempt == 0:
                self.redis.script_load(script.script)  # Redis lost its script cache
                continue
            for answer in (reply, acked):
                if isinstance(answer, Exception):
                    if on_replica(answer):  # a read-only replay ran on a demoted primary: reconnect
                        self.redis.connection_pool.disconnect()
                    raise answer
            self.replicated(int(acked))
            return reply
        raise AssertionError("unreachable")

    def replicated(self, acked: int) -> None:
        if acked < self.min_replicas:
            wanted, within = self.min_replicas, self.replica_wait_ms
            raise NotReplicated(f"{acked} of {wanted} replicas confirmed the write within {within} ms")

    def enqueue_call(
        self,
        model: str,
        requests: list[GenerationRequest],
        owner: str = "",
        timeout_s: float | None = None,
        job_ids: list[str] | None = None,
        idempotency_key: str = "",
        webhook: Webhook | None = None,
        reply: bool = False,
    ) -> EnqueueCall:
        """The enqueue script's keys and arguments (for a caller with a client of its own, e.g. asyncio).
        `reply`: each job's end is also pushed to its reply list (`keys.reply`), for a request that waits."""
        if not keys.MODEL_NAME.match(model):
            raise ValueError(f"invalid model name {model!r}")
        if not requests or any(r.seed is None for r in requests):
            raise ValueError("each request needs its seed: plan it (service.ldm.request.plan) first")
        job_ids = job_ids or [uuid.uuid4().hex for _ in requests]
        if len(job_ids) != len(requests) or not all(keys.JOB_ID.match(i) for i in job_ids):
            raise ValueError(f"invalid job ids {job_ids!r}")
        timeout = self.job_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError("timeout_s must be positive")
        now = time.time()
        ttl = int(timeout + self.result_ttl_s) + 1
        specs, shared = shared_specs(requests)
        script_keys = [
            keys.jobs(model),
            keys.idempotency(owner, idempotency_key) if idempotency_key else "",
            keys.backlog_bytes(model),
            keys.inputs(job_ids[0]) if shared else "",
        ]
        args: list[Any] = [model, owner, now, now + timeout, self.max_backlog, ttl, self.idempotency_ttl_s]
        args += [webhook.model_dump_json(), webhook.events_field()] if webhook else ["", ""]
        args += [self.max_backlog_bytes, len(shared), "1" if reply else ""]
        args += [item for pair in shared.items() for item in pair]
        for job_id, spec in zip(job_ids, specs, strict=True):
            script_keys += [keys.job(job_id), keys.events(job_id)]
            args += [job_id, spec]
        return EnqueueCall(model, job_ids, script_keys, args, self.max_backlog_bytes, self.max_backlog)

    def get(self, job_id: str) -> JobState | None:
        return job_state(self.redis.hgetall(keys.job(job_id)))

    def request(self, job_id: str) -> GenerationRequest | None:
        """What the job draws (its spec, with its shared inputs while they are kept: they go when the
        last of its request's jobs ends)."""
        raw, inputs_key = cast(Any, self.redis.hmget(keys.job(job_id), "spec", "inputs"))
        if raw is None:
            return None
        shared = decode_inputs(cast(Any, self.redis.hgetall(text(inputs_key)))) if inputs_key else {}
        return request_from(raw, shared, lenient=True)

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
            self._replicated_call(
                self._cancel,
                [keys.jobs(text(model)), keys.job(job_id), keys.events(job_id)],
                [keys.GROUP, time.time(), self.result_ttl_s],
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

    def backlog_bytes(self, model: str) -> int:
        """Bytes of the specs and inputs of the model's jobs not ended (what LDM_MAX_BACKLOG_BYTES bounds)."""
        return int(cast(Any, self.redis.get(keys.backlog_bytes(model))) or 0)

    def recount(self, model: str) -> int:
        """Makes the model's byte count exact (the sum over the jobs in its stream); returns it."""
        return int(self._recount(keys=[keys.jobs(model), keys.backlog_bytes(model)]))

    def sweep_lock(self, holder: str, lock_ms: int) -> bool:
        """Takes (or keeps) the lock of the one sweeper; False while another holds it."""
        if self.redis.set(keys.SWEEPER, holder, nx=True, px=lock_ms):
            return True
        return text(self.redis.get(keys.SWEEPER)) == holder and bool(
            self.redis.pexpire(keys.SWEEPER, lock_ms)
        )

    def expire_overdue(self, model: str, limit: int = 10_000) -> int:
        """Expires the model's queued jobs past their deadline that no worker started, so that they end
        (and their event streams) even with no worker alive; returns how many. Callers hold the sweep
        lock, so that one place does it at a time."""
        now = time.time()
        entries = cast(Any, self.redis.xrange(keys.jobs(model), count=limit))
        ids = [(text(entry_id), text(fields.get(b"job"))) for entry_id, fields in entries]
        pipe = self.redis.pipeline(transaction=False)
        for _, job_id in ids:
            pipe.hmget(keys.job(job_id), "deadline", "status")
        overdue = [
            (entry, job_id)
            for (entry, job_id), (deadline, status) in zip(ids, pipe.execute(), strict=True)
            if text(status) == "queued" and deadline is not None and float(deadline) <= now
        ]
        expired = 0
        for entry, job_id in overdue:
            script_keys = [keys.jobs(model), keys.job(job_id), keys.events(job_id)]
            reply = self._expire(keys=script_keys, args=[keys.GROUP, entry, now, self.result_ttl_s])
            expired += text(reply) == "expired"
        return expired

    def dead_letters(self, model: str, count: int = 100) -> list[dict[str, str]]:
        entries = cast(Any, self.redis.xrange(keys.dead(model), count=count))
        return [{text(k): text(v) for k, v in fields.items()} for _id, fields in entries]

    def workers(self) -> list[str]:
        """Names of the workers whose heartbeat is live."""
        prefix = len(keys.worker(""))
        return sorted(text(k)[prefix:] for k in self.redis.scan_iter(match=keys.WORKER_PATTERN, count=100))
