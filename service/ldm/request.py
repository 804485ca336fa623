"""What a generation request is, in one place: its fields, their bounds and defaults, the sampler names
and the seed rule. Torch-free: the gateway, the queue, the worker and the engine all import it.

One request is one image. `GenerationRequest` is the type that travels from every public API (each
an adapter that maps its own field names onto it) through Redis (`to_json`) to the engine; None in a
field means "the model's default". `resolve` checks it against a model and a set of limits and fills
the defaults in, giving the `ResolvedRequest` that is run: the gateway resolves with its settings'
limits before anything is enqueued, the engine with the hard bounds below.

The seed rule: a request without a seed gets one drawn once, by `resolve` (the gateway resolves before
it enqueues, so every attempt of a job draws the same image); `plan` gives image i of n the seed
`seed + i`. SDXL models take more (`SDXLFields`: their fields, bounds, defaults and rules are in
`request_sdxl.py`, part of this definition); the others refuse those fields. So do x4 upscalers'
(`UpscaleFields`, `request_upscale.py`: the low-res `image` and its `noise_level`).
"""

from __future__ import annotations

import re
import secrets
import struct
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from .config import ModelConfig
from .request_base import AS_BASE64, IMAGE_SCHEMA, decode_base64
from .request_base import MODEL_NAME as MODEL_NAME
from .request_base import Int as Int
from .request_base import RequestError as RequestError
from .request_sdxl import (
    DEFAULT_AESTHETIC_SCORE,
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    Refiner,
    SDXLFields,
    resolve_sdxl,
)
from .request_upscale import MAX_UPSCALE_PIXELS, UpscaleFields, resolve_upscale

SAMPLERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator takes 64-bit seeds)
DRAWN_SEED_LIMIT = 2**32  # a drawn seed fits the web UIs' seed fields
# Hard bounds: what the protocol carries at all. The served limits are settings (`Limits`), at most these.
MAX_PROMPT_CHARS = 4000
MAX_SIDE = 2048
MAX_STEPS = 500
MAX_GUIDANCE = 50.0
MAX_N = 64
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_LORAS = 16
MAX_INPUT_PIXELS = 4096 * 4096  # an init image or mask larger than this is refused from its header
MAX_LORA_WEIGHT = 4.0
MAX_PREVIEWS = 3  # as OpenAI's partial_images
DEFAULT_STRENGTH = 0.8  # the models' default (ModelConfig.default_strength) when they do not say
DEFAULT_ETA = 0.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A LoRA adapter's name: its file in the LoRA directory is `<name>.safetensors` (no path separators).
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,127}$")
# AUTOMATIC1111's prompt syntax for an adapter: `<lora:name>` or `<lora:name:weight>`.
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def first_error(e: ValidationError) -> RequestError:
    """A pydantic error as a RequestError naming its field."""
    error = e.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    return RequestError(".".join(map(str, error["loc"])) or "request", message)


def _known_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return name


Sampler = Annotated[
    str, AfterValidator(_known_sampler), WithJsonSchema({"type": "string", "enum": list(SAMPLERS)})
]
PngImage = Annotated[
    bytes,
    BeforeValidator(lambda value: decode_base64(value, "PNG")),
    Field(max_length=MAX_IMAGE_BYTES),
    AS_BASE64,
    IMAGE_SCHEMA,
]


class LoraRef(BaseModel):
    """An adapter from the LoRA directory (GET /v1/loras), applied with this weight (0: not at all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=LORA_NAME.pattern, examples=["pixel-art"])
    weight: float = Field(default=1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)


class TextFields(BaseModel):
    """What to draw, and how: the fields of every API's text-to-image request. None: the model's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a large red circle on the left"]
    )
    negative_prompt: str = Field(
        default="", max_length=MAX_PROMPT_CHARS, description="the unconditional branch of CFG"
    )
    width: Int | None = Field(
        default=None, ge=1, le=MAX_SIDE, description="pixels, a multiple of the model's factor"
    )
    height: Int | None = Field(
        default=None, ge=1, le=MAX_SIDE, description="pixels, a multiple of the model's factor"
    )
    steps: Int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=MAX_GUIDANCE, description="classifier-free guidance"
    )
    sampler: Sampler | None = None
    seed: Int | None = Field(
        default=None, ge=0, lt=SEED_LIMIT, description="drawn when absent; image i of n gets seed + i"
    )
    eta: float | None = Field(
        default=None, ge=0.0, le=1.0, description=f"DDIM's eta ({DEFAULT_ETA:g}: deterministic)"
    )
    loras: list[LoraRef] | None = Field(
        default=None, max_length=MAX_LORAS, description="LoRA adapters (at most LDM_MAX_LORAS)"
    )
    previews: Int | None = Field(
        default=None, ge=0, le=MAX_PREVIEWS, description="x0 previews at evenly spaced steps (events)"
    )


class ImageFields(BaseModel):
    """What image-to-image and inpainting add: the init image, a mask (white is repainted), strength."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_image: PngImage | None = Field(default=None, description="base64 PNG (img2img)")
    mask: PngImage | None = Field(default=None, description="base64 PNG, white is repainted (inpainting)")
    strength: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=f"how much of the init image is redrawn ({DEFAULT_STRENGTH:g})",
    )

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


class GenerationRequest(TextFields, ImageFields, SDXLFields, UpscaleFields):
    """One image to draw: the request every API maps onto, and the job spec in Redis (`to_json`)."""

    def to_json(self) -> str:
        """The job spec as stored in Redis: fields left out stay out (the worker's model fills them in)."""
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationRequest:
        return cls.model_validate_json(text)

    @classmethod
    def parse(cls, values: dict[str, Any]) -> GenerationRequest:
        """From an adapter's field values (None: absent); RequestError names the first bad field."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise first_error(e) from None


@dataclass(frozen=True)
class Limits:
    """What a deployment serves; the gateway's settings narrow these hard bounds (GatewaySettings)."""

    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_steps: int = MAX_STEPS
    max_side: int = MAX_SIDE
    max_pixels: int = MAX_SIDE * MAX_SIDE
    max_n: int = MAX_N
    max_loras: int = MAX_LORAS
    max_input_pixels: int = MAX_INPUT_PIXELS
    max_upscale_pixels: int = MAX_UPSCALE_PIXELS  # an upscale's output (4x the input per side)


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in and every rule checked, as it is run."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    eta: float
    strength: float
    init_image: bytes | None
    mask: bytes | None
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, weight)
    previews: int = 0  # decoded x0 estimates to publish while denoising
    # SDXL (None / defaults for other models): sizes as (width, height), the crop as (x, y).
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE
    refiner: Refiner | None = None
    # The x4 upscaler: the low-res image (width and height above are 4x its size) and its noise level.
    image: bytes | None = None
    noise_level: int = 0

    def parameters(self) -> str:
        """The text stored in the PNG, in the web UIs' `parameters` style."""
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        loras = "".join(f", LoRA: {name}:{weight:g}" for name, weight in self.loras)
        r = self.refiner
        refiner = "" if r is None else f", Refiner: {r.model}, Refiner switch at: {r.switch_at:g}"
        return (
            f"{self.prompt}{negative}\nSteps: {self.steps}, Sampler: {self.sampler}, "
            f"CFG scale: {self.guidance_scale}, Seed: {self.seed}, Size: {self.width}x{self.height}"
            f"{loras}{refiner}{f', Noise level: {self.noise_level}' if self.image is not None else ''}"
        )


def draw_seed() -> int:
    return secrets.randbelow(DRAWN_SEED_LIMIT)


def resolve(request: GenerationRequest, model: ModelConfig, limits: Limits = Limits()) -> ResolvedRequest:
    """Checks what the model and the limits constrain and fills in the defaults; RequestError otherwise."""
    _check_text(request, limits)
    if request.loras and len(request.loras) > limits.max_loras:
        raise RequestError("loras", f"must be at most {limits.max_loras} adapters, got {len(request.loras)}")
    if model.is_upscaler or request.image is not None or request.noise_level is not None:
        return _resolve_upscale(request, model, limits)
    native = (model.sample_size, model.sample_size)
    if request.init_image is not None:
        native = _input_size(request.init_image, "init_image", limits)
    if request.mask is not None:
        _input_size(request.mask, "mask", limits)
    if model.is_inpainting and (request.init_image is None or request.mask is None):
        raise RequestError("init_image", "this is an inpainting model: give an init image and a mask")
    width = native[0] if request.width is None else request.width
    height = native[1] if request.height is None else request.height
    _check_size(width, height, model.downsample_factor, limits)
    steps = model.default_steps if request.steps is None else request.steps
    if not 1 <= steps <= limits.max_steps:
        raise RequestError("steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    sdxl = resolve_sdxl(request, model, width, height)
    return ResolvedRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=model.default_guidance if request.guidance_scale is None else request.guidance_scale,
        sampler=request.sampler or model.default_sampler,
        seed=draw_seed() if request.seed is None else request.seed,
        eta=DEFAULT_ETA if request.eta is None else request.eta,
        strength=model.default_strength if request.strength is None else request.strength,
        init_image=request.init_image,
        mask=request.mask,
        loras=tuple((ref.name, ref.weight) for ref in request.loras or ()),
        previews=request.previews or 0,
        **sdxl,
    )


def _resolve_upscale(request: GenerationRequest, model: ModelConfig, limits: Limits) -> ResolvedRequest:
    upscale = resolve_upscale(request, model, limits)
    steps = model.default_steps if request.steps is None else request.steps
    if not 1 <= steps <= limits.max_steps:
        raise RequestError("steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    return ResolvedRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=steps,
        guidance_scale=model.default_guidance if request.guidance_scale is None else request.guidance_scale,
        sampler=request.sampler or model.default_sampler,
        seed=draw_seed() if request.seed is None else request.seed,
        eta=DEFAULT_ETA if request.eta is None else request.eta,
        strength=1.0,
        init_image=None,
        mask=None,
        **upscale,
    )


def plan(request: GenerationRequest, n: int, model: ModelConfig, limits: Limits) -> list[GenerationRequest]:
    """The requests of n images (seeds seed .. seed + n - 1, the seed drawn once when absent), checked
    before any is enqueued. Fields left out stay out, for the worker's model to fill in."""
    if not 1 <= n <= limits.max_n:
        raise RequestError("n", f"must be between 1 and {limits.max_n}, got {n}")
    seed = resolve(request, model, limits).seed
    if seed + n - 1 >= SEED_LIMIT:
        raise RequestError("seed", f"must be between 0 and 2**63 - n, got {seed}")
    return [request.model_copy(update={"seed": seed + i}) for i in range(n)]


def image_size(data: bytes, field: str) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, without decoding the image."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        raise RequestError(field, "must be a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    if not (width and height):
        raise RequestError(field, "must be a PNG image of positive size")
    return width, height


def _input_size(data: bytes, field: str, limits: Limits) -> tuple[int, int]:
    """An input image's size from its header, refused before anything decodes it when too large."""
    width, height = image_size(data, field)
    if width * height > limits.max_input_pixels:
        raise RequestError(
            field, f"is {width}x{height}: at most {limits.max_input_pixels} pixels are accepted"
        )
    return width, height


def _check_text(request: GenerationRequest, limits: Limits) -> None:
    if not request.prompt.strip():
        raise RequestError("prompt", "must not be empty")
    for field, value in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(value) > limits.max_prompt_chars:
            raise RequestError(
                field, f"must be at most {limits.max_prompt_chars} characters, got {len(value)}"
            )
        if "\x00" in value:
            raise RequestError(field, "must not contain NUL characters")


def _check_size(width: int, height: int, multiple: int, limits: Limits) -> None:
    for field, value in (("width", width), ("height", height)):
        if not multiple <= value <= limits.max_side:
            raise RequestError(field, f"must be between {multiple} and {limits.max_side}, got {value}")
        if value % multiple:
            raise RequestError(field, f"must be a multiple of {multiple} for this model, got {value}")
    if width * height > limits.max_pixels:
        raise RequestError("width", f"width x height must be at most {limits.max_pixels} pixels")


def extract_loras(prompt: str) -> tuple[str, list[LoraRef]]:
    """AUTOMATIC1111's `<lora:name:weight>` tags (weight 1 when left out) taken out of a prompt: the
    text the encoder sees, and the adapters. RequestError ("prompt") for a tag that is no adapter."""
    refs = []
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            refs.append(LoraRef(name=name, weight=float(weight) if weight else 1.0))
        except (ValueError, ValidationError):
            raise RequestError("prompt", f"bad LoRA tag {match.group(0)!r}") from None
    return " ".join(LORA_TAG.sub(" ", prompt).split()), refs
