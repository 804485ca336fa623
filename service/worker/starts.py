"""Marking admitted jobs `running` off the loop's thread, so that the round trip (a write Redis
fsyncs before it answers) overlaps the new members' preparation and their first step instead of
delaying them.

The loop sends the starts when it admits jobs and collects the answers in the same iteration, right
after the step and before anything else of theirs (progress, result) goes out: a job is never
published before Redis knows it runs. A job whose answer is not `running` (cancelled meanwhile, or
taken over) leaves, its one step wasted; when the round trip fails the loop hands those jobs back.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import redis

from ..queue.delivery import WorkerQueue
from .ledger import Job

log = logging.getLogger(__name__)


class Starts:
    def __init__(self, queue: WorkerQueue) -> None:
        self._queue = queue  # a connection of its own
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="starts")
        self._in_flight: list[tuple[Future[list[str]], list[Job]]] = []

    def send(self, jobs: list[Job]) -> None:
        if jobs:
            future = self._pool.submit(self._queue.start, [job.lease for job in jobs])
            self._in_flight.append((future, jobs))

    def collect(self) -> list[tuple[Job, str | None]]:
        """Each job sent with its status (`running`, `stale` or the terminal one); None when the round
        trip failed and whether it ran is unknown."""
        out: list[tuple[Job, str | None]] = []
        for future, jobs in self._in_flight:
            try:
                out += zip(jobs, future.result(), strict=True)
            except redis.RedisError as e:
                log.warning("starting %d jobs failed: %s", len(jobs), e)
                out += [(job, None) for job in jobs]
        self._in_flight = []
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
