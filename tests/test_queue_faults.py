"""The protocol's answers to faults, against a real Redis, no worker process: all-or-none enqueue of a
request's jobs, idempotency keys, deliveries charged only when a worker may have died, claims retried
after a lost reply, partial job hashes, long jobs outliving their queueing TTL, and Redis errors that
mean "not now"."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from service.ldm.request import GenerationRequest
from service.queue import keys
from service.queue.delivery import WorkerQueue
from service.queue.states import JobStatus
from service.queue.store import BacklogFull, JobStore, connect, unavailable

from .redis_server import RedisServer
from .test_queue import MODEL, SPEC, claim_new, reclaim, worker_queue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, result_ttl_s=60, max_backlog=5)


def images(n: int) -> list[GenerationRequest]:
    return [SPEC.model_copy(update={"seed": 7 + i}) for i in range(n)]


def test_a_request_is_enqueued_whole_or_not_at_all(store: JobStore) -> None:
    first = store.enqueue_many(MODEL, images(3))
    assert len(first) == 3 and store.backlog(MODEL) == 3
    with pytest.raises(BacklogFull):  # 3 + 3 > 5: none of the three goes in
        store.enqueue_many(MODEL, images(3))
    assert store.backlog(MODEL) == 3
    assert [r.seed for r in (store.request(i) for i in first) if r] == [7, 8, 9]


def test_an_idempotency_key_answers_the_first_jobs(store: JobStore, client: redis.Redis) -> None:
    ids = store.enqueue_many(MODEL, images(2), owner="alice", idempotency_key="order-17")
    again = store.enqueue_many(MODEL, images(2), owner="alice", idempotency_key="order-17")
    assert again == ids and store.backlog(MODEL) == 2  # a retry enqueues nothing
    other = store.enqueue_many(MODEL, images(2), owner="bob", idempotency_key="order-17")
    assert set(other).isdisjoint(ids) and store.backlog(MODEL) == 4  # per caller
    assert 0 < client.ttl(keys.idempotency("alice", "order-17")) <= store.idempotency_ttl_s


def test_a_live_holder_does_not_charge_a_delivery(store: JobStore, client: redis.Redis) -> None:
    """A job taken from a worker that is alive (a Redis outage or a slow loop let its delivery go idle)
    is no suspect: only a worker whose heartbeat is gone may have died of it."""
    job_id = store.enqueue(MODEL, SPEC)
    alive, other = worker_queue(client, "alive"), worker_queue(client, "other")
    first = claim_new(alive)
    alive.heartbeat({"name": "alive"}, ttl_s=30)
    second = reclaim(other)
    assert second is not None and (second.attempt, second.deliveries) == (2, 1)
    client.delete(keys.worker("other"))  # "other" dies (no heartbeat): the next one is charged
    third = reclaim(alive)
    assert third is not None and (third.attempt, third.deliveries) == (3, 2) and third.job_id == job_id
    assert first.attempt == 1


def test_a_claim_retried_after_a_lost_reply_takes_no_second_attempt(
    store: JobStore, client: redis.Redis
) -> None:
    store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    [entry] = queue.read([MODEL], count=1, block_ms=None)
    script = queue._scripts["claim"]
    script_keys = [keys.jobs(MODEL), keys.job(entry.job_id), keys.events(entry.job_id), keys.dead(MODEL)]
    args = [keys.GROUP, entry.entry, "w", 3, time.time(), 60, entry.job_id, MODEL, "token-1", keys.worker("")]
    replies = [script(keys=script_keys, args=args) for _ in range(2)]  # the client retried the call
    assert replies[0][:3] == replies[1][:3] == [b"claimed", b"1", b"1"]


def test_a_partial_job_hash_fails_or_runs_without_crashing(store: JobStore, client: redis.Redis) -> None:
    queue = worker_queue(client, "w")
    bare, empty = "a" * 32, "b" * 32
    client.hset(
        keys.job(bare), mapping={"id": bare, "model": MODEL, "spec": SPEC.to_json(), "status": "queued"}
    )
    client.hset(keys.job(empty), mapping={"id": empty, "model": MODEL, "status": "queued"})
    for job_id in (bare, empty):
        client.xadd(keys.jobs(MODEL), {"job": job_id})
    claimed = {c.entry.job_id: c for c in queue.claim(queue.read([MODEL], count=2, block_ms=None))}
    lease = claimed[bare].lease
    assert lease is not None and (lease.attempt, lease.deadline) == (1, float("inf"))
    assert claimed[empty].outcome == "dead"
    state = store.get(empty)
    assert state is not None and state.status == JobStatus.FAILED and "no spec" in state.error


def test_a_started_job_outlives_its_queueing_ttl(client: redis.Redis) -> None:
    store = JobStore(client, result_ttl_s=60, max_backlog=5, job_timeout_s=1)
    job_id = store.enqueue(MODEL, SPEC)
    assert client.ttl(keys.job(job_id)) <= 62
    queue = WorkerQueue(client, "w", [MODEL], max_deliveries=3, result_ttl_s=600)
    queue.ensure_groups()
    lease = claim_new(queue)
    assert queue.start([lease]) == ["running"]
    assert client.ttl(keys.job(job_id)) > 500  # a long job's result is not thrown away


def test_redis_errors_that_mean_not_now() -> None:
    for error in (
        redis.exceptions.OutOfMemoryError("OOM command not allowed"),
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
        redis.ConnectionError("down"),
    ):
        assert unavailable(error)
    assert not unavailable(redis.ResponseError("ERR wrong number of arguments"))
