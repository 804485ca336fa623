"""Typed settings (pydantic-settings). Every field reads the environment variable `LDM_<FIELD>`
(for example `LDM_REDIS_URL`, `LDM_MAX_BATCH`); the defaults below are the documented ones. Settings
objects are built by the functions at the bottom, never at import time."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .paths import DEMO_MODEL_NAME, bundled_model
from .queue import keys


class QueueSettings(BaseSettings):
    """What every user of the job queue shares: the worker and the gateway."""

    model_config = SettingsConfigDict(env_prefix="LDM_", extra="forbid")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the Redis holding the job queue")
    result_ttl_s: int = Field(3600, ge=1, description="how long results, job hashes and events outlive a job")
    job_timeout_s: float = Field(
        600.0, gt=0, description="default deadline: a job not started within this is expired, not run"
    )
    max_backlog: int = Field(
        1000, ge=0, description="queued plus running jobs per model before enqueue refuses"
    )
    max_deliveries: int = Field(
        3, ge=1, description="deliveries without finishing before a job is dead-lettered and failed"
    )
    test_faults: bool = Field(
        False, description="tests only: lets magic prompts crash a worker; never set it in production"
    )


class WorkerSettings(QueueSettings):
    """`ldm worker`: one process per GPU, its models held warm."""

    models: dict[str, Path] = Field(
        default_factory=lambda: {DEMO_MODEL_NAME: bundled_model()},
        description='models served, name -> checkpoint; env as JSON: LDM_MODELS=\'{"shapes": "models/x"}\'',
    )
    worker_name: str = Field("", description="consumer name in the group; empty: host-pid")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="default: fp32 on cpu, fp16 on cuda"
    )
    max_batch: int = Field(8, ge=1, description="most images denoised together")
    max_wait_ms: float = Field(50.0, ge=0, description="longest a lone job waits for batch-mates")
    pixel_budget: int = Field(
        32768, ge=1, description="most latent pixels (h/f * w/f summed over members) in one batch"
    )
    reclaim_idle_ms: int = Field(
        15000, ge=100, description="a delivery idle this long is taken to belong to a dead worker"
    )
    drain_grace_s: float = Field(
        20.0, ge=0, description="on SIGTERM, time to finish the batch before handing back"
    )
    metrics_port: int = Field(9400, ge=0, le=65535, description="port of /metrics (0 = off)")
    metrics_host: str = Field("0.0.0.0", description="address /metrics listens on")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default)")

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, Path]) -> dict[str, Path]:
        if not value:
            raise ValueError("at least one model")
        for name in value:
            if not keys.MODEL_NAME.match(name):
                raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (64 at most)")
        return value

    @property
    def name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}-{os.getpid()}"


def queue_settings(**overrides: Any) -> QueueSettings:
    """Environment, then the given overrides (None means 'not given')."""
    return QueueSettings(**{k: v for k, v in overrides.items() if v is not None})


def worker_settings(**overrides: Any) -> WorkerSettings:
    """Environment, then the given overrides (None means 'not given'), for example from the CLI."""
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})
