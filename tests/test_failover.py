"""Redis Sentinel: a primary, a replica and three sentinels on loopback (the same redis-server binary).
Accepted jobs wait for a replica (WAIT), so SIGKILLing the primary right after they were answered
loses none of them: Sentinel promotes the replica and the service's clients follow it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from service.queue.connection import NotReplicated, unavailable
from service.queue.delivery import WorkerQueue
from service.queue.store import JobStore
from service.settings import queue_settings

from .redis_server import RedisServer, SentinelServer, wait_until
from .test_queue import MODEL, SPEC

pytestmark = pytest.mark.slow


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


def test_a_replay_on_a_demoted_primary_is_unavailable_and_reconnects(tmp_path: Path) -> None:
    """A client still connected to a primary that became a replica: a retried enqueue (same
    Idempotency-Key) only reads there and succeeds, then its WAIT is refused ("WAIT cannot be used
    with replica instances"): that is 'unavailable' (a 503 with the ids, not a 500), and the pool drops
    its connections, so the next call reaches the primary again (through Sentinel in production)."""
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(primary.port)))
    replica.start()
    try:
        wait_until(
            lambda: replica.client().info("replication")["master_link_status"] == "up", 20, "replication"
        )
        on_primary = JobStore.from_settings(queue_settings(redis_url=primary.url, redis_min_replicas=1))
        [job_id] = on_primary.enqueue_many(MODEL, [SPEC], owner="o", idempotency_key="k")
        wait_until(lambda: replica.client().exists(f"ldm:job:{job_id}"), 10, "the job on the replica")
        on_replica = JobStore.from_settings(queue_settings(redis_url=replica.url, redis_min_replicas=1))
        connection = on_replica.redis.client_id()  # the pooled connection the enqueue then takes
        with pytest.raises(redis.ResponseError) as refused:
            on_replica.enqueue_many(MODEL, [SPEC], owner="o", idempotency_key="k")
        assert unavailable(refused.value)
        checker = replica.client()  # as the replica sees it: the store's connection is gone
        wait_until(
            lambda: all(int(c["id"]) != connection for c in checker.client_list()), 5, "the store to hang up"
        )
    finally:
        replica.kill()
        primary.kill()
