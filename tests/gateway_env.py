"""Real `ldm gateway` processes for service tests (HTTP and gRPC on free loopback ports), and a tiny random
model in the project's own format (config in the safetensors metadata: 32x32, 4 euler steps, f = 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.ldm.checkpoint import save_model
from service.paths import REPO_ROOT

from .redis_server import RedisServer, free_port
from .tiny import build_tiny, tiny_config, write_tokenizer
from .workers import WorkerProcess, wait_for


def write_tiny_own_model(folder: Path) -> Path:
    """A model folder (model.safetensors + tokenizer/) that the gateway reads its defaults from."""
    tokenizer = write_tokenizer(folder / "tokenizer")
    config = tiny_config("sd1")
    unet, vae, text = build_tiny(config, tokenizer, seed=3)
    save_model(folder / "model.safetensors", config, unet, vae, text)
    return folder


class GatewayProcess:
    """`python -m service.cli.main gateway`, its log in a file."""

    def __init__(
        self,
        redis_url: str,
        models: dict[str, Path],
        folder: Path,
        env: dict[str, str] | None = None,
        root: Path = REPO_ROOT,
    ) -> None:
        self.root = root  # the checkout it runs from (a baseline's, for benchmarks)
        self.redis_url = redis_url
        self.models = models
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.log_path = folder / f"gateway-{self.http_port}.log"
        self.env = {"LDM_LOG_LEVEL": "INFO", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 20) -> GatewayProcess:
        args = [sys.executable, "-m", "service.cli.main", "gateway", "--redis-url", self.redis_url]
        args += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        for name, path in self.models.items():
            args += ["--model", f"{name}={path}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env |= {"PYTHONPATH": str(self.root), **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s, "the gateway to be ready", every_s=0.1)
        return self

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def tiny_stack(folder: Path, model: str = "tiny") -> Iterator[tuple[GatewayProcess, RedisServer]]:
    """A real Redis, one worker (batch wait 0) and a gateway serving the tiny model as `model`; their
    logs are printed at the end (pytest shows them when a test fails)."""
    server = RedisServer(folder / "redis")
    server.start()
    path = write_tiny_own_model(folder / "model")
    worker = WorkerProcess("w1", server.url, {model: path}, folder, max_wait_ms=0).start()
    gateway = GatewayProcess(server.url, {model: path}, folder)
    try:
        gateway.start()
        worker.wait_ready(server.client())
        yield gateway, server
    finally:
        worker.stop()
        gateway.stop()
        server.kill()
        print(gateway.log()[-3000:], worker.log()[-3000:])
