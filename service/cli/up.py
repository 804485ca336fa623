"""`ldm up`: the whole service on one machine: a local Redis (unless one is given), the gateway and
workers, each a child process watched and restarted with backoff when it dies. Ctrl-C or SIGTERM stops
everything in order: workers drain (they finish or hand back their batch), then the gateway, then Redis
(which flushes its append-only file)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis
from pydantic import ValidationError

from ..paths import REPO_ROOT
from ..settings import GatewaySettings, WorkerSettings, gateway_settings, worker_settings
from .options import add_models, bad_settings, default, fail, models_value

log = logging.getLogger("ldm.up")
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0  # a child up this long starts its backoff from the beginning again
USAGE_ERROR = 2  # what `ldm` subcommands exit with on bad settings: restarting would not help


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        # A session of its own: the terminal's Ctrl-C reaches `ldm up` only, which stops children in order.
        self.process = subprocess.Popen(self.args, env=self.env, start_new_session=True)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("%s started (pid %d)", self.name, self.process.pid)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after timeout_s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            code = self.process.wait(timeout=timeout_s)
            log.info("%s stopped (exit code %d)", self.name, code)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait(timeout=10)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "up",
        help="run the service locally: Redis, the gateway and a worker",
        description=(
            "Start a local redis-server (data in --data-dir, append-only file on, loopback only) unless "
            "LDM_REDIS_URL or REDIS_URL is set, the gateway, and workers with the models; restart what "
            "dies. Ctrl-C or SIGTERM stops everything (workers drain). Other settings: LDM_... variables."
        ),
    )
    add_models(p, "model to serve (repeatable; default: the bundled demo model as 'shapes')")
    p.add_argument(
        "--host",
        default=default(GatewaySettings, "host"),
        help="address of HTTP and gRPC (default: %(default)s)",
    )
    p.add_argument(
        "--http-port", type=int, default=default(GatewaySettings, "http_port"), help="default: %(default)s"
    )
    p.add_argument(
        "--grpc-port", type=int, default=default(GatewaySettings, "grpc_port"), help="default: %(default)s"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=default(WorkerSettings, "metrics_port"),
        help="first worker's /metrics port, the next ones count up; 0: off (default: %(default)s)",
    )
    p.add_argument(
        "--redis-port", type=int, default=6379, help="port of the local Redis (default: %(default)s)"
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="folder of LoRA adapters for the gateway and workers (env LDM_LORA_DIR; default: none)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=REPO_ROOT / ".local" / "redis",
        help="the local Redis's folder (default: .local/redis)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = gateway_settings(models=models_value(args.model), redis_url="redis://unused")
    except ValidationError as e:
        return bad_settings("up", e)
    missing = [f"{name} ({path})" for name, path in settings.models.items() if not Path(path).exists()]
    if missing and args.workers:
        return fail(
            "up", f"model not found: {', '.join(missing)}; train the demo model (README) or pass --model"
        )
    ports = [args.http_port, args.grpc_port] + ([] if _redis_url() else [args.redis_port])
    busy = [port for port in ports if port and not _port_free(args.host, port)]
    if busy:
        return fail(
            "up", f"port {busy[0]} is in use (another `ldm up`, or a Redis: set LDM_REDIS_URL to use it)"
        )

    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stopping:
            log.info("%s: stopping (workers drain first)", signal.Signals(signum).name)
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    env = {k: v for k, v in os.environ.items() if k != "LDM_MODELS"}  # children get --model arguments
    redis_child = None
    redis_url = _redis_url()
    if redis_url is None:
        redis_child = _redis_child(args, env)
        redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
        redis_child.start()
        if not _wait_redis(redis_url, redis_child, stopping):
            redis_child.stop(10)
            return 1 if not stopping else 0
    env["LDM_REDIS_URL"] = redis_url
    if args.lora_dir is not None:
        env["LDM_LORA_DIR"] = str(args.lora_dir.resolve())
    log.info("redis: %s", redis_url)
    children = _service_children(args, settings.models, env)
    for child in children:
        child.start()
    code = _supervise(children + ([redis_child] if redis_child else []), stopping)
    grace = worker_settings(models=settings.models).drain_grace_s + 10.0
    for group in (
        [c for c in children if c.name.startswith("worker")],
        [c for c in children if c.name == "gateway"],
    ):
        for child in group:
            if child.process is not None and child.poll() is None:
                child.process.terminate()
        for child in group:
            child.stop(grace)
    if redis_child is not None:
        redis_child.stop(10)
    log.info("stopped")
    return code


def _supervise(children: list[Child], stopping: list[int]) -> int:
    """Restarts children that die, with backoff, until a signal; USAGE_ERROR if one cannot start at all."""
    while not stopping:
        now = time.monotonic()
        for child in children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                continue
            code = child.poll()
            if code is None:
                continue
            if code == USAGE_ERROR and now - child.started < 5:
                log.error("%s cannot start (exit code %d): stopping", child.name, code)
                return USAGE_ERROR
            child.failures = 0 if now - child.started > STABLE_S else child.failures + 1
            delay = BACKOFF_S[min(child.failures, len(BACKOFF_S) - 1)]
            log.warning("%s exited with code %d; restarting in %.0f s", child.name, code, delay)
            child.restart_at = now + delay
        time.sleep(0.2)
    return 0


def _service_children(args: argparse.Namespace, models: dict[str, Path], env: dict[str, str]) -> list[Child]:
    ldm = [sys.executable, "-m", "service.cli.main"]
    model_args = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    gateway = [*ldm, "gateway", "--host", args.host, "--http-port", str(args.http_port)]
    children = [Child("gateway", [*gateway, "--grpc-port", str(args.grpc_port), *model_args], env)]
    for i in range(args.workers):
        port = args.metrics_port + i if args.metrics_port else 0
        worker = [*ldm, "worker", *model_args, "--metrics-port", str(port)]
        children.append(Child(f"worker {i}", worker, env))
    return children


def _redis_child(args: argparse.Namespace, env: dict[str, str]) -> Child:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("ldm up: error: redis-server is not installed (./dev setup installs it)")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    command = [server, "--port", str(args.redis_port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
    command += ["--dir", str(args.data_dir.resolve()), "--save", ""]
    command += ["--appendonly", "yes", "--appendfsync", "always"]  # an accepted job survives a crash
    return Child("redis", command, env)


def _wait_redis(url: str, child: Child, stopping: list[int], timeout_s: float = 30) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while not stopping and time.monotonic() < deadline and child.poll() is None:
        try:
            if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                return True
        except redis.ConnectionError:
            pass
        time.sleep(0.1)
    log.error("redis-server did not start (see its output above)")
    return False


def _redis_url() -> str | None:
    return os.environ.get("LDM_REDIS_URL") or os.environ.get("REDIS_URL") or None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
