"""Delivery guarantees with real worker processes and a real Redis: a worker killed mid-batch, a
poison job, a Redis restart, a SIGTERM drain, a stuck loop. Every job that was accepted ends with
one result."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.queue import keys
from service.queue.states import JobState, JobStatus
from service.queue.store import JobStore, connect

from .redis_server import RedisServer, free_port
from .workers import SPEC, WorkerProcess, job, wait_for, write_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def model(folder: Path) -> Path:
    return write_tiny_model(folder / "model")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder / "redis")
    server.start()
    yield server
    server.kill()


class Fleet:
    """The workers a test started; all killed at teardown, their logs printed (shown on failure)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.workers: list[WorkerProcess] = []

    def add(self, name: str, server: RedisServer, models: dict[str, Path], **kwargs: object) -> WorkerProcess:
        worker = WorkerProcess(name, server.url, models, self.folder, **kwargs)  # type: ignore[arg-type]
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
            print(f"===== {worker.name}\n{worker.log()[-4000:]}")


@pytest.fixture
def fleet(folder: Path) -> Iterator[Fleet]:
    fleet = Fleet(folder)
    yield fleet
    fleet.close()


def states(store: JobStore, job_ids: list[str]) -> list[JobState]:
    got = [store.get(i) for i in job_ids]
    assert all(s is not None for s in got)
    return [s for s in got if s is not None]


def wait_done(store: JobStore, job_ids: list[str], timeout_s: float, tick: object = None) -> list[JobState]:
    def done() -> list[JobState] | None:
        if callable(tick):
            tick()
        now = states(store, job_ids)
        return now if all(s.status.terminal for s in now) else None

    return wait_for(done, timeout_s, f"{len(job_ids)} jobs to end", every_s=0.1)


def assert_one_result_each(store: JobStore, finals: list[JobState]) -> None:
    for state in finals:
        assert state.status == JobStatus.SUCCEEDED, (state.id, state.status, state.error)
        assert state.results == 1, state
        assert store.result(state.id) is not None


def test_sigkill_mid_batch_loses_nothing(server: RedisServer, model: Path, fleet: Fleet) -> None:
    store = JobStore(connect(server.url))
    victim = fleet.add("kill-a", server, {"k": model}).start()
    survivor = fleet.add("kill-b", server, {"k": model}).start()
    for w in (victim, survivor):
        w.wait_ready(server.client())
    job_ids = [store.enqueue("k", job({**SPEC, "steps": 8, "seed": i})) for i in range(50)]

    def victim_mid_batch() -> bool:
        return any(
            s.status == JobStatus.RUNNING and s.worker == victim.name and s.step >= 2
            for s in states(store, job_ids)
        )

    wait_for(victim_mid_batch, 60, "the victim to be mid-batch")
    victim.signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    finals = wait_done(store, job_ids, timeout_s=90)
    assert_one_result_each(store, finals)
    assert any(s.attempt >= 2 and s.worker == survivor.name for s in finals)  # reclaimed from the victim
    assert store.backlog("k") == 0


def test_a_poison_job_is_dead_lettered_and_the_rest_completes(
    server: RedisServer, model: Path, fleet: Fleet
) -> None:
    store = JobStore(connect(server.url))
    poison = store.enqueue("p", job({**SPEC, "prompt": "__crash_worker__"}))
    others = [store.enqueue("p", job({**SPEC, "seed": i})) for i in range(6)]
    workers = [fleet.add(f"poison-{i}", server, {"p": model}).start() for i in range(2)]
    crashes = []

    def supervise() -> None:  # what Kubernetes does for a crashed pod
        for w in workers:
            if not w.alive:
                crashes.append(w.wait(1))
                w.start()

    finals = wait_done(store, [poison, *others], timeout_s=100, tick=supervise)
    assert crashes == [1, 1, 1]  # one crash per delivery, then dead-lettered
    poisoned = finals[0]
    assert poisoned.status == JobStatus.FAILED
    assert poisoned.error == "dead-lettered: delivered 3 times without finishing"
    assert [d["job"] for d in store.dead_letters("p")] == [poison]
    assert_one_result_each(store, finals[1:])


def test_a_redis_restart_loses_no_accepted_job(tmp_path: Path, model: Path, fleet: Fleet) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = JobStore(connect(server.url))
        worker = fleet.add("restart-w", server, {"r": model}).start().wait_ready(server.client())
        job_ids = [store.enqueue("r", job({**SPEC, "steps": 20, "seed": i})) for i in range(12)]
        wait_for(lambda: any(s.step >= 2 for s in states(store, job_ids)), 60, "jobs to run")
        server.restart(down_s=1.0)  # SIGKILL: only the AOF brings the queue back
        finals = wait_done(store, job_ids, timeout_s=90)
        assert_one_result_each(store, finals)
        assert worker.alive
        assert "redis unavailable" in worker.log() or "progress not published" in worker.log()
    finally:
        server.kill()


def test_sigterm_drains_and_hands_back(server: RedisServer, model: Path, fleet: Fleet) -> None:
    store = JobStore(connect(server.url))
    draining = fleet.add("drain-a", server, {"d": model}, env={"LDM_DRAIN_GRACE_S": "1.5"})
    draining.start().wait_ready(server.client())
    short = [store.enqueue("d", job({**SPEC, "steps": 6, "seed": i})) for i in range(2)]
    long = [store.enqueue("d", job({**SPEC, "steps": 250, "seed": i})) for i in range(2)]
    queued = [store.enqueue("d", job({**SPEC, "seed": i})) for i in range(2)]  # over max_batch: not claimed

    def mid_batch() -> bool:
        return all(s.step >= 3 or s.status.terminal for s in states(store, short + long))

    wait_for(mid_batch, 60, "the batch to be under way")
    # The next worker only reclaims deliveries idle for a minute: it can take the handed-back jobs
    # at once only because the drain back-dated them.
    taker = fleet.add("drain-b", server, {"d": model}, env={"LDM_RECLAIM_IDLE_MS": "60000"})
    signalled = time.monotonic()
    draining.signal(signal.SIGTERM)
    taker.start()
    assert draining.wait(30) == 0
    assert time.monotonic() - signalled < 10
    finals = dict(zip(short + long + queued, wait_done(store, short + long + queued, 90), strict=True))
    assert_one_result_each(store, list(finals.values()))
    for job_id in short:  # finished within the grace period
        assert (finals[job_id].worker, finals[job_id].attempt) == (draining.name, 1)
    for job_id in long:  # handed back, not counted as a failed delivery
        assert (finals[job_id].worker, finals[job_id].handed_back) == (taker.name, 1)
    for job_id in queued:
        assert finals[job_id].worker == taker.name
    assert "draining" not in store.workers()  # signed off


def test_a_stuck_loop_fails_healthz_and_lets_its_jobs_go(
    server: RedisServer, model: Path, fleet: Fleet
) -> None:
    """A loop that stops moving (here it sleeps 4 x LDM_STALL_TIMEOUT_S on admitting the job, as a hung
    device call would) answers 503 on /healthz and stops renewing its heartbeat and its delivery, which
    goes idle for other workers to reclaim; once it moves again, all is well."""
    store, client = JobStore(connect(server.url)), server.client()
    worker = fleet.add(
        "stuck", server, {"s": model}, metrics_port=free_port(), env={"LDM_STALL_TIMEOUT_S": "1"}
    )
    worker.start().wait_ready(client)
    healthz = f"http://127.0.0.1:{worker.metrics_port}/healthz"
    assert http_status(healthz) == 200
    job_id = store.enqueue("s", job({**SPEC, "prompt": "__stall_worker__"}))
    wait_for(lambda: http_status(healthz) == 503, 10, "/healthz to report the stuck loop")
    # The heartbeat goes first (it lives 2/3 of the reclaim window), so that whoever reclaims the
    # delivery sees its holder gone; the delivery, no longer renewed, then idles past the window.
    wait_for(lambda: not client.exists(keys.worker("stuck")), 5, "the heartbeat to expire")

    def idle_ms() -> int:
        [pending] = client.xpending_range(keys.jobs("s"), keys.GROUP, "-", "+", 10)
        return int(pending["time_since_delivered"])

    wait_for(lambda: idle_ms() >= 1000, 5, "the delivery to go idle (any worker may reclaim it)")
    assert metric(worker, "ldm_worker_loop_timestamp_seconds") < time.time() - 1
    [final] = wait_done(store, [job_id], timeout_s=30)
    assert_one_result_each(store, [final])
    assert http_status(healthz) == 200 and worker.alive


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code


def metric(worker: WorkerProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    [value] = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value
