"""The OpenAI Images API's bodies (`/v1/images/...`), as OpenAI's SDKs send and read them.

OpenAI's own fields keep OpenAI's rules (the formats, `output_compression` 0-100, `partial_images`
0-3); what a generation may be (prompt, n, size, steps, ...) is the request type's, checked when the
fields are mapped onto it (`openai_api.py`), so no bound or default of it is restated here. The
extensions (`negative_prompt`, `seed`, `steps`, `guidance_scale`, `sampler`, and `strength` for edits)
come in through the SDK's `extra_body`, under the request type's names.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..ldm.request import DEFAULT_STRENGTH, Int, LoraRef

SIZE = re.compile(r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")
# OpenAI's DALL·E models answer with links unless asked otherwise; the GPT image models with base64.
LINK_BY_DEFAULT = re.compile(r"^dall-e")
# The request type's field names as this API names them (for `param` in errors); others are the same.
PARAMS = {"width": "size", "height": "size", "init_image": "image", "request": None}
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]


class ImageOptions(BaseModel):
    """What generations and edits share. Fields that mean nothing here (`quality`, `style`,
    `moderation`, `user`, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw (the request type's bounds)")
    model: str | None = Field(
        default=None, description="a model served here or an alias (LDM_MODEL_ALIASES); default: the default"
    )
    n: Int | None = Field(default=None, description="images, one job each (at most LDM_MAX_N)")
    size: str | None = Field(
        default=None,
        pattern=SIZE.pattern,
        description="WIDTHxHEIGHT, multiples of the model's factor; `auto`: the model's native size "
        "(edits: the image's, rounded down to the factor)",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None,
        description="`url`: a signed link to the PNG, valid LDM_URL_TTL_S; default: `url` for dall-e-* "
        "model names, else `b64_json`",
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default=None, description="default: png")
    output_compression: Int | None = Field(
        default=None, ge=0, le=100, description="jpeg and webp quality (default 100)"
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None, description="`transparent` is refused: images here are opaque"
    )
    quality: Quality | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    stream: bool | None = Field(
        default=None, description="server-sent events; every image's `completed` event, no partial images"
    )
    partial_images: Int | None = Field(
        default=None, ge=0, le=3, description="accepted; this server sends none (no previews)"
    )
    negative_prompt: str | None = Field(default=None, description="extension: CFG's unconditional branch")
    seed: Int | None = Field(default=None, description="extension: image i of n gets seed + i")
    steps: Int | None = Field(default=None, description="extension: denoising steps")
    guidance_scale: float | None = Field(default=None, description="extension: classifier-free guidance")
    sampler: str | None = Field(default=None, description="extension: a sampler from GET /v1/models")
    loras: list[LoraRef] | None = Field(default=None, description="extension: adapters from GET /v1/loras")


class ImageGenerationCreate(ImageOptions):
    """POST /v1/images/generations (JSON: strict about types, as the native API; the edits' form
    fields are text)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImageEditFields(ImageOptions):
    """POST /v1/images/edits: the multipart form's text fields (the files are `image` or `image[]`,
    and `mask`)."""

    input_fidelity: Literal["high", "low"] | None = None
    strength: float | None = Field(
        default=None,
        description=f"extension: how much of the image is redrawn (default {DEFAULT_STRENGTH:g})",
    )


EDIT_FORM: dict[str, Any] = {  # the edits body in the OpenAPI document (read by hand: `image[]`)
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["prompt", "image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
                    "image[]": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "images; the first is edited",
                    },
                    "mask": {
                        "type": "string",
                        "format": "binary",
                        "description": "PNG with alpha: the fully transparent pixels are repainted",
                    },
                    **{
                        name: {"type": "string", "description": field.description or ""}
                        for name, field in ImageEditFields.model_fields.items()
                    },
                },
            }
        }
    },
}


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str = Field(description="the prompt as drawn (never rewritten here)")


class InputTokensDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """Token counts mean nothing here: zeros."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    total_tokens: int = 0


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"]
    quality: str
    size: str
    usage: Usage = Field(default_factory=Usage)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="the checkpoint's modification time")
    owned_by: str
    root: str = Field(description="the served model this name reaches")
