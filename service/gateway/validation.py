"""From a generation request, as HTTP and gRPC both give it, to the job specs to enqueue: one per image.

Every limit is checked here, before anything is enqueued: the settings' bounds (prompt length, steps,
sizes, pixels, images per request) and the model's own constraints (sizes multiple of its
autoencoder's factor, samplers, inpainting needs an image and a mask). A refusal names the field.
Fields left out stay out of the spec, so that the worker's engine fills in the model's defaults;
they are checked here with the defaults the catalog read from the checkpoint.
"""

from __future__ import annotations

import math
import secrets
import struct
from dataclasses import dataclass

from pydantic import ValidationError

from ..queue.spec import MAX_IMAGE_BYTES, PNG_SIGNATURE, SEED_LIMIT, JobSpec
from ..settings import GatewaySettings
from .catalog import SAMPLERS, Catalog, ModelInfo
from .errors import InvalidField, NotFound


@dataclass(frozen=True)
class GenerateInput:
    """One request for `n` images, transport-neutral; None means 'the model's default'."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    seed: int | None = None
    n: int = 1
    model: str | None = None
    eta: float | None = None
    init_image: bytes | None = None
    strength: float | None = None
    mask: bytes | None = None


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    specs: list[JobSpec]  # image i has seed `seed + i`

    @property
    def seeds(self) -> list[int]:
        return [int(spec.seed or 0) for spec in self.specs]


def png_size(data: bytes, field: str) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, without decoding the image."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidField(field, "must be a PNG image")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidField(field, f"must be at most {MAX_IMAGE_BYTES} bytes")
    width, height = struct.unpack(">II", data[16:24])
    if not (width and height):
        raise InvalidField(field, "must be a PNG image of positive size")
    return width, height


def plan(request: GenerateInput, catalog: Catalog, settings: GatewaySettings) -> Plan:
    """The specs to enqueue, or InvalidField (422) / NotFound (404, unknown model)."""
    name = request.model if request.model is not None else catalog.default
    model = catalog.get(name)
    if model is None:
        raise NotFound(f"model {name!r} is not served here; see /v1/models")
    _check_text(request, settings)
    if not 1 <= request.n <= settings.max_n:
        raise InvalidField("n", f"must be between 1 and {settings.max_n}, got {request.n}")
    native = (model.native_size, model.native_size)
    if request.init_image is not None:
        native = png_size(request.init_image, "init_image")
    if request.mask is not None:
        if request.init_image is None:
            raise InvalidField("mask", "a mask needs an init image")
        png_size(request.mask, "mask")
    if model.inpainting and (request.init_image is None or request.mask is None):
        raise InvalidField(
            "init_image", f"{model.name} is an inpainting model: give an init image and a mask"
        )
    width = native[0] if request.width is None else request.width
    height = native[1] if request.height is None else request.height
    _check_size(width, height, model, settings)
    steps = model.default_steps if request.steps is None else request.steps
    if not 1 <= steps <= settings.max_steps:
        raise InvalidField("steps", f"must be between 1 and {settings.max_steps}, got {steps}")
    _check_range("guidance_scale", request.guidance_scale, 0.0, 50.0)
    _check_range("eta", request.eta, 0.0, 1.0)
    _check_range("strength", request.strength, 0.0, 1.0)
    if request.sampler is not None and request.sampler not in SAMPLERS:
        raise InvalidField(
            "sampler", f"unknown sampler {request.sampler!r}; choose from {', '.join(SAMPLERS)}"
        )
    seed = request.seed
    if seed is None:  # chosen here so that the n images get seed, seed + 1, ... and the answer says which
        seed = secrets.randbelow(2**32)
    elif seed < 0 or seed + request.n - 1 >= SEED_LIMIT:
        raise InvalidField("seed", f"must be between 0 and 2**63 - n, got {seed}")
    return Plan(model, [_spec(request, seed + i) for i in range(request.n)])


def _check_text(request: GenerateInput, settings: GatewaySettings) -> None:
    if not request.prompt.strip():
        raise InvalidField("prompt", "must not be empty")
    for field, value in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(value) > settings.max_prompt_chars:
            raise InvalidField(
                field, f"must be at most {settings.max_prompt_chars} characters, got {len(value)}"
            )
        if "\x00" in value:
            raise InvalidField(field, "must not contain NUL characters")


def _check_size(width: int, height: int, model: ModelInfo, settings: GatewaySettings) -> None:
    multiple = model.size_multiple
    for field, value in (("width", width), ("height", height)):
        if not multiple <= value <= settings.max_side:
            raise InvalidField(field, f"must be between {multiple} and {settings.max_side}, got {value}")
        if value % multiple:
            raise InvalidField(field, f"must be a multiple of {multiple} for model {model.name}, got {value}")
    if width * height > settings.max_pixels:
        raise InvalidField("width", f"width x height must be at most {settings.max_pixels} pixels")


def _check_range(field: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise InvalidField(field, f"must be between {low:g} and {high:g}, got {value}")


def _spec(request: GenerateInput, seed: int) -> JobSpec:
    given = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "sampler": request.sampler,
        "seed": seed,
        "eta": request.eta,
        "init_image": request.init_image,
        "strength": request.strength,
        "mask": request.mask,
    }
    try:
        return JobSpec.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:  # the protocol's own bounds; the checks above should have caught it
        error = e.errors()[0]
        raise InvalidField(".".join(map(str, error["loc"])) or "request", error["msg"]) from None
