"""From a queued job's spec to the engine's request, and from exceptions to job error messages."""

from __future__ import annotations

import io

from PIL import Image
from pydantic import ValidationError

from ..ldm.engine import GenerationRequest
from ..queue.spec import JobSpec


def generation_request(spec: JobSpec) -> GenerationRequest:
    """The engine request of a job; a PNG that does not decode raises ValueError naming the field."""
    return GenerationRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        sampler=spec.sampler,
        seed=spec.seed,
        eta=spec.eta,
        init_image=_image(spec.init_image, "init_image"),
        strength=spec.strength,
        mask=_image(spec.mask, "mask"),
    )


def _image(data: bytes | None, name: str) -> Image.Image | None:
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable PNG ({e})") from e
    return image


def error_message(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
    return str(e) or type(e).__name__
