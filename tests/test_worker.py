"""One real `ldm worker` process on a tiny random model, fed through a real Redis: batching,
progress, invalid jobs, cancel, expiry, metrics. Fault tolerance is in test_worker_faults.py."""

from __future__ import annotations

import io
import re
import time
import urllib.request
from collections.abc import Iterator

import pytest
from PIL import Image

from service.queue import keys
from service.queue.scripts import SCRIPTS
from service.queue.states import JobState, JobStatus
from service.queue.store import JobStore, connect

from .redis_server import RedisServer, free_port
from .workers import SPEC, WorkerProcess, job, wait_for, write_tiny_model

pytestmark = pytest.mark.slow
MODEL = "tiny"


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
    worker = WorkerProcess("w1", server.url, {MODEL: model}, folder, max_batch=4, metrics_port=free_port())
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


def wait_done(store: JobStore, job_ids: list[str], timeout_s: float = 60) -> list[JobState]:
    def states() -> list[JobState] | None:
        got = [store.get(i) for i in job_ids]
        return [s for s in got if s is not None] if all(s and s.status.terminal for s in got) else None

    return wait_for(states, timeout_s, f"{len(job_ids)} jobs to end")


def wait_step(store: JobStore, job_id: str, step: int, timeout_s: float = 30) -> None:
    def reached() -> bool:
        state = store.get(job_id)
        return state is not None and state.status == JobStatus.RUNNING and state.step >= step

    wait_for(reached, timeout_s, f"job {job_id} to reach step {step}")


def test_jobs_succeed_with_progress_and_one_png_each(store: JobStore) -> None:
    job_ids = [
        store.enqueue(MODEL, job({**SPEC, "seed": i, "prompt": f"a red circle {i}"})) for i in range(4)
    ]
    for state in wait_done(store, job_ids):
        assert state.status == JobStatus.SUCCEEDED, state.error
        assert state.results == 1 and state.step == state.steps == 6
        assert state.started is not None and state.finished is not None
    data = store.result(job_ids[0])
    assert data is not None
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (32, 32)
    assert "Seed: 0" in image.info["parameters"]
    events = [e for _, e in store.events(job_ids[0])]
    assert [e["type"] for e in events] == ["queued", "running", *["progress"] * 6, "succeeded"]
    assert [e["step"] for e in events if e["type"] == "progress"] == [str(i) for i in range(1, 7)]


def test_a_new_job_joins_the_running_batch(store: JobStore) -> None:
    long = store.enqueue(MODEL, job({**SPEC, "steps": 60}))
    wait_step(store, long, 3)
    short = store.enqueue(MODEL, job({**SPEC, "steps": 4}))
    long_state, short_state = wait_done(store, [long, short])
    assert long_state.status == short_state.status == JobStatus.SUCCEEDED
    assert short_state.started is not None and long_state.finished is not None
    # The short job joined while the long one was mid-way, and left first.
    assert short_state.finished is not None and short_state.finished < long_state.finished
    assert long_state.step == 60


def test_a_small_spec_rides_in_its_entry_and_the_hash_decides(store: JobStore, server: RedisServer) -> None:
    """The worker prepares a job from the spec in its entry while the claim is on its way; what the
    claim answers (the hash's spec) is what runs."""
    client = server.client()
    plain = store.enqueue(MODEL, job({**SPEC, "seed": 2}))
    entry = client.hget(keys.job(plain), "entry")
    [(_, fields)] = client.xrange(keys.jobs(MODEL), entry, entry)
    assert fields[b"spec"] == client.hget(keys.job(plain), "spec")
    wait_done(store, [plain])
    # The same job, its entry swapped for one whose spec says seed 1, in one transaction: the worker's
    # blocked read is served after it, with the swapped entry.
    call = store.enqueue_call(MODEL, [job({**SPEC, "seed": 2})])
    wanted, stream = call.job_ids[0], keys.jobs(MODEL)
    forged = f"{int(time.time() * 1000) + 60_000}-0"
    with client.pipeline(transaction=True) as pipe:
        client.register_script(SCRIPTS["enqueue"])(keys=call.keys, args=call.args, client=pipe)
        pipe.xtrim(stream, maxlen=0)  # the earlier jobs have ended: only this one's entry goes
        pipe.xadd(stream, {"job": wanted, "spec": job({**SPEC, "seed": 1}).to_json()}, id=forged)
        pipe.hset(keys.job(wanted), "entry", forged)
        pipe.execute()
    (state,) = wait_done(store, [wanted])
    assert state.status == JobStatus.SUCCEEDED, state.error
    assert store.result(wanted) == store.result(plain)  # seed 2, not the entry's seed 1
    # A spec with an image in it stays out of the entry.
    big = store.enqueue(MODEL, job({**SPEC, "init_image": b"\x89PNG" + bytes(4000)}))
    entry = client.hget(keys.job(big), "entry")
    assert all(b"spec" not in f for _, f in client.xrange(keys.jobs(MODEL), entry, entry))
    assert wait_done(store, [big])[0].status == JobStatus.FAILED  # not a readable PNG


def test_an_invalid_job_fails_alone(store: JobStore, server: RedisServer) -> None:
    good = [store.enqueue(MODEL, job({**SPEC, "seed": i})) for i in range(2)]
    bad_sampler = store.enqueue(MODEL, job({**SPEC, "sampler": "nope"}))
    bad_size = store.enqueue(MODEL, job({**SPEC, "width": 33}))
    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes([0, 0, 0, 32, 0, 0, 0, 32])  # 32x32, then junk
    broken_png = store.enqueue(MODEL, job({**SPEC, "init_image": header + b"not really"}))
    # A spec that bypassed validation (someone wrote to Redis directly): the worker checks it too.
    raw = "f" * 32
    client = server.client()
    now = time.time()
    fields = {"id": raw, "model": MODEL, "spec": '{"prompt": "x", "steps": -1}', "status": "queued"}
    fields |= {"created": now, "deadline": now + 60, "attempt": 0, "handed_back": 0}
    client.hset(keys.job(raw), mapping=fields)
    client.xadd(keys.jobs(MODEL), {"job": raw})
    job_ids = [*good, bad_sampler, bad_size, broken_png, raw]
    states = dict(zip(job_ids, wait_done(store, job_ids), strict=True))
    for job_id in good:
        assert states[job_id].status == JobStatus.SUCCEEDED
    assert states[bad_sampler].status == JobStatus.FAILED
    assert states[bad_sampler].error.startswith("sampler: unknown sampler 'nope'")
    assert states[bad_size].error == "width: must be a multiple of 2 for this model, got 33"
    assert states[broken_png].error.startswith("init_image: not a readable PNG")
    assert states[raw].error.startswith("steps: Input should be greater than or equal to 1")
    last = store.events(bad_sampler)[-1][1]
    assert (last["type"], last["error"]) == ("failed", states[bad_sampler].error)


def test_a_poison_member_fails_alone_and_its_batch_mates_finish(store: JobStore) -> None:
    """A step that raises is tried again in halves down to members alone: only the member that breaks
    the UNet call fails."""
    mates = [store.enqueue(MODEL, job({**SPEC, "seed": i, "steps": 8})) for i in range(2)]
    poison = store.enqueue(MODEL, job({**SPEC, "prompt": "__poison_step__", "steps": 8}))
    mates.append(store.enqueue(MODEL, job({**SPEC, "seed": 9, "steps": 8})))
    *states, poisoned = wait_done(store, [*mates, poison])
    assert [s.status for s in states] == [JobStatus.SUCCEEDED] * 3
    assert poisoned.status == JobStatus.FAILED and poisoned.error.startswith("denoising failed: ")
    assert poisoned.attempt == 1  # failed, not redelivered: it broke the model, not the worker


def test_cancel_leaves_the_batch_at_a_step_boundary(store: JobStore) -> None:
    doomed = store.enqueue(MODEL, job({**SPEC, "steps": 400}))
    mate = store.enqueue(MODEL, job({**SPEC, "steps": 40}))
    wait_step(store, doomed, 3)
    assert store.cancel(doomed) == JobStatus.CANCELLED
    doomed_state, mate_state = wait_done(store, [doomed, mate])
    assert doomed_state.status == JobStatus.CANCELLED and mate_state.status == JobStatus.SUCCEEDED
    assert store.result(doomed) is None
    time.sleep(0.3)
    events = [e for _, e in store.events(doomed)]
    assert events[-1]["type"] == "cancelled"  # no progress published after the cancel
    state = store.get(doomed)
    assert state is not None and state.step < 400
    assert store.backlog(MODEL) == 0  # the worker released the delivery


def test_a_job_past_its_deadline_is_expired_not_run(store: JobStore) -> None:
    # A 64x64 job holds the batch; a 32x32 job cannot join it and expires while it waits.
    blocker = store.enqueue(MODEL, job({**SPEC, "width": 64, "height": 64, "steps": 500}))
    wait_step(store, blocker, 2)
    late = store.enqueue(MODEL, job(SPEC), timeout_s=0.2)
    [late_state] = wait_done(store, [late])
    store.cancel(blocker)
    assert late_state.status == JobStatus.EXPIRED and late_state.started is None
    assert late_state.error == "deadline passed before the job started"
    assert [e["type"] for _, e in store.events(late)] == ["queued", "expired"]
    assert store.result(late) is None
    wait_done(store, [blocker])


def test_metrics_are_served(store: JobStore, worker: WorkerProcess) -> None:
    job_id = store.enqueue(MODEL, job(SPEC))
    wait_done(store, [job_id])
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for name in (
        "ldm_batch_size_bucket",
        "ldm_step_seconds_bucket",
        "ldm_queue_wait_seconds_bucket",
        "ldm_inference_seconds_bucket",
        "ldm_images_total",
        'ldm_jobs_total{status="succeeded"}',
        "ldm_jobs_reclaimed_total",
        "ldm_jobs_dead_lettered_total",
        "ldm_worker_busy_ratio",
        "ldm_queue_backlog",
        "# TYPE ldm_gpu_memory_bytes gauge",
    ):
        assert name in text, name
    images = re.search(r"^ldm_images_total (\S+)$", text, re.MULTILINE)
    assert images is not None and float(images.group(1)) >= 1


def test_worker_heartbeat(store: JobStore, worker: WorkerProcess, server: RedisServer) -> None:
    assert worker.name in store.workers()
    assert 0 < server.client().pttl(keys.worker(worker.name)) <= 1000


def test_cli_refuses_a_bad_model_option() -> None:
    from service.cli.main import main

    assert main(["worker", "--model", "no-equals-sign"]) == 2
    assert main(["worker", "--model", "bad name!=x", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
