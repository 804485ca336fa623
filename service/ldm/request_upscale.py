"""The x4 upscaler's part of a request (the fields of `request.GenerationRequest` that only upscalers
take), in one place with their bounds, defaults and rules. Torch-free.

An upscale request carries the low-res `image` (PNG or JPEG) and the `noise_level` the image is noised
to before the UNet sees it (diffusers' StableDiffusionUpscalePipeline: default 20, at most the model's
`max_noise_level`, 350); the output is 4x the image's size. The image's size is read from its header
and refused before anything decodes it when the output would pass `Limits.max_upscale_pixels`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from .config import UPSCALE_FACTOR, UPSCALE_MAX_NOISE_LEVEL, ModelConfig
from .request_base import AS_BASE64, IMAGE_SCHEMA, Int, RequestError, decode_base64

if TYPE_CHECKING:
    from .request import GenerationRequest, Limits

MAX_UPSCALE_PIXELS = 4096 * 4096  # hard bound on an upscale's output (the served limit is a setting)
MAX_UPSCALE_IMAGE_BYTES = 16 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


InputImage = Annotated[
    bytes,
    BeforeValidator(lambda value: decode_base64(value, "PNG or JPEG")),
    Field(max_length=MAX_UPSCALE_IMAGE_BYTES),
    AS_BASE64,
    IMAGE_SCHEMA,
]


class UpscaleFields(BaseModel):
    """The x4 upscaler's input: the low-res image and how much noise it gets (None: the model's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: InputImage | None = Field(default=None, description="base64 PNG or JPEG to upscale 4x")
    noise_level: Int | None = Field(
        default=None,
        ge=0,
        le=UPSCALE_MAX_NOISE_LEVEL,
        description="noise added to the low-res image (20; 0: none), on the model's low-res schedule",
    )

    @field_validator("image")
    @classmethod
    def _image_kind(cls, value: bytes | None) -> bytes | None:
        if value is not None:
            try:
                input_image_size(value, "image")  # a PNG or JPEG of positive size, read from its header
            except RequestError as e:
                raise ValueError(e.message) from None
        return value


def input_image_size(data: bytes, field: str) -> tuple[int, int]:
    """(width, height) of a PNG (IHDR) or JPEG (start-of-frame segment) from its header alone."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise RequestError(field, "must be a PNG or JPEG image (a damaged PNG header)")
        width, height = struct.unpack(">II", data[16:24])
    elif data.startswith(JPEG_SIGNATURE):
        width, height = _jpeg_size(data, field)
    else:
        raise RequestError(field, "must be a PNG or JPEG image")
    if not (width and height):
        raise RequestError(field, f"must be an image of positive size, got {width}x{height}")
    return width, height


def _jpeg_size(data: bytes, field: str) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF and i + 9 <= len(data):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA or length < 2:  # image data before any frame header
            break
        i += 2 + length
    raise RequestError(field, "must be a PNG or JPEG image (no JPEG frame header)")


def resolve_upscale(request: GenerationRequest, model: ModelConfig, limits: Limits) -> dict[str, Any]:
    """An upscale's output size and noise level, or RequestError: an upscaler takes an image and
    nothing that sets the size or starts from another image; other models take no upscale fields."""
    if not model.is_upscaler:
        given = "image" if request.image is not None else "noise_level"
        raise RequestError(given, f"this model's task is {model.task}, not upscale (an x4 upscaler takes it)")
    if request.image is None:
        raise RequestError("model", "this model's task is upscale: give an image to upscale 4x")
    for name in ("init_image", "mask", "strength", "width", "height", "loras"):
        if getattr(request, name) is not None:
            raise RequestError(name, "an x4 upscaler does not take it (the output is 4x the image)")
    width, height = input_image_size(request.image, "image")
    out_w, out_h = UPSCALE_FACTOR * width, UPSCALE_FACTOR * height
    if out_w * out_h > limits.max_upscale_pixels:
        raise RequestError(
            "image",
            f"is {width}x{height}: its 4x upscale, {out_w}x{out_h}, passes the limit of "
            f"{limits.max_upscale_pixels} output pixels",
        )
    noise_level = model.default_noise_level if request.noise_level is None else request.noise_level
    if not 0 <= noise_level <= model.max_noise_level:
        raise RequestError("noise_level", f"must be between 0 and {model.max_noise_level}, got {noise_level}")
    return {"width": out_w, "height": out_h, "image": request.image, "noise_level": noise_level}
