"""HTTP request and response bodies, one schema per direction (`...Create` in, `...Public` out).

Request schemas hold the protocol's hard bounds (so they show in the OpenAPI document); the limits
that are settings or depend on the model are checked in `validation.py`, for HTTP and gRPC alike.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ..queue import keys
from ..queue.spec import MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, SEED_LIMIT
from .catalog import SAMPLERS
from .validation import GenerateInput

Sampler = Literal[SAMPLERS]  # type: ignore[valid-type]


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 3.0: accepted as 3 (strings and booleans are still refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict (no "5" for 5, no true for 1), but with JSON Schema's idea of an integer.
Int = Annotated[int, BeforeValidator(_integral)]


class Txt2ImgCreate(BaseModel):
    """Absent fields take the model's defaults (see GET /v1/models); `seed` is chosen when absent."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a large red circle on the left"]
    )
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: Int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels, a multiple of the model's factor")
    height: Int | None = Field(
        None, ge=1, le=MAX_SIDE, description="pixels, a multiple of the model's factor"
    )
    steps: Int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="classifier-free guidance")
    sampler: Sampler | None = None
    seed: Int | None = Field(None, ge=0, lt=SEED_LIMIT, description="image i of n gets seed + i")
    n: Int = Field(1, ge=1, le=64, description="images, one job each (at most LDM_MAX_N)")
    model: str | None = Field(None, pattern=keys.MODEL_NAME.pattern, description="default: the first model")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM's eta (0: deterministic)")

    def to_input(self) -> GenerateInput:
        return GenerateInput(**self.model_dump())


class Img2ImgCreate(Txt2ImgCreate):
    """txt2img's fields plus an init image (and a mask for inpainting: white is repainted); width and
    height default to the init image's."""

    init_image: str = Field(
        description="base64 PNG",
        min_length=1,
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/png"},
    )
    strength: float | None = Field(None, ge=0.0, le=1.0, description="how much of the image is redrawn (0.8)")
    mask: str | None = Field(
        None,
        description="base64 PNG, white is repainted (inpainting)",
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/png"},
    )

    @field_validator("init_image", "mask")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("must be base64 (a PNG image)") from None
        return value

    def to_input(self) -> GenerateInput:
        values = self.model_dump()
        values["init_image"] = base64.b64decode(self.init_image)
        values["mask"] = base64.b64decode(self.mask) if self.mask is not None else None
        return GenerateInput(**values)


class ImagePublic(BaseModel):
    job_id: str
    seed: int
    png_base64: str


class TimingsPublic(BaseModel):
    queue_ms: float = Field(description="longest wait of a job for a worker")
    inference_ms: float = Field(description="longest time a worker spent on a job")
    total_ms: float = Field(description="from the request's arrival to its answer")


class ImagesPublic(BaseModel):
    id: str = Field(description="the first job's id")
    model: str
    job_ids: list[str]
    images: list[ImagePublic]
    timings: TimingsPublic


class JobRef(BaseModel):
    id: str
    seed: int
    location: str


class JobsAccepted(BaseModel):
    """202: one job per image, each followed at its own location."""

    id: str = Field(description="the first job's id (the Location header)")
    model: str
    status: Literal["queued"] = "queued"
    jobs: list[JobRef]


class ProgressPublic(BaseModel):
    step: int
    total: int


class JobPublic(BaseModel):
    id: str
    model: str
    status: str = Field(description="queued, running, succeeded, failed, cancelled or expired")
    queue_position: int | None = Field(None, description="jobs ahead of this one while queued (0: next)")
    progress: ProgressPublic
    created: float
    started: float | None = None
    finished: float | None = None
    error: str = ""
    result: ImagePublic | None = Field(None, description="when succeeded (until its TTL)")


class ModelPublic(BaseModel):
    name: str
    default: bool
    family: str
    width: int = Field(description="native width: the default")
    height: int = Field(description="native height: the default")
    size_multiple: int
    default_steps: int
    default_guidance_scale: float
    default_sampler: str
    samplers: list[str]
    inpainting: bool
    live_workers: int
    source: str = Field(description="where these facts came from: metadata, weights or defaults")


class ModelsPublic(BaseModel):
    models: list[ModelPublic]


class ErrorPublic(BaseModel):
    detail: str
    job_ids: list[str] = Field(default_factory=list)


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    detail: list[ValidationErrorItem]
