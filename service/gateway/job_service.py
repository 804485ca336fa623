"""The gateway's side of the job protocol (`service/queue`), for asyncio.

Enqueue, status, result and cancel are the protocol's own `JobStore` calls (Lua scripts, fenced state
changes), run in a thread: each is one short Redis round trip. Waiting is not: a request that waits for
its images blocks on the answers its jobs push to it (BLPOP), an SSE subscriber and a gRPC stream on
the jobs' event streams (XREAD BLOCK), on an asyncio client (`waiting.py`), so a thousand waiting
requests hold no thread.

Each API key's jobs that have not ended are kept in a sorted set (`keys.owner_jobs`, written with
every submission, pruned as they are read), so "the caller's jobs" (AUTOMATIC1111's progress,
interrupt and skip) needs no scan of the queue.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

import redis
import redis.asyncio

from ..ldm.request import GenerationRequest
from ..queue import keys
from ..queue.scripts import SCRIPTS
from ..queue.states import JobState, JobStatus, Webhook
from ..queue.store import (
    UNAVAILABLE_ERRORS,
    BacklogBytesFull,
    BacklogFull,
    JobStore,
    job_state,
    on_replica,
    text,
    unavailable,
)
from .admission import Admission
from .errors import QueueBytesFull, QueueFull, Unavailable, WaitInterrupted
from .waiting import Waits, entry_key

T = TypeVar("T")
REDIS_ERRORS = UNAVAILABLE_ERRORS
# The fields of a job's hash that `unfinished` reads (not its spec, which may hold images).
STATE_FIELDS = ["model", "owner", "status", "created", "deadline", "started", "step", "steps"]


class JobService:
    def __init__(
        self,
        store: JobStore,
        client: redis.asyncio.Redis,
        retry_after_s: int,
        waits: redis.asyncio.Redis | None = None,
    ) -> None:
        self.store = store
        self.client = client  # commands
        self.waits = waits or client  # blocking reads (XREAD, BLPOP): a connection per waiting request
        self.waiting = Waits(self.waits)  # following jobs, taking their answers (waiting.py)
        self.retry_after_s = retry_after_s
        self._enqueue = client.register_script(SCRIPTS["enqueue"])
        self.admission = Admission()  # refusals that stand for a moment (admission.py)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(call, *args)
        except redis.RedisError as e:
            if not unavailable(e):
                raise
            raise Unavailable(
                f"the job queue is unavailable: {e}", retry_after_s=self.retry_after_s
            ) from None

    # -- writes -----------------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        requests: list[GenerationRequest],
        owner: str,
        idempotency_key: str = "",
        webhook: Webhook | None = None,
        waiting: bool = False,
    ) -> tuple[list[str], bool]:
        """Enqueues all the requests or none, in one atomic script call on the asyncio client (no
        thread: a burst of refusals costs one round trip each); 429 when the backlog has no room for
        its jobs, 503 when it has none for their bytes. Returns the job ids, and whether they are an
        earlier call's (the same Idempotency-Key: nothing was enqueued). `waiting`: the caller waits
        for the images, taking them with `answers` (not for an earlier call's jobs)."""
        call = self.store.enqueue_call(
            model, requests, owner, idempotency_key=idempotency_key, webhook=webhook, reply=waiting
        )
        try:
            if self.store.min_replicas:  # an answered job survives the loss of the primary
                reply, acked = await self._enqueue_and_wait(call.keys, call.args)
                job_ids = call.result(reply)
                self.store.replicated(acked)
            else:
                reply = await self._enqueue(keys=call.keys, args=call.args)
                job_ids = call.result(reply)
            backlog = call.backlog_after(reply)
            if backlog is not None and backlog >= call.max_backlog:  # full now: the next ones are refused
                self.admission.refused(model, self._full(model, backlog))
            else:
                self.admission.admitted(model, call.max_backlog - backlog if backlog is not None else 0)
        except (BacklogFull, BacklogBytesFull) as e:
            error = (
                self._full(model, e.backlog)
                if isinstance(e, BacklogFull)
                else QueueBytesFull(f"{e}; retry later", self.retry_after_s)
            )
            self.admission.refused(model, error)
            raise error from None
        except redis.RedisError as e:
            if not unavailable(e):
                raise
            # Whether the script ran is unknown: the ids let the caller look (404: not enqueued), and a
            # retry with the same Idempotency-Key is safe either way.
            raise Unavailable(
                f"the job queue is unavailable: {e}", call.job_ids, self.retry_after_s
            ) from None
        try:
            await self._remember(owner, job_ids)
        except redis.RedisError as e:
            if not unavailable(e):
                raise
            raise WaitInterrupted(  # the jobs were accepted and go on: a blind retry would run them twice
                f"the job queue became unavailable after the jobs were accepted ({e}); they go on:"
                f" follow /v1/jobs/{job_ids[0]}",
                job_ids,
            ) from None
        return job_ids, job_ids != call.job_ids

    async def seeds(self, job_ids: list[str]) -> list[int]:
        """The seeds the jobs were enqueued with (0 for a job whose records have expired)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "spec")
            specs = await pipe.execute()
        return [int(json.loads(spec).get("seed") or 0) if spec else 0 for spec in specs]

    async def _enqueue_and_wait(self, call_keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """The enqueue script and WAIT in one pipeline: WAIT counts the writes of its own connection,
        so sent apart (each command takes a pooled connection) it could confirm some other
        request's writes, or none, and answer at once."""
        for attempt in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._enqueue.sha, len(call_keys), *call_keys, *args)
                pipe.wait(self.store.min_replicas, self.store.replica_wait_ms)
                reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, redis.exceptions.NoScriptError) and attempt == 0:
                await self.client.script_load(SCRIPTS["enqueue"])  # Redis lost its script cache
                continue
            for answer in (reply, acked):
                if isinstance(answer, Exception):
                    if on_replica(answer):  # a read-only replay ran on a demoted primary: reconnect
                        await self.client.connection_pool.disconnect()
                    raise answer
            return reply, int(acked)
        raise AssertionError("unreachable")

    async def _remember(self, owner: str, job_ids: list[str]) -> None:
        """Adds the jobs to the owner's set; entries older than a job's records are dropped with them."""
        now = time.time()
        lifetime = self.store.job_timeout_s + self.store.result_ttl_s  # a job hash's TTL
        key = keys.owner_jobs(owner)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, dict.fromkeys(job_ids, now))
            pipe.zremrangebyscore(key, "-inf", now - lifetime)
            pipe.expire(key, int(lifetime) + 1)
            await pipe.execute()

    def _full(self, model: str, backlog: int) -> QueueFull:
        return QueueFull(
            f"the queue of model {model!r} is full ({backlog} jobs waiting or running); retry later",
            self.retry_after_s,
        )

    async def cancel(self, job_id: str) -> JobStatus | None:
        status = await self._run(self.store.cancel, job_id)
        self.admission.clear()  # room again, maybe: the next request asks the script
        return status

    # -- reads ------------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobState | None:
        return await self._run(self.store.get, job_id)

    async def request(self, job_id: str) -> GenerationRequest | None:
        return await self._run(self.store.request, job_id)

    async def result(self, job_id: str) -> bytes | None:
        return await self._run(self.store.result, job_id)

    async def preview(self, job_id: str, index: int) -> bytes | None:
        """Preview `index` of a job (a PNG), while its TTL lasts."""
        try:
            data = await self.client.get(keys.preview(job_id, index))
        except REDIS_ERRORS as e:
            raise Unavailable(f"the job queue is unavailable: {e}") from None
        return data if isinstance(data, bytes) else None

    async def outcomes(self, job_ids: list[str]) -> list[tuple[JobState | None, bytes | None]]:
        """Each job's state and result (None: none, or expired), in one round trip on the asyncio
        client: what a request that waited for its images reads once they are done."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
            pipe.get(keys.result(job_id))
        try:
            replies = await pipe.execute()
        except REDIS_ERRORS as e:
            raise Unavailable(
                f"the job queue is unavailable: {e}", retry_after_s=self.retry_after_s
            ) from None
        return [(job_state(fields), png) for fields, png in zip(replies[::2], replies[1::2], strict=True)]

    async def queue_position(self, state: JobState) -> int | None:
        """Jobs ahead of a queued one in its model's stream (0: next), None when not queued. Entries
        past the group's last delivered id are the undelivered ones; the backlog bounds the count."""
        if state.status != JobStatus.QUEUED:
            return None
        try:
            entry = text(await self.client.hget(keys.job(state.id), "entry"))
            stream = keys.jobs(state.model)
            last = "0-0"
            try:
                groups = await self.client.xinfo_groups(stream)
            except redis.ResponseError:  # no stream or no group yet: no worker ever read it
                groups = []
            for group in groups:
                if text(group.get("name")) == keys.GROUP:
                    last = text(group.get("last-delivered-id")) or "0-0"
            if not entry or entry_key(entry) <= entry_key(last):
                return 0
            ahead: Any = await self.client.xrange(
                stream, min=f"({last}", max=f"({entry}", count=self.store.max_backlog
            )
        except REDIS_ERRORS as e:
            raise Unavailable(f"the job queue is unavailable: {e}") from None
        return len(ahead)

    async def unfinished(self, owner: str) -> list[JobState]:
        """The owner's jobs that are queued or running, oldest first (ended ones leave the set)."""
        return await self._run(self._unfinished, owner)

    def _unfinished(self, owner: str) -> list[JobState]:
        key = keys.owner_jobs(owner)
        members: Any = self.store.redis.zrange(key, 0, -1)
        ids = [text(member) for member in members]
        if not ids:
            return []
        with self.store.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.job(job_id), STATE_FIELDS)
            replies: list[Any] = pipe.execute()
        states, ended = [], []
        for job_id, values in zip(ids, replies, strict=True):
            fields = {f: text(v) for f, v in zip(STATE_FIELDS, values, strict=True) if v is not None}
            if "status" not in fields or JobStatus(fields["status"]).terminal:
                ended.append(job_id)
            else:
                states.append(JobState.model_validate({"id": job_id, **fields}))
        if ended:
            self.store.redis.zrem(key, *ended)
        return states

    async def owner_options(self, owner: str) -> dict[str, str]:
        """Settings an API key keeps between requests (AUTOMATIC1111's options)."""
        raw: Any = await self._run(self.store.redis.hgetall, keys.a1111_options(owner))
        return {text(k): text(v) for k, v in raw.items()}

    async def set_owner_options(self, owner: str, values: dict[str, str]) -> None:
        mapping: Any = dict(values)
        if mapping:
            await self._run(partial(self.store.redis.hset, keys.a1111_options(owner), mapping=mapping))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except REDIS_ERRORS:
            return False

    def queue_gauges(self, models: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        """Backlog and live workers per model (blocking; for the /metrics scrape)."""
        return {model: self.store.backlog(model) for model in models}, self.live_workers()

    def live_workers(self) -> dict[str, int]:
        """Workers whose heartbeat is live, per model they serve (blocking)."""
        counts: dict[str, int] = {}
        for models in self.worker_models():
            for model in models:
                counts[model] = counts.get(model, 0) + 1
        return counts

    def worker_models(self) -> list[list[str]]:
        """The models of each worker whose heartbeat is live (blocking)."""
        names = self.store.workers()
        beats = self.store.redis.mget([keys.worker(name) for name in names]) if names else []
        found = []
        for raw in cast(list[Any], beats):
            try:
                models = json.loads(text(raw)).get("models", []) if raw else []
            except (ValueError, AttributeError):
                continue
            found.append([str(model) for model in models])
        return found

    async def workers_by_model(self) -> dict[str, int]:
        return await self._run(self.live_workers)

    async def models_by_worker(self) -> list[list[str]]:
        return await self._run(self.worker_models)

    async def close(self) -> None:
        await self.client.aclose()
        if self.waits is not self.client:
            await self.waits.aclose()
