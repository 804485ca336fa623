"""The keeper: a thread that renews a worker's deliveries and heartbeat while its loop is busy in
torch, on a Redis connection of its own, but only while the loop moves.

A loop that has not iterated for `stall_timeout_s` (a hung device call, a deadlock) is stuck: /healthz
says so (503, for the liveness probe), and the keeper stops renewing, so the heartbeat expires and the
deliveries go idle; other workers reclaim the jobs, and fencing refuses whatever this one does later.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ..queue.delivery import WorkerQueue
from ..queue.store import backlog
from ..settings import WorkerSettings
from .ledger import Ledger
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)
REDIS_ERRORS = redis.RedisError


class Keeper:
    def __init__(
        self,
        settings: WorkerSettings,
        queue: WorkerQueue,
        ledger: Ledger,
        metrics: WorkerMetrics,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.ledger = ledger
        self.metrics = metrics
        self._status = status  # the worker's own part of the heartbeat (draining, models, ...)
        self._beat = time.monotonic()  # the loop's last iteration
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        """The loop calls this once per iteration."""
        self._beat = time.monotonic()
        self.metrics.loop_timestamp.set(time.time())

    def healthy(self) -> bool:
        """False while the loop is stuck: it has not iterated for stall_timeout_s."""
        return time.monotonic() - self._beat <= self.settings.stall_timeout_s

    def _run(self) -> None:
        # Renewed 3 times per reclaim window; the heartbeat lives 2 of those, so a dead worker's is gone
        # before its deliveries are reclaimable (a live holder's heartbeat spares the job a charge).
        interval = self.settings.reclaim_idle_ms / 1000 / 3
        stuck = False
        while not self._stop.is_set():
            if not self.healthy():
                if not stuck:
                    log.error(
                        "the worker loop has not moved for %.0f s: no longer renewing its %d jobs or the "
                        "heartbeat, so that other workers take the jobs over",
                        time.monotonic() - self._beat,
                        len(self.ledger),
                    )
                stuck = True
                self._stop.wait(interval)
                continue
            if stuck:
                log.warning("the worker loop moves again")
                stuck = False
            try:
                self._renew(ttl_s=interval * 2)
            except REDIS_ERRORS as e:
                log.debug("keeper: redis unavailable (%s)", e)
            except Exception:
                log.exception("keeper failed")
            self._stop.wait(interval)

    def _renew(self, ttl_s: float) -> None:
        leases = self.ledger.leases()
        stale = self.queue.refresh(leases)
        if stale:
            self.ledger.supersede(stale)
        heartbeat = {
            **self._status(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.settings.device,
            "max_batch": self.settings.max_batch,
            "held": len(leases),
        }
        self.queue.heartbeat(heartbeat, ttl_s=ttl_s)
        for model in self.queue.models:
            self.metrics.queue_backlog.labels(model).set(backlog(self.queue.redis, model))
