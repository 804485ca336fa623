"""Typed settings (pydantic-settings). Every field reads the environment variable `LDM_<FIELD>`
(for example `LDM_REDIS_URL`, `LDM_MAX_BATCH`); the defaults below are the documented ones. Settings
objects are built by the functions at the bottom, never at import time."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .ldm.config import DECODE_TILE
from .ldm.request import (
    MAX_INPUT_PIXELS,
    MAX_LORAS,
    MAX_N,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_STEPS,
    MAX_UPSCALE_PIXELS,
    MODEL_NAME,
    Limits,
)
from .paths import DEMO_MODEL_NAME, DEMO_UPSCALER_NAME, bundled_model, bundled_upscaler


class QueueSettings(BaseSettings):
    """What every user of the job queue shares: the worker and the gateway."""

    model_config = SettingsConfigDict(env_prefix="LDM_", extra="forbid")

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: Any) -> Any:
        return (
            [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value
        )

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the Redis holding the job queue")
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Redis Sentinel addresses, host:port,... (then the primary is the one they name for "
        "redis_master, and redis_url is not used)",
    )
    redis_master: str = Field("ldm", description="the primary's name in Sentinel")
    redis_min_replicas: int = Field(
        0, ge=0, description="replicas that must confirm an accepted job, a cancel or a result (WAIT)"
    )
    redis_wait_ms: int = Field(1000, ge=1, description="how long a write waits for those replicas")
    redis_max_connections: int = Field(
        1000,
        ge=8,
        description="connections a gateway may hold to Redis (each synchronous request waiting for its "
        "images holds one); past it a request waits up to 5 s for one, then gets 503",
    )
    result_ttl_s: int = Field(3600, ge=1, description="how long results, job hashes and events outlive a job")
    job_timeout_s: float = Field(
        600.0, gt=0, description="default deadline: a job not started within this is expired, not run"
    )
    max_backlog: int = Field(
        1000, ge=0, description="queued plus running jobs per model before enqueue refuses"
    )
    max_backlog_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="bytes of job specs and input images per model (jobs queued or running) before enqueue "
        "refuses with 503; a third of a 192 MB Redis maxmemory, leaving room for results and events. A "
        "request alone always fits",
    )
    idempotency_ttl_s: int = Field(
        24 * 3600, ge=1, description="how long an Idempotency-Key keeps answering with the same jobs"
    )
    max_deliveries: int = Field(
        3, ge=1, description="deliveries without finishing before a job is dead-lettered and failed"
    )
    test_faults: bool = Field(
        False, description="tests only: lets magic prompts crash a worker; never set it in production"
    )
    lora_dir: Path | None = Field(
        None,
        description="folder of LoRA adapters, <name>.safetensors (the gateway lists and checks them, workers "
        "load them); unset: no adapters",
    )


# LDM_MODELS, read by the worker and the gateway alike: `shapes=models/shapes,sd15=/m/sd15.safetensors`
# or a JSON object `{"shapes": "models/shapes"}`.
Models = Annotated[dict[str, Path], NoDecode]
MODELS_HELP = (
    "models served, name -> checkpoint; env LDM_MODELS='shapes=models/shapes,sd=x.safetensors' or JSON "
    "(default: the demo model, and the demo upscaler shapes-x4 when models/shapes-x4 exists)"
)


def _default_models() -> dict[str, Path]:
    """The demo model, and the demo x4 upscaler when it is there (served at /v1/upscale)."""
    upscaler = bundled_upscaler()
    return {DEMO_MODEL_NAME: bundled_model(), **({DEMO_UPSCALER_NAME: upscaler} if upscaler.is_dir() else {})}


def _parse_models(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    models: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"expected NAME=PATH, got {item!r}")
        models[name.strip()] = path.strip()
    return models


def _parse_aliases(value: Any) -> Any:
    """`dall-e-3=sd15,gpt-image-1` (a bare name: the default model) or a JSON object."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    pairs = (part.partition("=") for part in text.split(",") if part.strip())
    return {alias.strip(): target.strip() for alias, _, target in pairs}


# OpenAI's image models: their names reach the default model unless LDM_MODEL_ALIASES says otherwise.
OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")


def _check_model_names(value: dict[str, Path]) -> dict[str, Path]:
    if not value:
        raise ValueError("at least one model")
    for name in value:
        if not MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (64 at most)")
    return value


# LDM_MAX_BATCH when unset, per device: the knee of images/s against the batch size measured by
# bench/batching.py (docs/batching-cpu.png: on a 2-core CPU the demo model's images/s grows 38% from
# 2 to 4 and 24% from 4 to 8 while its step gets 1.6 times slower, a 24.8M UNet's not at all). The
# cuda figure is the common knee of SD-sized UNets on data-centre GPUs, not measured here yet:
# `python -m bench.batching --device cuda` measures it.
DEFAULT_MAX_BATCH = {"cpu": 4, "cuda": 8}


class WorkerSettings(QueueSettings):
    """`ldm worker`: one process per GPU, its models held warm."""

    models: Models = Field(default_factory=_default_models, description=MODELS_HELP)
    worker_name: str = Field("", description="consumer name in the group; empty: host-pid")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] | None = Field(
        None,
        description="default: fp32 on cpu, fp16 on cuda; auto: bf16 on a CPU with AMX (amx_bf16), else as "
        "the default (bf16 without AMX ran slower than fp32: bench/README.md)",
    )
    channels_last: bool | None = Field(
        None,
        description="UNet and VAE in channels-last (NHWC) memory format; default: on for cpu (oneDNN's "
        "convolutions prefer it), off for cuda; the images are the same to ~1e-6",
    )
    compile: bool = Field(
        False,
        description="torch.compile (inductor) the UNet, batches padded up to power-of-two buckets: the first "
        "step of each bucket and latent size compiles (a minute or more on a CPU); on a CPU later calls "
        "were only 2% faster (bench/README.md)",
    )
    max_batch: int = Field(
        0,
        ge=0,
        description="most images denoised together; 0 = the device's default, where images/s stops "
        "growing with the batch (bench/batching.py): 4 on cpu, 8 on cuda",
    )
    max_wait_ms: float = Field(
        50.0,
        ge=0,
        description="longest a lone job waits for batch-mates (with step admission, not at all when its "
        "model's stream holds nothing else)",
    )
    admission: Literal["step", "batch"] = Field(
        "step",
        description="step: jobs join the running batch at any step boundary (continuous batching); batch: "
        "only an empty batch (a batch runs to its end first; the baseline of bench/mixed.py)",
    )
    progress_interval_ms: float = Field(
        100.0,
        ge=0,
        description="a running job's progress is published at most this often (and its last step with its "
        "result); jobs that arrive meanwhile still join at the next step; 0 = every step",
    )
    decode_tile: int = Field(
        DECODE_TILE,
        ge=8,
        description="latents per side of a decoding tile: larger latents are decoded in overlapping tiles "
        "(bounded memory for the x4 upscaler's 2048x2048 outputs)",
    )
    pixel_budget: int = Field(
        32768, ge=1, description="most latent pixels (h/f * w/f summed over members) in one batch"
    )
    reclaim_idle_ms: int = Field(
        15000, ge=100, description="a delivery idle this long is taken to belong to a dead worker"
    )
    drain_grace_s: float = Field(
        20.0, ge=0, description="on SIGTERM, time to finish the batch before handing back"
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="the loop not moving for this long (a hung device call, a deadlock) marks the worker "
        "stuck: /healthz answers 503 and its jobs and heartbeat are no longer renewed, so other workers "
        "take them over; longer than the slowest step or decode",
    )
    metrics_port: int = Field(9400, ge=0, le=65535, description="port of /metrics and /healthz (0 = off)")
    metrics_host: str = Field("0.0.0.0", description="address /metrics listens on")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default)")
    lora_cache_mb: int = Field(
        1024, ge=1, description="most memory the loaded LoRA adapters hold per model (least recently used go)"
    )

    _parse_models = field_validator("models", mode="before")(_parse_models)
    _names = field_validator("models")(_check_model_names)

    @model_validator(mode="after")
    def _device_batch(self) -> WorkerSettings:
        if self.max_batch == 0:
            self.max_batch = DEFAULT_MAX_BATCH[self.device]
        return self

    @property
    def name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}-{os.getpid()}"


class GatewaySettings(QueueSettings):
    """`ldm gateway`: HTTP and gRPC in front of the queue (no torch). Limits are checked before anything
    is enqueued; the model's own constraints (size multiple, native size) come from its checkpoint's
    header."""

    models: Models = Field(default_factory=_default_models, description=MODELS_HELP)
    host: str = Field("127.0.0.1", description="address HTTP and gRPC listen on (0.0.0.0 in a container)")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (REST, SSE, /metrics, /docs)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = no gRPC server)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated API keys; empty: no authentication"
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="longest a synchronous request waits for its images before 504"
    )
    max_prompt_chars: int = Field(
        1000, ge=1, le=MAX_PROMPT_CHARS, description="longest prompt or negative prompt"
    )
    max_steps: int = Field(150, ge=1, le=MAX_STEPS, description="most denoising steps per image")
    max_side: int = Field(MAX_SIDE, ge=8, le=MAX_SIDE, description="widest width or height, in pixels")
    max_pixels: int = Field(
        1024 * 1024, ge=64, le=MAX_SIDE * MAX_SIDE, description="most pixels (width x height) per image"
    )
    max_n: int = Field(4, ge=1, le=MAX_N, description="most images per request")
    max_loras: int = Field(8, ge=0, le=MAX_LORAS, description="most LoRA adapters per request")
    max_input_pixels: int = Field(
        MAX_INPUT_PIXELS,
        ge=64,
        le=MAX_INPUT_PIXELS,
        description="largest init image or mask (width x height), checked from its header before decoding",
    )
    max_upscale_pixels: int = Field(
        2048 * 2048,
        ge=64,
        le=MAX_UPSCALE_PIXELS,
        description="largest x4 upscale output (16 x the input's pixels; 2048x2048: a 512x512 input), "
        "checked from the image's header before decoding",
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest request body; bigger ones get 413 unread"
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 429 (queue full)")
    access_log: bool = Field(
        False,
        description="log every HTTP request (uvicorn's access log, at INFO); off: /metrics counts them by "
        "route and status, and a burst of refusals costs no log line each",
    )
    expiry_sweep_s: float = Field(
        2.0, gt=0, description="how often queued jobs past their deadline are expired (one gateway at a time)"
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="comment sent on a quiet event stream")
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict.fromkeys(OPENAI_IMAGE_MODELS, ""),
        description="other names for served models, for the OpenAI API (`model`); "
        "'dall-e-3=sd15,gpt-image-1' or JSON, a name without a target means the default model; "
        "default: OpenAI's image model names to the default model",
    )
    url_secret: SecretStr = Field(
        SecretStr(""),
        description="key signing the OpenAI API's image links (HMAC-SHA256); empty: a random one per "
        "process, so links die with it and work only on the gateway that made them",
    )
    url_ttl_s: int = Field(3600, ge=1, description="how long an image link (OpenAI API, webhooks) works")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="key of the webhooks' LDM-Signature (HMAC-SHA256); empty: no webhooks"
    )
    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts webhooks may call: exact names or addresses, or suffixes like .example.com; "
        "private addresses only when named exactly",
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="one webhook attempt's timeout")
    webhook_max_attempts: int = Field(8, ge=1, description="attempts per webhook event before giving up")
    webhook_max_age_s: float = Field(86400.0, gt=0, description="age of an event after which it is given up")
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="wait before the 2nd attempt; doubled for each next one"
    )
    public_url: str = Field(
        "", description="this gateway's address as clients reach it, for image links; empty: the request's"
    )

    _parse_models = field_validator("models", mode="before")(_parse_models)
    _names = field_validator("models")(_check_model_names)
    _parse_aliases = field_validator("model_aliases", mode="before")(_parse_aliases)

    @field_validator("model_aliases")
    @classmethod
    def _aliases_name_served_models(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        models = info.data.get("models", {})
        for alias, target in value.items():
            if target and target not in models:
                raise ValueError(f"alias {alias!r} names {target!r}, which is not in models")
        return value

    def limits(self) -> Limits:
        """The request limits this gateway serves (checked by `service.ldm.request.resolve`)."""
        return Limits(
            self.max_prompt_chars,
            self.max_steps,
            self.max_side,
            self.max_pixels,
            self.max_n,
            self.max_loras,
            self.max_input_pixels,
            self.max_upscale_pixels,
        )

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip().lower() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value


def queue_settings(**overrides: Any) -> QueueSettings:
    """Environment, then the given overrides (None means 'not given')."""
    return QueueSettings(**{k: v for k, v in overrides.items() if v is not None})


def worker_settings(**overrides: Any) -> WorkerSettings:
    """Environment, then the given overrides (None means 'not given'), for example from the CLI."""
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})


def gateway_settings(**overrides: Any) -> GatewaySettings:
    """Environment, then the given overrides (None means 'not given'), for example from the CLI."""
    return GatewaySettings(**{k: v for k, v in overrides.items() if v is not None})


def settings_error(e: ValidationError) -> str:
    """A settings error on one line, naming each setting."""
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
