"""The processes `bench/chaos.py` runs and breaks: redis-server as shipped (append-only file fsynced on
every write), or a primary, a replica and three Sentinels; one `ldm gateway`; several `ldm worker`s
with the demo model. Every fault is a signal to a real process: SIGKILL, SIGSTOP / SIGCONT."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from service.paths import bundled_model
from service.queue import keys
from service.queue.connection import connect
from service.queue.store import text
from tests.gateway_env import GatewayProcess
from tests.redis_server import RedisServer, SentinelServer
from tests.workers import WorkerProcess, wait_for

MODEL = "shapes"
MASTER = "ldm"
SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")  # as deploy/k8s/overlays/prod-ha/redis.conf


@dataclass
class Fault:
    """One fault and when its process was back (wall clock: the jobs' own times compare with it)."""

    kind: str  # worker-kill | worker-stop | redis-kill | primary-kill
    target: str
    start: float
    end: float = 0.0  # the process back (restarted, resumed, failed over)
    detail: str = ""
    notes: dict[str, float] = field(default_factory=dict)


class Cluster:
    def __init__(self, folder: Path, workers: int, *, sentinel: bool, reclaim_ms: int) -> None:
        self.folder = folder
        self.sentinel = sentinel
        self.redis = [RedisServer(folder / "redis")]
        self.sentinels: list[SentinelServer] = []
        self.env: dict[str, str] = {}
        self.reclaim_ms = reclaim_ms
        self.worker_count = workers
        self.workers: list[WorkerProcess] = []
        self.gateway: GatewayProcess | None = None

    # -- start and stop ---------------------------------------------------------------------------

    def start(self) -> None:
        primary = self.redis[0]
        if self.sentinel:  # a returning replica syncs at once (the default waits 5 s for others)
            primary.extra += SYNC_AT_ONCE
        primary.start()
        if self.sentinel:
            replica = RedisServer(
                self.folder / "replica", extra=("--replicaof", "127.0.0.1", str(primary.port), *SYNC_AT_ONCE)
            )
            replica.start()
            self.redis.append(replica)
            wait_for(lambda: _link_up(replica), 20, "the replica to sync")
            self.sentinels = [
                SentinelServer(self.folder / f"sentinel{i}", MASTER, primary.port) for i in range(3)
            ]
            self.env = {
                "LDM_REDIS_SENTINELS": ",".join(s.address for s in self.sentinels),
                "LDM_REDIS_MASTER": MASTER,
                "LDM_REDIS_MIN_REPLICAS": "1",
            }
            wait_for(lambda: self._sentinels_agree(primary.port), 20, "the sentinels to see the replica")
        demo = bundled_model()
        gateway_env = {"LDM_LOG_LEVEL": "WARNING", "LDM_REQUEST_TIMEOUT_S": "120", **self.env}
        self.gateway = GatewayProcess(primary.url, {MODEL: demo}, self.folder, gateway_env)
        worker_env = {
            "LDM_RECLAIM_IDLE_MS": str(self.reclaim_ms),
            "LDM_PROGRESS_INTERVAL_MS": "100",  # the production default, not the tests' every step
            "LDM_LOG_LEVEL": "WARNING",
            **self.env,
        }
        self.workers = [
            WorkerProcess(
                f"chaos{i}", primary.url, {MODEL: demo}, self.folder, max_wait_ms=20, env=worker_env
            )
            for i in range(self.worker_count)
        ]
        for worker in self.workers:
            worker.start()
        self.gateway.start(timeout_s=60)
        for worker in self.workers:
            worker.wait_ready(self.client(), timeout_s=120)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.signal(signal.SIGCONT)
            worker.stop()
        if self.gateway is not None:
            self.gateway.stop()
        for sentinel in self.sentinels:
            sentinel.kill()
        for server in self.redis:
            server.kill()

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    def client(self) -> redis.Redis:
        """A client of the current primary (through the sentinels when there are some)."""
        sentinels = [s.address for s in self.sentinels]
        return connect(self.redis[0].url, 10.0, sentinels=sentinels, master=MASTER)

    # -- faults -----------------------------------------------------------------------------------

    def kill_worker(self, i: int, down_s: float) -> Fault:
        worker = self.workers[i]
        fault = Fault("worker-kill", worker.name, time.time())
        worker.stop()  # SIGKILL
        time.sleep(down_s)
        worker.start()
        self.wait_started(worker)
        fault.end = time.time()
        return fault

    def stop_worker(self, i: int, stopped_s: float) -> Fault:
        """SIGSTOP past the reclaim window (its jobs go to others), then SIGCONT: whatever it finishes
        late must be refused (fencing), not stored as a second result."""
        worker = self.workers[i]
        fault = Fault("worker-stop", worker.name, time.time(), detail=f"{stopped_s:.1f} s")
        worker.signal(signal.SIGSTOP)
        time.sleep(stopped_s)
        worker.signal(signal.SIGCONT)
        fault.end = time.time()
        return fault

    def kill_redis(self, down_s: float) -> Fault:
        """SIGKILL the one Redis and start it again from its append-only file, same port."""
        server = self.redis[0]
        fault = Fault("redis-kill", f"redis:{server.port}", time.time())
        server.kill()
        time.sleep(down_s)
        server.start(timeout_s=60)
        fault.end = time.time()
        return fault

    def kill_primary(self) -> Fault:
        """SIGKILL the primary Sentinel names; wait for the failover, then start the old primary again
        from its files as a replica of the new one (as deploy/k8s/overlays/prod-ha's start-redis.sh
        does: asked, the Sentinels name the new primary)."""
        port = self._master_port()
        server = next(s for s in self.redis if s.port == port)
        fault = Fault("primary-kill", f"redis:{port}", time.time())
        server.kill()
        wait_for(lambda: self._master_port() not in (None, port), 60, "Sentinel to fail over", every_s=0.05)
        fault.notes["failed over"] = time.time() - fault.start
        server.extra = ["--replicaof", "127.0.0.1", str(self._master_port()), *SYNC_AT_ONCE]
        server.start(timeout_s=60)
        wait_for(lambda: _link_up(server), 60, "the old primary to rejoin as a replica", every_s=0.1)
        fault.end = time.time()
        fault.detail = f"to :{self._master_port()}"
        return fault

    def _master_port(self) -> int | None:
        for sentinel in self.sentinels:
            try:
                client = redis.Redis(port=int(sentinel.address.rsplit(":", 1)[1]), socket_timeout=1)
                host_port: Any = client.sentinel_get_master_addr_by_name(MASTER)
                client.close()
                if host_port:
                    return int(host_port[1])
            except redis.RedisError:
                continue
        return None

    def _sentinels_agree(self, port: int) -> bool:
        for sentinel in self.sentinels:
            client = redis.Redis(port=int(sentinel.address.rsplit(":", 1)[1]), socket_timeout=1)
            try:
                info: Any = client.sentinel_master(MASTER)
                if int(info.get("port", 0)) != port or int(info.get("num-slaves", 0)) < 1:
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def busy_workers(self) -> list[int]:
        """The workers holding deliveries now (the consumer group's pending entries, per consumer)."""
        try:
            client = self.client()
            pending: Any = client.xpending(keys.jobs(MODEL), keys.GROUP)
            client.close()
        except redis.RedisError:
            return []
        held = {text(c["name"]) for c in pending.get("consumers", []) if int(c["pending"]) > 0}
        return [i for i, w in enumerate(self.workers) if w.name in held]

    def wait_started(self, worker: WorkerProcess) -> None:
        """Until the heartbeat is the new process's (the killed one's lives on for its TTL)."""
        assert worker.process is not None
        pid = worker.process.pid

        def beating() -> bool:
            if not worker.alive:
                raise RuntimeError(f"worker {worker.name} exited:\n{worker.log()[-2000:]}")
            try:
                client = self.client()
                beat = client.get(keys.worker(worker.name))
                client.close()
            except redis.RedisError:
                return False
            return bool(beat) and json.loads(cast(bytes, beat)).get("pid") == pid

        wait_for(beating, 120, f"worker {worker.name} to start")

    def all_up(self) -> bool:
        """Every worker's heartbeat is live and Redis answers."""
        try:
            client = self.client()
            alive = all(client.exists(keys.worker(w.name)) for w in self.workers)
            client.close()
            return alive
        except redis.RedisError:
            return False


def _link_up(server: RedisServer) -> bool:
    try:
        info = server.client().info("replication")
    except redis.RedisError:
        return False
    return info.get("role") == "slave" and info.get("master_link_status") == "up"
