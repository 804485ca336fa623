"""Real `ldm worker` processes for service tests, on a tiny random model (images are noise)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from service.ldm.request import GenerationRequest
from service.paths import REPO_ROOT
from service.queue import keys

from .tiny import tiny_config, write_sd_checkpoint, write_tokenizer

T = TypeVar("T")

# Small jobs for the tiny model: 32x32 is its native size (latent 16x16); guidance 1 is one UNet row.
SPEC = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 6, "guidance_scale": 1.0}


def job(values: dict[str, object]) -> GenerationRequest:
    """A request as the gateway enqueues it (seed 0 unless given), built without validation so that a
    test can also enqueue what a worker must refuse (an unknown sampler, a broken PNG)."""
    return GenerationRequest.model_construct(**{"seed": 0, **values})  # type: ignore[arg-type]


def write_tiny_model(folder: Path) -> Path:
    write_tokenizer(folder / "tokenizer")
    return write_sd_checkpoint(folder / "tiny.safetensors", tiny_config("sd1"), folder / "tokenizer", seed=3)


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class WorkerProcess:
    """`python -m service.cli.main worker`, its log in a file; fault injection on, threads pinned to
    one (the test machine has two cores), a short reclaim window, progress published every step."""

    def __init__(
        self,
        name: str,
        redis_url: str,
        models: dict[str, Path],
        folder: Path,
        *,
        max_batch: int = 4,
        max_wait_ms: float = 20,
        metrics_port: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.redis_url = redis_url
        self.models = models
        self.log_path = folder / f"worker-{name}.log"
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.metrics_port = metrics_port
        self.env = {
            "LDM_TEST_FAULTS": "1",
            "LDM_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "LDM_RECLAIM_IDLE_MS": "1000",
            "LDM_DRAIN_GRACE_S": "10",
            "LDM_LOG_LEVEL": "INFO",
            "LDM_METRICS_HOST": "127.0.0.1",
            "LDM_PROGRESS_INTERVAL_MS": "0",  # a progress event every step, which tests count
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        args = [sys.executable, "-m", "service.cli.main", "worker", "--redis-url", self.redis_url]
        for model, path in self.models.items():
            args += ["--model", f"{model}={path}"]
        args += ["--name", self.name, "--max-batch", str(self.max_batch)]
        args += ["--max-wait-ms", str(self.max_wait_ms), "--metrics-port", str(self.metrics_port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env |= {"PYTHONPATH": str(REPO_ROOT), **self.env}
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        return self

    def wait_ready(self, client: redis.Redis, timeout_s: float = 60) -> WorkerProcess:
        """Ready once its heartbeat is up: the models are loaded."""

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early:\n{self.log()}")
            return bool(client.exists(keys.worker(self.name)))

        wait_for(ready, timeout_s, f"worker {self.name} to start")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
