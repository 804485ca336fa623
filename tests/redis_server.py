"""A real `redis-server` for service tests: loopback only, a free port, a temp dir, AOF on with
fsync on every write (so that a SIGKILL loses nothing acknowledged), killed at teardown."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(
        self, folder: Path, port: int | None = None, extra: tuple[str, ...] = (), appendfsync: str = "always"
    ) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.skip("redis-server is not installed (./dev setup installs it)")
        self.folder = folder
        self.port = port or free_port()
        self.extra = list(extra)  # more redis-server arguments (e.g. --replicaof HOST PORT)
        self.appendfsync = appendfsync  # "always", as `ldm up` and the deployments run it
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the server writes it while it runs
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                "--protected-mode",
                "yes",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # Ready means the AOF is loaded too.
                if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                    break
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()}")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, down_s: float = 0.5) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)


class SentinelServer:
    """A Redis Sentinel (the same redis-server binary) watching `master` on loopback, with timings cut
    down for tests: down after 500 ms, failover within seconds."""

    def __init__(self, folder: Path, master: str, primary_port: int, quorum: int = 2) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master} 500\n"
            f"sentinel failover-timeout {master} 3000\n"
            f"sentinel parallel-syncs {master} 1\n"
        )
        log = open(folder / "sentinel.log", "ab")  # noqa: SIM115 - the server writes it while it runs
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """The predicate's first truthy value, polled every 0.1 s (Redis errors count as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)
