"""The job spec: one validated request for one image, as it travels through Redis (JSON, images as
base64 PNG). Limits that need the model (size multiples, sampler names, inpainting) are checked by
the worker's engine; its message comes back as the job's error."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PROMPT_CHARS = 4000
MAX_SIDE = 2048
MAX_STEPS = 500
MAX_IMAGE_BYTES = 16 * 1024 * 1024
SEED_LIMIT = 2**63


class JobStatus(StrEnum):
    """`queued -> running -> succeeded | failed | cancelled | expired`; a reclaimed or handed-back job
    goes back to queued. Failed, cancelled and expired can also be reached from queued."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})


class JobSpec(BaseModel):
    """What to draw. None means the model's default; one job is one image."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(None, ge=1, le=MAX_SIDE)
    height: int | None = Field(None, ge=1, le=MAX_SIDE)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    sampler: str | None = Field(None, min_length=1, max_length=32)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    init_image: bytes | None = Field(None, max_length=MAX_IMAGE_BYTES, description="PNG (img2img)")
    mask: bytes | None = Field(None, max_length=MAX_IMAGE_BYTES, description="PNG, white is repainted")
    strength: float = Field(0.8, ge=0.0, le=1.0)

    @field_validator("init_image", "mask")
    @classmethod
    def _png(cls, value: bytes | None) -> bytes | None:
        if value is not None and not value.startswith(PNG_SIGNATURE):
            raise ValueError("must be a PNG image")
        return value

    @field_validator("mask")
    @classmethod
    def _mask_needs_image(cls, value: bytes | None, info: ValidationInfo) -> bytes | None:
        if value is not None and info.data.get("init_image") is None:
            raise ValueError("a mask needs an init image")
        return value


class JobState(BaseModel):
    """A job as its hash reads, for status endpoints and tests."""

    id: str
    model: str
    owner: str = ""
    status: JobStatus
    created: float
    deadline: float
    started: float | None = None
    finished: float | None = None
    attempt: int = 0
    handed_back: int = 0
    step: int = 0
    steps: int = 0
    results: int = 0  # how many results were stored: exactly one for a succeeded job
    worker: str = ""
    error: str = ""
