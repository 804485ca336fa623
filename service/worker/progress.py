"""The progress round trip of a busy worker: each member's step published (which also reports who was
cancelled or superseded) and new entries read for the batch to take in, in one pipeline, on a thread
of its own so that the denoising loop never waits for Redis.

Every round trip costs the stepping thread something even off its path (the thread's wake-up, the
GIL, Redis's work and its fsync, the gateway woken for each event): about 1 ms a step on a 2-core
machine, 5% of the demo model's step. So a round trip goes out at most every `interval_s`
(LDM_PROGRESS_INTERVAL_MS), and while the batch has room its read blocks (XREADGROUP BLOCK) for up
to that long: a job that arrives meanwhile is returned at once and joins at the next step boundary,
and an idle stream costs one round trip per interval instead of one per step. The loop polls: a round
trip still out (blocked on the read) is left to finish, and the batch keeps stepping.

Interval 0 is the old way: a round trip per step, collected at the next boundary, reads not
blocking. A member's last progress event goes out with its result (`WorkerQueue.complete`), not
here. Progress is best effort: a Redis error leaves it unpublished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from ..queue.delivery import Entry, Lease, WorkerQueue

log = logging.getLogger(__name__)
Progress = tuple[dict[str, str], list[Entry]]  # each job's status, and the entries read alongside
Sent = list[tuple[str, Lease]]  # (job id, lease) of each member published
Item = tuple[Lease, int, int]  # (lease, step, steps)


@dataclass(frozen=True)
class Answer:
    """A round trip come back: what was published, each job's status, and what the read asked for
    (`count` entries of each of `models`; none when it failed) and got."""

    sent: Sent = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    models: Sequence[str] = ()
    count: int = 0
    entries: list[Entry] = field(default_factory=list)


NOTHING = Answer()


class ProgressLine:
    def __init__(self, queue: WorkerQueue, interval_s: float) -> None:
        self._queue = queue  # a connection of its own: the loop's is busy meanwhile
        self.interval_s = interval_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress")
        self._in_flight: tuple[Future[Progress], Sent, Sequence[str], int] | None = None
        self._last_sent = float("-inf")

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def due(self, now: float, reading: bool) -> bool:
        """Whether a round trip goes out at this boundary: none is out, and either one may block on a
        read (it paces itself) or the interval has passed since the last one."""
        if self._in_flight is not None:
            return False
        return reading or now - self._last_sent >= self.interval_s

    def send(self, items: list[Item], sent: Sent, models: Sequence[str], free: int) -> None:
        """Publishes `items` and reads up to `free` new entries of `models`, off the loop's thread."""
        block_ms = int(self.interval_s * 1000) or None  # None: no BLOCK (BLOCK 0 is forever)
        self._last_sent = time.monotonic()
        future = self._pool.submit(self._queue.progress_and_read, items, models, free, block_ms)
        self._in_flight = (future, sent, models, free)

    def poll(self) -> Answer:
        """The round trip out, if it has come back (always waited for at interval 0, where one goes
        out every step and the next must see its answer)."""
        if self._in_flight is None or (self.interval_s > 0 and not self._in_flight[0].done()):
            return NOTHING
        return self.collect()

    def collect(self) -> Answer:
        """The round trip out, once back (a blocked read returns within the interval); nothing when
        none is out."""
        if self._in_flight is None:
            return NOTHING
        future, sent, models, count = self._in_flight
        self._in_flight = None
        try:
            statuses, entries = future.result()
        except redis.RedisError as e:
            log.warning("progress not published: %s", e)
            return Answer(sent)
        return Answer(sent, statuses, models, count, entries)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
