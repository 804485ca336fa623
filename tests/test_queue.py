"""The job protocol against a real Redis, no worker process: enqueue, backpressure, fencing,
dead-lettering, hand-back, cancel, events."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from service.ldm.request import GenerationRequest
from service.paths import REPO_ROOT
from service.queue import keys
from service.queue.delivery import Lease, WorkerQueue
from service.queue.states import JobStatus
from service.queue.store import BacklogFull, JobStore, connect

from .redis_server import RedisServer

MODEL = "tiny"
SPEC = GenerationRequest(prompt="a red circle", width=32, height=32, steps=4, seed=7)


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


def worker_queue(client: redis.Redis, name: str) -> WorkerQueue:
    queue = WorkerQueue(client, name, [MODEL], max_deliveries=3, result_ttl_s=60)
    queue.ensure_groups()
    return queue


def claim_new(queue: WorkerQueue) -> Lease:
    [claimed] = queue.claim(queue.read([MODEL], count=1, block_ms=None))
    assert claimed.lease is not None, claimed
    return claimed.lease


def reclaim(queue: WorkerQueue, min_idle_ms: int = 0) -> Lease | None:
    entries = queue.reclaim(MODEL, min_idle_ms, count=1)
    if not entries:
        return None
    [claimed] = queue.claim(entries)
    return claimed.lease


def test_spec_validation() -> None:
    for bad in (
        {"prompt": "x", "steps": 0},
        {"prompt": "x", "width": -8},
        {"prompt": "x", "seed": 2**63},
        {"prompt": "x", "guidance_scale": 99},
        {"prompt": "x", "init_image": b"GIF89a"},
        {"prompt": "x", "mask": b"\x89PNG\r\n\x1a\n"},  # a mask without an init image
        {"prompt": "x", "n": 4},  # one job is one image
    ):
        with pytest.raises(ValidationError):
            GenerationRequest.model_validate(bad)
    # Images travel as base64 in the JSON stored in Redis: never pickle.
    spec = GenerationRequest.model_validate({"prompt": "x", "init_image": b"\x89PNG\r\n\x1a\nrest"})
    assert GenerationRequest.from_json(spec.to_json()) == spec
    assert isinstance(json.loads(spec.to_json())["init_image"], str)


def test_enqueue_creates_the_job_and_is_idempotent(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC, owner="alice", timeout_s=30)
    state = store.get(job_id)
    assert state is not None
    assert (state.status, state.owner, state.model, state.attempt) == (JobStatus.QUEUED, "alice", MODEL, 0)
    assert state.deadline == pytest.approx(state.created + 30)
    assert store.request(job_id) == SPEC
    assert store.backlog(MODEL) == 1
    assert [e["type"] for _, e in store.events(job_id)] == ["queued"]
    assert 0 < client.ttl(keys.job(job_id)) <= 30 + 60 + 1
    assert store.enqueue(MODEL, SPEC, job_id=job_id) == job_id  # a retried enqueue adds nothing
    assert store.backlog(MODEL) == 1
    with pytest.raises(ValueError):
        store.enqueue("bad name!", SPEC)
    with pytest.raises(ValueError, match="seed"):  # drawn once, before enqueue: every attempt draws the same
        store.enqueue(MODEL, SPEC.model_copy(update={"seed": None}))


def test_enqueue_refuses_past_the_backlog_bound(store: JobStore) -> None:
    for _ in range(5):
        store.enqueue(MODEL, SPEC)
    with pytest.raises(BacklogFull) as refused:
        store.enqueue(MODEL, SPEC)
    assert refused.value.backlog == 5
    assert store.backlog(MODEL) == 5


def test_fencing_refuses_a_superseded_attempt(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    slow, fast = worker_queue(client, "slow"), worker_queue(client, "fast")
    first = claim_new(slow)
    assert (first.attempt, first.deliveries) == (1, 1)
    assert slow.start([first]) == ["running"]
    # "slow" stalls; its delivery goes idle and "fast" reclaims the job: attempt 2.
    second = reclaim(fast)
    assert second is not None and (second.attempt, second.deliveries) == (2, 2)
    assert fast.start([second]) == ["running"]
    assert slow.refresh([first]) == {first}  # slow learns it lost the job, and does not take it back
    assert client.xpending_range(keys.jobs(MODEL), keys.GROUP, "-", "+", 10)[0]["consumer"] == b"fast"
    assert slow.progress_and_read([(first, 1, 4)], [], 0)[0] == {job_id: "stale"}
    assert slow.complete(first, JobStatus.SUCCEEDED, png=b"late") == "stale"
    assert store.result(job_id) is None
    assert fast.complete(second, JobStatus.SUCCEEDED, png=b"png") == "ok"
    assert fast.complete(second, JobStatus.SUCCEEDED, png=b"again") == "succeeded"  # stored once
    state = store.get(job_id)
    assert state is not None and (state.status, state.results) == (JobStatus.SUCCEEDED, 1)
    assert store.result(job_id) == b"png"
    assert store.backlog(MODEL) == 0  # acknowledged and deleted
    assert client.xpending(keys.jobs(MODEL), keys.GROUP)["pending"] == 0


def test_a_job_delivered_too_often_is_dead_lettered(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    other = store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    for delivery in (1, 2, 3):  # each delivery's worker "dies": the next one reclaims it
        lease = claim_new(queue) if delivery == 1 else reclaim(queue)
        assert lease is not None and lease.job_id == job_id and lease.deliveries == delivery
    entries = queue.reclaim(MODEL, 0, count=1)
    [claimed] = queue.claim(entries)
    assert claimed.outcome == "dead" and claimed.lease is None
    state = store.get(job_id)
    assert state is not None and state.status == JobStatus.FAILED
    assert "delivered 3 times" in state.error
    [letter] = store.dead_letters(MODEL)
    assert letter["job"] == job_id and letter["attempts"] == "3"
    assert store.events(job_id)[-1][1]["type"] == "failed"
    assert store.backlog(MODEL) == 1  # only the other job is left
    assert claim_new(queue).job_id == other


def test_hand_back_makes_a_job_reclaimable_at_once_without_counting_a_delivery(
    store: JobStore, client: redis.Redis
) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    draining, other = worker_queue(client, "draining"), worker_queue(client, "other")
    lease = claim_new(draining)
    draining.start([lease])
    assert draining.hand_back([lease]) == ["ok"]
    state = store.get(job_id)
    assert state is not None and (state.status, state.handed_back) == (JobStatus.QUEUED, 1)
    taken = reclaim(other, min_idle_ms=60_000)  # far longer than the handed-back entry has been idle
    assert taken is not None and taken.job_id == job_id
    assert (taken.attempt, taken.deliveries) == (2, 1)  # not a suspect: the first worker did not die
    assert draining.complete(lease, JobStatus.SUCCEEDED, png=b"x") == "stale"


def test_cancel_a_queued_job(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    assert store.cancel(job_id) == JobStatus.CANCELLED
    assert store.cancel(job_id) == JobStatus.CANCELLED  # already
    assert store.cancel("0" * 32) is None
    assert store.backlog(MODEL) == 0
    assert worker_queue(client, "w").read([MODEL], count=1, block_ms=None) == []
    assert store.events(job_id)[-1][1]["type"] == "cancelled"


def test_cancel_a_running_job_releases_it_at_the_next_progress(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    lease = claim_new(queue)
    queue.start([lease])
    assert queue.progress_and_read([(lease, 1, 4)], [], 0)[0] == {job_id: "running"}
    assert store.cancel(job_id) == JobStatus.CANCELLED
    assert queue.progress_and_read([(lease, 2, 4)], [], 0)[0] == {job_id: "cancelled"}
    assert queue.complete(lease, JobStatus.SUCCEEDED, png=b"x") == "cancelled"
    assert store.result(job_id) is None
    assert client.xpending(keys.jobs(MODEL), keys.GROUP)["pending"] == 0
    types = [e["type"] for _, e in store.events(job_id)]
    assert types == ["queued", "running", "progress", "cancelled"]


def test_a_claimed_job_that_was_cancelled_or_deleted_is_not_run(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    lease = claim_new(queue)
    store.cancel(job_id)
    assert queue.start([lease]) == ["cancelled"]
    assert client.xpending(keys.jobs(MODEL), keys.GROUP)["pending"] == 0
    gone = store.enqueue(MODEL, SPEC)
    client.delete(keys.job(gone))  # its hash expired
    [claimed] = queue.claim(queue.read([MODEL], count=1, block_ms=None))
    assert claimed.outcome == "missing"
    assert store.backlog(MODEL) == 0


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.settings import worker_settings

    monkeypatch.setenv("LDM_MAX_BATCH", "3")
    monkeypatch.setenv("LDM_MODELS", json.dumps({"a": str(tmp_path)}))
    monkeypatch.setenv("LDM_REDIS_URL", "redis://127.0.0.1:1/0")
    settings = worker_settings(max_wait_ms=7, device=None)
    assert (settings.max_batch, settings.max_wait_ms, settings.device) == (3, 7, "cpu")
    assert settings.models == {"a": tmp_path}
    assert settings.redis_url == "redis://127.0.0.1:1/0"
    assert settings.test_faults is False  # fault injection is off unless a test turns it on
    with pytest.raises(ValidationError):
        worker_settings(models={"bad name!": tmp_path})


def test_max_batch_defaults_per_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.settings import DEFAULT_MAX_BATCH, worker_settings

    monkeypatch.delenv("LDM_MAX_BATCH", raising=False)
    models = {"a": tmp_path}
    assert worker_settings(models=models).max_batch == DEFAULT_MAX_BATCH["cpu"] == 4
    assert worker_settings(models=models, device="cuda").max_batch == DEFAULT_MAX_BATCH["cuda"] == 8
    assert worker_settings(models=models, device="cuda", max_batch=2).max_batch == 2


def test_the_protocol_does_not_import_torch() -> None:
    """The gateway uses these modules and must start in well under a second."""
    modules = "service.queue.store, service.queue.delivery, service.settings"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr


def test_progress_reads_new_entries_in_the_same_round_trip(store: JobStore, client: redis.Redis) -> None:
    """A busy worker looks for jobs to join its batch with every progress publication."""
    first = store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    lease = claim_new(queue)
    queue.start([lease])
    assert queue.progress_and_read([(lease, 1, 4)], [MODEL], 2) == ({first: "running"}, [])
    second, third = store.enqueue(MODEL, SPEC), store.enqueue(MODEL, SPEC)
    statuses, entries = queue.progress_and_read([(lease, 2, 4)], [MODEL], 1)
    assert statuses == {first: "running"}
    assert [e.job_id for e in entries] == [second]  # no more than asked for
    assert [e.job_id for e in queue.read([MODEL], 5, None)] == [third]
    types = [e["type"] for _, e in store.events(first)]
    assert types == ["queued", "running", "progress", "progress"]


def test_progress_survives_a_lost_consumer_group(store: JobStore, client: redis.Redis) -> None:
    job_id = store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    lease = claim_new(queue)
    queue.start([lease])
    client.xgroup_destroy(keys.jobs(MODEL), keys.GROUP)
    statuses, entries = queue.progress_and_read([(lease, 1, 4)], [MODEL], 1)
    assert entries == [] and job_id in statuses
    assert client.xinfo_groups(keys.jobs(MODEL))[0]["name"] == keys.GROUP.encode()  # created again


def test_a_claim_sent_ahead_answers_as_claim(store: JobStore, client: redis.Redis) -> None:
    """`claim_later` sends the claims, and reads what `claim` would have answered when asked: with the
    spec the entry carried, a cancelled job's `terminal`, and after an empty script cache too."""
    queue = worker_queue(client, "w")
    for flushed in (False, True):
        first, cancelled = store.enqueue(MODEL, SPEC), store.enqueue(MODEL, SPEC)
        entries = queue.read([MODEL], count=2, block_ms=None)
        assert [e.spec for e in entries] == [SPEC.to_json()] * 2  # small: it rides in the entry
        store.cancel(cancelled)
        if flushed:
            client.script_flush()
        answers = queue.claim_later(entries)
        claimed = answers()
        assert [c.outcome for c in claimed] == ["claimed", "terminal"]
        lease = claimed[0].lease
        assert lease is not None and lease.job_id == first and lease.attempt == 1
        assert lease.spec_json == entries[0].spec


def test_pipelined_scripts_survive_an_empty_script_cache(store: JobStore, client: redis.Redis) -> None:
    """Pipelines send EVALSHA without asking SCRIPT EXISTS first; after a Redis restart the cache is
    empty, and the scripts are loaded again on NOSCRIPT."""
    first, second = store.enqueue(MODEL, SPEC), store.enqueue(MODEL, SPEC)
    queue = worker_queue(client, "w")
    client.script_flush()
    leases = [c.lease for c in queue.claim(queue.read([MODEL], count=2, block_ms=None))]
    assert [lease.job_id for lease in leases if lease is not None] == [first, second]
    client.script_flush()
    assert queue.start([lease for lease in leases if lease is not None]) == ["running", "running"]
    client.script_flush()
    statuses, _ = queue.progress_and_read(
        [(lease, 1, 4) for lease in leases if lease is not None], [MODEL], 1
    )
    assert statuses == {first: "running", second: "running"}
