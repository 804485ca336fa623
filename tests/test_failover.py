"""Redis Sentinel: a primary, a replica and three sentinels on loopback (the same redis-server binary).
Accepted jobs wait for a replica (WAIT), so SIGKILLing the primary right after they were answered
loses none of them: Sentinel promotes the replica and the service's clients follow it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from service.queue.connection import NotReplicated
from service.queue.delivery import WorkerQueue
from service.queue.store import JobStore
from service.settings import queue_settings

from .redis_server import RedisServer, SentinelServer
from .test_queue import MODEL, SPEC

pytestmark = pytest.mark.slow


def wait_until(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


def test_accepted_jobs_survive_the_loss_of_the_primary(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(primary.port)))
    replica.start()
    sentinels = [SentinelServer(tmp_path / f"sentinel{i}", "ldm", primary.port) for i in range(3)]
    try:
        wait_until(
            lambda: replica.client().info("replication")["master_link_status"] == "up", 20, "replication"
        )
        settings = queue_settings(
            redis_sentinels=",".join(s.address for s in sentinels), redis_master="ldm", redis_min_replicas=1
        )
        store = JobStore.from_settings(settings)
        wait_until(lambda: store.redis.ping(), 20, "sentinels to name the primary")
        job_ids = [store.enqueue(MODEL, SPEC.model_copy(update={"seed": i})) for i in range(5)]
        primary.kill()  # right after the answers: only WAIT kept them
        wait_until(lambda: replica.client().info("replication")["role"] == "master", 30, "a failover")
        for job_id in job_ids:  # read through the sentinels: the client follows the promoted replica
            assert wait_until(lambda j=job_id: store.request(j), 10, "the job on the new primary") is not None
        with pytest.raises(NotReplicated):  # no replica left: an accepted job would not survive another loss
            store.enqueue(MODEL, SPEC)
        queue = WorkerQueue(store.redis, "w", [MODEL], max_deliveries=3)
        queue.ensure_groups()
        entries = queue.read([MODEL], count=10, block_ms=None)
        assert {e.job_id for e in entries} >= set(job_ids)  # workers take them from the new primary
    finally:
        for sentinel in sentinels:
            sentinel.kill()
        replica.kill()
        primary.kill()
