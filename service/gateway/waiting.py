"""Waiting for jobs on the gateway: following their events (XREAD BLOCK on their event streams, for
SSE, gRPC streams and OpenAI's stream) and taking the answers pushed for a request that waits for its
images (BLPOP on their reply lists: one wake per job). Each wait holds a connection of the `waits`
client while it blocks; none holds a thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from ..queue import keys
from ..queue.states import TERMINAL, JobState
from ..queue.store import UNAVAILABLE_ERRORS, text
from .errors import Unavailable

REDIS_ERRORS = UNAVAILABLE_ERRORS
BLOCK_S = 5.0  # longest single blocking read; callers see an idle tick (None) after each empty one
TERMINAL_TYPES = frozenset(str(s) for s in TERMINAL)


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream: queued, running, progress (step, steps) or a terminal status."""

    job_id: str
    id: str  # the stream entry id: the resume point (SSE `id:`)
    type: str
    fields: dict[str, str]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


class Waits:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client

    async def follow(
        self, job_ids: list[str], after: dict[str, str] | None = None, idle_s: float = BLOCK_S
    ) -> AsyncGenerator[Event | None, None]:
        """The events of the jobs in order (per job), from the start or after the given ids, until
        every job has ended; None after each `idle_s` without an event (a tick for keepalives and
        deadlines). A job whose event stream has expired is never followed to its end: callers bound
        their wait."""
        last = {job_id: (after or {}).get(job_id, "0-0") for job_id in job_ids}
        open_jobs = set(job_ids)
        block_ms = max(1, int(min(idle_s, BLOCK_S) * 1000))
        while open_jobs:
            streams = {keys.events(job_id): last[job_id] for job_id in job_ids if job_id in open_jobs}
            try:
                reply: Any = await self.client.xread(streams, count=100, block=block_ms)  # type: ignore[arg-type]
            except REDIS_ERRORS as e:
                raise Unavailable(f"the job queue is unavailable: {e}") from None
            if not reply:
                yield None
                continue
            for stream, entries in reply:
                job_id = text(stream).rsplit(":", 1)[-1]
                for entry_id, raw in entries:
                    fields = {text(k): text(v) for k, v in raw.items()}
                    event = Event(job_id, text(entry_id), fields.get("type", ""), fields)
                    last[job_id] = event.id
                    if event.terminal:
                        open_jobs.discard(job_id)
                    yield event

    async def answers(
        self, job_ids: list[str], timeout_s: float
    ) -> list[tuple[JobState | None, bytes | None]] | None:
        """Each job's state at its end and its image, as `outcomes` gives them, taken from the answers
        the protocol pushes for a request submitted `waiting` (BLPOP: one wake per job, none for its
        progress, and no read after); None if `timeout_s` passed first (the jobs go on; the answers
        already taken are gone, the job records are not)."""
        pending = {keys.reply(job_id): job_id for job_id in job_ids}
        got: dict[str, tuple[JobState | None, bytes | None]] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                reply: Any = await self.client.blpop(list(pending), timeout=min(remaining, BLOCK_S))
            except REDIS_ERRORS as e:
                raise Unavailable(f"the job queue is unavailable: {e}") from None
            if reply is None:
                continue
            key, value = reply
            head, png = bytes(value).split(b"\n", 1)
            fields = {k: str(v) for k, v in json.loads(head).items()}
            got[pending.pop(text(key))] = (JobState.from_hash(fields), png or None)
        return [got[job_id] for job_id in job_ids]

    async def wait(self, job_ids: list[str], timeout_s: float) -> bool:
        """Waits until every job has ended; False if `timeout_s` passed first (the jobs go on)."""
        events = self.follow(job_ids)
        try:
            async with asyncio.timeout(timeout_s):
                async for _event in events:
                    pass
            return True
        except TimeoutError:
            return False
        finally:
            await events.aclose()


def entry_key(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)
