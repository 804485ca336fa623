"""A real `ldm worker` on a tiny random model against a real Redis: an n-image img2img read from its
shared inputs draws what n jobs with inline images draw, and a Redis out of memory (maxmemory) while
a job publishes progress and its result kills no worker: the job completes once memory frees."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from service.queue import keys
from service.queue.states import JobStatus
from service.queue.store import JobStore, connect

from .redis_server import RedisServer
from .test_worker import wait_done, wait_step
from .workers import SPEC, WorkerProcess, job, write_tiny_model

pytestmark = pytest.mark.slow
MODEL = "tiny"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


INIT = png(Image.linear_gradient("L").resize((32, 32)).convert("RGB"))


def half_mask() -> bytes:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # the left half is repainted
    return png(mask)


MASK = half_mask()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, server: RedisServer) -> Iterator[WorkerProcess]:
    folder = tmp_path_factory.mktemp("worker")
    model = write_tiny_model(folder / "model")
    worker = WorkerProcess("w1", server.url, {MODEL: model}, folder, max_batch=4)
    worker.start()
    try:
        worker.wait_ready(server.client())
        yield worker
    finally:
        worker.stop()
        print(worker.log()[-5000:])  # shown when a test fails


@pytest.fixture
def store(server: RedisServer, worker: WorkerProcess) -> Iterator[JobStore]:
    client = connect(server.url)
    yield JobStore(client, result_ttl_s=600)
    client.close()


def test_an_n_image_img2img_draws_from_its_shared_inputs_what_inline_jobs_draw(
    store: JobStore, server: RedisServer
) -> None:
    spec = {**SPEC, "init_image": INIT, "mask": MASK, "strength": 0.7}
    requests = [job({**spec, "seed": 5 + i}) for i in range(4)]
    shared = store.enqueue_many(MODEL, requests)
    client = server.client()
    assert client.hget(keys.inputs(shared[0]), "init_image") == INIT  # stored once, apart
    inline = [store.enqueue(MODEL, request) for request in requests]  # one image each: inline, as before
    assert client.hget(keys.job(inline[0]), "inputs") is None
    states = wait_done(store, [*shared, *inline])
    assert [s.status for s in states] == [JobStatus.SUCCEEDED] * 8, [s.error for s in states]
    assert [store.result(i) for i in shared] == [store.result(i) for i in inline]
    assert len({store.result(i) for i in shared}) == 4  # four seeds, four images
    assert not client.exists(keys.inputs(shared[0]))  # the last job to end deleted them
    assert store.backlog_bytes(MODEL) == 0


def test_redis_out_of_memory_kills_no_worker(
    store: JobStore, server: RedisServer, worker: WorkerProcess
) -> None:
    """Every write refused (maxmemory 1: OOM) while the job steps, publishes progress and finishes: the
    worker backs off and keeps its result; once memory frees, the job ends with its one result."""
    client = server.client()
    job_id = store.enqueue(MODEL, job({**SPEC, "steps": 40}))
    wait_step(store, job_id, 2)
    client.config_set("maxmemory", 1)
    try:
        time.sleep(2.0)  # the job's steps run out meanwhile: progress and its result are refused
        assert worker.alive
        state = store.get(job_id)
        assert state is not None and state.status == JobStatus.RUNNING and state.step < 40
    finally:
        client.config_set("maxmemory", 0)
    [state] = wait_done(store, [job_id], timeout_s=60)
    assert state.status == JobStatus.SUCCEEDED and state.results == 1, state.error
    assert worker.alive
    assert "maxmemory" in worker.log()  # it saw the refusals, and rode them out
    assert store.backlog(MODEL) == 0 and store.backlog_bytes(MODEL) == 0
    # It still serves: the next job goes through at once.
    [after] = wait_done(store, [store.enqueue(MODEL, job({**SPEC, "seed": 3}))])
    assert after.status == JobStatus.SUCCEEDED
