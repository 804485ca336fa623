"""HTTP request and response bodies, one schema per direction (`...Create` in, `...Public` out).

The request bodies are the internal request's fields (`service/ldm/request.py`: bounds, defaults and
descriptions live there) plus what HTTP adds (`n`, `model`); the limits that are settings or depend on
the model are checked by `request.resolve`, for every API alike.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..ldm.request import (
    MAX_N,
    MODEL_NAME,
    GenerationRequest,
    ImageFields,
    Int,
    PngImage,
    SDXLFields,
    TextFields,
)
from ..ldm.request_upscale import InputImage, UpscaleFields
from ..queue.states import Webhook
from .openai_schemas import OpenAIModel


class Txt2ImgCreate(TextFields, SDXLFields):
    """Absent fields take the model's defaults (see GET /v1/models); `seed` is chosen when absent."""

    model_config = ConfigDict(strict=True)

    n: Int = Field(default=1, ge=1, le=MAX_N, description="images, one job each (at most LDM_MAX_N)")
    model: str | None = Field(
        default=None, pattern=MODEL_NAME.pattern, description="default: the first model"
    )
    webhook: Webhook | None = Field(
        default=None, description="POST these events of each job to this URL, signed (see the README)"
    )

    def to_request(self) -> GenerationRequest:
        """The internal request (one image; `n` and `model` travel beside it)."""
        return GenerationRequest.model_validate(
            self.model_dump(exclude={"n", "model", "webhook"}, exclude_none=True)
        )


class Img2ImgCreate(Txt2ImgCreate, ImageFields):
    """txt2img's fields plus an init image (and a mask for inpainting: white is repainted); width and
    height default to the init image's."""

    init_image: PngImage = Field(min_length=1, description="base64 PNG")


class UpscaleCreate(Txt2ImgCreate, UpscaleFields):
    """The x4 upscaler: `image` (base64 PNG or JPEG) upscaled 4x, guided by the prompt; the image is
    noised to `noise_level` first. `model` defaults to the first upscaler served."""

    image: InputImage = Field(min_length=1, description="base64 PNG or JPEG, upscaled 4x")


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


class WebhookPublic(BaseModel):
    attempts: int = Field(description="POSTs made so far, over all of the job's events")
    last_status: str = Field(description="the last attempt's HTTP status, or why it failed")
    delivered: int = Field(description="events the receiver accepted (2xx)")


class JobPublic(BaseModel):
    id: str
    model: str
    status: str = Field(description="queued, running, succeeded, failed, cancelled or expired")
    queue_position: int | None = Field(
        default=None, description="jobs ahead of this one while queued (0: next)"
    )
    progress: ProgressPublic
    created: float
    started: float | None = None
    finished: float | None = None
    error: str = ""
    result: ImagePublic | None = Field(default=None, description="when succeeded (until its TTL)")
    webhook: WebhookPublic | None = Field(default=None, description="when the request gave a webhook")


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
    refiner: bool = Field(description="an SDXL refiner: img2img, or the second stage of a base's request")
    task: str = Field(
        description="txt2img (and img2img), inpaint, img2img (a refiner) or upscale (/v1/upscale)"
    )
    live_workers: int
    source: str = Field(description="where these facts came from: metadata, weights or defaults")


class ModelsPublic(BaseModel):
    """The native list (`models`) and, in the same object, OpenAI's (`object`, `data`: the models and
    their aliases), so that OpenAI's SDKs can list models too."""

    models: list[ModelPublic]
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class LoraPublic(BaseModel):
    name: str = Field(description="what a request's `loras[].name` says")
    family: str = Field(description="sd1, sd2, sdxl or unknown (read off its shapes)")
    rank: int
    bytes: int
    layers: int = Field(description="layers it adapts")


class LorasPublic(BaseModel):
    loras: list[LoraPublic]


class ErrorPublic(BaseModel):
    detail: str
    job_ids: list[str] = Field(default_factory=list)


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    detail: list[ValidationErrorItem]
