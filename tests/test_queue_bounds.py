"""The backlog's bound in bytes and the shared inputs of n-image requests, against a real Redis, no
worker process: what is counted, when it is given back, that the count cannot drift, and that an
n-image img2img stores its init image (and mask) once."""

from __future__ import annotations

import io
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from PIL import Image

from service.ldm.request import GenerationRequest
from service.queue import keys
from service.queue.delivery import WorkerQueue
from service.queue.inputs import InputsGone, request_from
from service.queue.states import JobStatus
from service.queue.store import BacklogBytesFull, BacklogFull, JobStore, connect

from .redis_server import RedisServer
from .test_queue import MODEL, SPEC, claim_new, reclaim, worker_queue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="no")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(server.url)
    client.flushall()
    yield client
    client.close()


def noise_png(size: int, seed: int) -> bytes:
    """A PNG that does not compress (random pixels): its size is what a real photo's would be."""
    image = Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = noise_png(128, 1)  # about 49 kB
MASK = noise_png(128, 2)
I2I = GenerationRequest(prompt="a red circle", width=32, height=32, steps=4, init_image=IMAGE, mask=MASK)


def images(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    return [request.model_copy(update={"seed": 7 + i}) for i in range(n)]


def job_bytes(client: redis.Redis, job_ids: list[str]) -> int:
    return sum(int(client.hget(keys.job(i), "bytes") or 0) for i in job_ids)


def counted(store: JobStore) -> int:
    return store.backlog_bytes(MODEL)


def test_jobs_count_their_bytes_and_a_request_past_the_bound_is_refused_whole(client: redis.Redis) -> None:
    store = JobStore(client, max_backlog=100, max_backlog_bytes=3 * len(SPEC.to_json()) + 10)
    first = store.enqueue_many(MODEL, images(SPEC, 2))
    assert counted(store) == job_bytes(client, first) == sum(len(r.to_json()) for r in images(SPEC, 2))
    with pytest.raises(BacklogBytesFull) as refused:  # 2 + 2 specs > 3: neither goes in
        store.enqueue_many(MODEL, images(SPEC, 2))
    assert refused.value.held == counted(store) and "LDM_MAX_BACKLOG_BYTES" in str(refused.value)
    assert store.backlog(MODEL) == 2
    store.enqueue(MODEL, SPEC.model_copy(update={"seed": 1}))  # one more fits
    assert store.backlog(MODEL) == 3
    with pytest.raises(BacklogFull):  # the bound in jobs still holds, checked first
        JobStore(client, max_backlog=3).enqueue(MODEL, SPEC)


def test_a_lone_request_larger_than_the_bound_fits_an_empty_backlog(client: redis.Redis) -> None:
    store = JobStore(client, max_backlog_bytes=1000)
    job_id = store.enqueue(MODEL, I2I.model_copy(update={"seed": 1}))
    assert counted(store) > 1000 and store.backlog(MODEL) == 1
    with pytest.raises(BacklogBytesFull):
        store.enqueue(MODEL, SPEC)
    store.cancel(job_id)
    assert counted(store) == 0 and not client.exists(keys.backlog_bytes(MODEL))
    store.enqueue(MODEL, SPEC)


def test_every_way_out_gives_the_bytes_back_once(client: redis.Redis) -> None:
    """Succeeded, failed, cancelled (queued and running), expired, dead-lettered: the count returns to
    zero, a second settle (a late worker, a replayed script) takes nothing twice, and the sweeper's
    recount agrees with the count all along."""
    store = JobStore(client, result_ttl_s=60, max_backlog=100)
    queue = WorkerQueue(client, "w", [MODEL], max_deliveries=1, result_ttl_s=60)
    queue.ensure_groups()
    ids = store.enqueue_many(MODEL, images(SPEC, 3))
    total = counted(store)
    assert total == store.recount(MODEL) == job_bytes(client, ids)
    leases = [claim_new(queue) for _ in range(3)]
    assert queue.start(leases) == ["running"] * 3
    assert counted(store) == total  # running jobs still count: their specs are still needed
    assert queue.complete(leases[0], JobStatus.SUCCEEDED, png=b"png") == "ok"
    assert queue.complete(leases[1], JobStatus.FAILED, error="boom") == "ok"
    assert store.cancel(leases[2].job_id) == JobStatus.CANCELLED
    assert counted(store) == 0 == store.recount(MODEL)
    assert queue.complete(leases[2], JobStatus.SUCCEEDED, png=b"late") == "cancelled"  # settles again
    assert counted(store) == 0 and job_bytes(client, ids) == 0

    queued = store.enqueue(MODEL, SPEC)
    store.cancel(queued)
    expiring = store.enqueue(MODEL, SPEC, timeout_s=0.01)
    time.sleep(0.05)
    assert store.expire_overdue(MODEL) == 1 and store.get(expiring) is not None
    assert counted(store) == 0
    doomed = store.enqueue(MODEL, SPEC)
    claim_new(queue)  # this worker "dies"; the next delivery is one too many: dead-lettered
    client.delete(keys.worker("w"))
    assert reclaim(WorkerQueue(client, "other", [MODEL], max_deliveries=1)) is None
    state = store.get(doomed)
    assert state is not None and state.status == JobStatus.FAILED
    assert counted(store) == 0 == store.recount(MODEL)


def test_the_recount_corrects_a_count_that_drifted(client: redis.Redis) -> None:
    """Jobs ended by an older release's scripts never settle; a hash that expired in the stream cannot:
    the sweeper's recount sums what the stream holds."""
    store = JobStore(client)
    ids = store.enqueue_many(MODEL, images(SPEC, 2))
    exact = counted(store)
    client.incrby(keys.backlog_bytes(MODEL), 10_000)  # what an old worker's FINISH would leave behind
    client.delete(keys.job(ids[0]))  # and a hash gone from under its entry
    assert store.recount(MODEL) == exact - len(images(SPEC, 2)[0].to_json()) == counted(store)
    client.delete(keys.job(ids[1]))
    assert store.recount(MODEL) == 0 and not client.exists(keys.backlog_bytes(MODEL))


def test_an_n_image_img2img_stores_its_images_once(client: redis.Redis) -> None:
    store = JobStore(client, result_ttl_s=60)
    requests = images(I2I, 4)
    ids = store.enqueue_many(MODEL, requests)
    inputs = keys.inputs(ids[0])
    stored: Any = client.hgetall(inputs)
    assert stored == {b"init_image": IMAGE, b"mask": MASK, b"refs": b"4"}
    assert 0 < client.ttl(inputs) <= client.ttl(keys.job(ids[0])) + 1
    for job_id in ids:
        spec: Any = client.hget(keys.job(job_id), "spec")
        assert len(spec) < 1000 and b'"inputs":["init_image","mask"]' in spec  # no copy of the images
        assert client.hget(keys.job(job_id), "inputs") == inputs.encode()
    # The images are held once: the whole of Redis grew by about one copy, not four.
    images_size = len(IMAGE) + len(MASK)
    assert counted(store) == job_bytes(client, ids) < images_size + 4 * 1000
    assert client.memory_usage(inputs) < 1.2 * images_size
    used = sum(client.memory_usage(k) or 0 for k in client.scan_iter("ldm:*"))
    assert images_size < used < 1.5 * images_size
    # What a worker claims is what was asked for, image i with seed 7 + i.
    queue = worker_queue(client, "w")
    leases = [claim_new(queue) for _ in range(4)]
    assert [request_from(lease.spec_json, lease.inputs) for lease in leases] == requests
    assert store.request(ids[2]) == requests[2]
    # The last job to end deletes the images.
    for lease in leases[:3]:
        queue.complete(lease, JobStatus.SUCCEEDED, png=b"png")
    assert client.hget(inputs, "refs") == b"1"
    store.cancel(leases[3].job_id)
    assert not client.exists(inputs) and counted(store) == 0
    assert store.request(ids[0]) == requests[0].model_copy(update={"init_image": None, "mask": None})


def test_one_image_keeps_its_inputs_inline_and_old_specs_still_read(client: redis.Redis) -> None:
    store = JobStore(client)
    one = store.enqueue(MODEL, I2I.model_copy(update={"seed": 1}))
    assert not list(client.scan_iter(keys.inputs("*")))
    assert store.request(one) == I2I.model_copy(update={"seed": 1})
    # A job hash as an older gateway wrote it (no bytes, no inputs): claimed, run and ended as before.
    old = "c" * 32
    fields = {"id": old, "model": MODEL, "spec": SPEC.to_json(), "status": "queued"}
    client.hset(keys.job(old), mapping=fields)
    client.xadd(keys.jobs(MODEL), {"job": old})
    queue = worker_queue(client, "w")
    leases = [claim_new(queue) for _ in range(2)]
    assert {lease.job_id: request_from(lease.spec_json, lease.inputs) for lease in leases} == {
        one: I2I.model_copy(update={"seed": 1}),
        old: SPEC,
    }
    for lease in leases:
        assert queue.complete(lease, JobStatus.SUCCEEDED, png=b"png") == "ok"
    assert counted(store) == 0 == store.recount(MODEL)


def test_a_job_whose_shared_inputs_expired_cannot_be_drawn(client: redis.Redis) -> None:
    store = JobStore(client)
    ids = store.enqueue_many(MODEL, images(I2I, 2))
    client.delete(keys.inputs(ids[0]))
    lease = claim_new(worker_queue(client, "w"))
    with pytest.raises(InputsGone, match="init_image"):
        request_from(lease.spec_json, lease.inputs)
