"""The per-step progress round trip: each member's step published (which also reports who was
cancelled or superseded) and new entries read for the batch to take in, in one pipeline.

While the batch keeps running, it goes out on a thread of its own during the next step, so a busy
worker's Redis round trips stay off the denoising path (`send_later`, then `collect` at the next
boundary); when members finish it is sent in line (`send_now`), so their last progress event comes
before their result. Progress is best effort: a Redis error leaves it unpublished.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import redis

from ..queue.delivery import Entry, Lease, WorkerQueue

log = logging.getLogger(__name__)
Progress = tuple[dict[str, str], list[Entry]]  # each job's status, and the entries read alongside
Sent = list[tuple[str, Lease]]  # (job id, lease) of each member published
Item = tuple[Lease, int, int]  # (lease, step, steps)
NOTHING: Progress = ({}, [])


class ProgressLine:
    def __init__(self, queue: WorkerQueue) -> None:
        self._queue = queue  # a connection of its own: the loop's is busy meanwhile
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self._in_flight: tuple[Future[Progress], Sent] | None = None

    def send_later(self, items: list[Item], sent: Sent, models: Sequence[str], free: int) -> None:
        self._in_flight = (self._pool.submit(self._queue.progress_and_read, items, models, free), sent)

    def send_now(
        self, queue: WorkerQueue, items: list[Item], sent: Sent, models: Sequence[str], free: int
    ) -> tuple[Sent, Progress]:
        try:
            return sent, queue.progress_and_read(items, models, free)
        except redis.RedisError as e:
            log.warning("progress not published: %s", e)
            return sent, NOTHING

    def collect(self) -> tuple[Sent, Progress]:
        """The round trip in flight, once done (nothing when none is)."""
        if self._in_flight is None:
            return [], NOTHING
        future, sent = self._in_flight
        self._in_flight = None
        try:
            return sent, future.result()
        except redis.RedisError as e:
            log.warning("progress not published: %s", e)
            return sent, NOTHING

    def close(self) -> None:
        self._pool.shutdown(wait=True)
