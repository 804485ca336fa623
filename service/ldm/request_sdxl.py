"""SDXL's part of a request (the fields of `request.GenerationRequest` that only SDXL models take), in
one place with their bounds, diffusers' defaults and their rules. Torch-free.

The size and crop conditioning of the SDXL report (Podell et al. 2023, sec. 2.2), the refiner's
aesthetic scores, and the base -> refiner hand-off (sec. 2.5). Sizes travel as `{"width", "height"}`
and the crop as `{"x", "y"}`; `sdxl_cond.time_ids` turns them into diffusers' (height, width) and
(top, left) order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from .config import ModelConfig
from .request_base import MODEL_NAME, Int, RequestError

if TYPE_CHECKING:
    from .request import GenerationRequest

MAX_CONDITIONING_SIDE = 16384  # SDXL's size conditioning may name any photo size, beyond MAX_SIDE
MAX_AESTHETIC_SCORE = 10.0  # the LAION aesthetic predictor's scale
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5
DEFAULT_SWITCH_AT = 0.8


class Size(BaseModel):
    """A size in pixels (SDXL's size conditioning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: Int = Field(ge=1, le=MAX_CONDITIONING_SIDE)
    height: Int = Field(ge=1, le=MAX_CONDITIONING_SIDE)


class Point(BaseModel):
    """A pixel position: x from the left, y from the top."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: Int = Field(ge=0, le=MAX_CONDITIONING_SIDE)
    y: Int = Field(ge=0, le=MAX_CONDITIONING_SIDE)


class Refiner(BaseModel):
    """SDXL's base -> refiner hand-off ("ensemble of experts"): the base runs the first `switch_at` of
    the noise schedule (diffusers' denoising_end), the refiner finishes the latent, in the same job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=MODEL_NAME.pattern, description="a served SDXL refiner")
    switch_at: float = Field(
        default=DEFAULT_SWITCH_AT, gt=0.0, lt=1.0, description="the base's share of the schedule"
    )


class SDXLFields(BaseModel):
    """SDXL's conditioning as diffusers' pipelines take it; absent: their defaults (original and
    target size: the image's; crop 0, 0; aesthetic scores 6.0 and 2.5). Other models refuse them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    original_size: Size | None = Field(default=None, description="SDXL: the size it looks cropped from")
    crops_coords_top_left: Point | None = Field(default=None, description="SDXL: where that crop starts")
    target_size: Size | None = Field(default=None, description="SDXL base: the size it is meant at")
    aesthetic_score: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_AESTHETIC_SCORE,
        description=f"SDXL refiner: the score conditioned on ({DEFAULT_AESTHETIC_SCORE:g})",
    )
    negative_aesthetic_score: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_AESTHETIC_SCORE,
        description=f"SDXL refiner: the unconditional branch's ({DEFAULT_NEGATIVE_AESTHETIC_SCORE:g})",
    )
    refiner: Refiner | None = Field(default=None, description="SDXL base: finish with this refiner")


def resolve_sdxl(request: GenerationRequest, model: ModelConfig, width: int, height: int) -> dict[str, Any]:
    """The `ResolvedRequest` fields of SDXL's conditioning, with diffusers' defaults; a field the
    model does not take is refused (RequestError naming it)."""
    given = [name for name in SDXLFields.model_fields if getattr(request, name) is not None]
    if not model.is_sdxl:
        if given:
            raise RequestError(given[0], "only SDXL models take this field")
        return {}
    scores = [name for name in given if name.endswith("aesthetic_score")]
    if model.is_refiner and request.refiner is not None:
        raise RequestError("refiner", "this model is itself an SDXL refiner: ask its base model for it")
    if model.is_refiner and request.target_size is not None:
        raise RequestError("target_size", "an SDXL refiner conditions on an aesthetic score, not this")
    if model.is_refiner and request.init_image is None:
        raise RequestError(
            "init_image", "an SDXL refiner refines an image: give one (or name it as a refiner)"
        )
    if scores and not model.is_refiner and request.refiner is None:
        raise RequestError(scores[0], "only an SDXL refiner (or a request's refiner) takes this field")
    if request.refiner is not None and model.is_inpainting:
        raise RequestError("refiner", "an inpainting model cannot hand its latent to a refiner")
    o, t, c = request.original_size, request.target_size, request.crops_coords_top_left
    a, na = request.aesthetic_score, request.negative_aesthetic_score
    return {
        "original_size": (width, height) if o is None else (o.width, o.height),
        "crops_coords_top_left": (0, 0) if c is None else (c.x, c.y),
        "target_size": (width, height) if t is None else (t.width, t.height),
        "aesthetic_score": DEFAULT_AESTHETIC_SCORE if a is None else a,
        "negative_aesthetic_score": DEFAULT_NEGATIVE_AESTHETIC_SCORE if na is None else na,
        "refiner": request.refiner,
    }


def check_refiner(refiner: Refiner, base: ModelConfig, model: ModelConfig) -> None:
    """A hand-off from `base` to `model` (the refiner's config) can run; RequestError("refiner") if not."""
    if not model.is_refiner:
        raise RequestError("refiner", f"model {refiner.model!r} is not an SDXL refiner")
    if (model.latent_channels, model.downsample_factor) != (base.latent_channels, base.downsample_factor):
        raise RequestError("refiner", f"model {refiner.model!r} has another latent space than this model")
