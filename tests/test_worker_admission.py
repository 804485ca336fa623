"""Admission and progress as deployed: two real workers on one Redis, each with its own model (so its
own stream), with the default progress interval: one admits at every step (continuous batching) with
a long batch wait, the other only into an empty batch (LDM_ADMISSION=batch, the baseline of
bench/mixed.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.queue.states import JobStatus
from service.queue.store import JobStore, connect
from service.settings import WorkerSettings

from .redis_server import RedisServer
from .test_worker import wait_done, wait_step
from .workers import SPEC, WorkerProcess, job, write_tiny_model

pytestmark = pytest.mark.slow
STEP, BATCH = "tiny-step", "tiny-batch"
LONG_WAIT_MS = 3000  # far longer than a lone job may be held when nothing else is queued
DEFAULT_INTERVAL_MS = str(WorkerSettings.model_fields["progress_interval_ms"].default)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStore]:
    folder = tmp_path_factory.mktemp("admission")
    server = RedisServer(folder / "redis")
    server.start()
    model = write_tiny_model(folder / "model")
    env = {"LDM_PROGRESS_INTERVAL_MS": DEFAULT_INTERVAL_MS}
    workers = [
        WorkerProcess("step", server.url, {STEP: model}, folder, max_wait_ms=LONG_WAIT_MS, env=env),
        WorkerProcess("batch", server.url, {BATCH: model}, folder, env={**env, "LDM_ADMISSION": "batch"}),
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(server.client())
        client = connect(server.url)
        yield JobStore(client, result_ttl_s=600)
        client.close()
    finally:
        for worker in workers:
            worker.stop()
            print(worker.log()[-3000:])  # shown when a test fails
        server.kill()


def test_a_lone_job_does_not_wait_for_batch_mates_that_cannot_come(store: JobStore) -> None:
    job_id = store.enqueue(STEP, job(SPEC))
    [state] = wait_done(store, [job_id])
    assert state.status == JobStatus.SUCCEEDED and state.started is not None
    assert state.started - state.created < LONG_WAIT_MS / 1000 / 3


def test_progress_is_throttled_and_ends_with_the_last_step(store: JobStore) -> None:
    job_id = store.enqueue(STEP, job({**SPEC, "steps": 150}))
    [state] = wait_done(store, [job_id])
    assert state.status == JobStatus.SUCCEEDED and state.step == 150
    events = [e for _, e in store.events(job_id)]
    steps = [int(e["step"]) for e in events if e["type"] == "progress"]
    assert [e["type"] for e in events][-2:] == ["progress", "succeeded"] and steps[-1] == 150
    assert steps == sorted(set(steps)) and len(steps) < 150  # increasing, and not one per step


def test_step_admission_joins_the_running_batch_at_once(store: JobStore) -> None:
    long = store.enqueue(STEP, job({**SPEC, "steps": 150}))
    wait_step(store, long, 3)
    short = store.enqueue(STEP, job({**SPEC, "steps": 4}))
    long_state, short_state = wait_done(store, [long, short])
    assert long_state.status == short_state.status == JobStatus.SUCCEEDED
    assert short_state.finished is not None and long_state.finished is not None
    assert short_state.finished < long_state.finished  # it joined, and left first


def test_batch_admission_waits_for_the_batch_to_end(store: JobStore) -> None:
    long = store.enqueue(BATCH, job({**SPEC, "steps": 150}))
    wait_step(store, long, 3)
    short = store.enqueue(BATCH, job({**SPEC, "steps": 4}))
    long_state, short_state = wait_done(store, [long, short])
    assert long_state.status == short_state.status == JobStatus.SUCCEEDED
    assert short_state.started is not None and long_state.finished is not None
    assert short_state.started >= long_state.finished
