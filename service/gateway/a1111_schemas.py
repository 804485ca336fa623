"""AUTOMATIC1111's web UI API bodies (`/sdapi/v1/...`), as its clients send and read them.

Requests accept every field A1111 clients send (`sampler_index`, `hr_*`, `alwayson_scripts`, the SD.Next
and Forge extras, ...) and use those that mean something here; what a generation may be is the request
type's, checked when the fields are mapped onto it (`a1111_api.py`). Answers carry what A1111 writes:
`images`, `parameters` (the request), `info` (a JSON string with `seed`, `all_seeds`, `infotexts`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..ldm.request import SAMPLERS as OUR_SAMPLERS
from ..ldm.request import Int, RequestError, ResolvedRequest

VERSION = "ldm-service"
# A1111's sampler names -> ours, plain and with the Karras schedule (where this engine has one).
SAMPLERS: dict[str, tuple[str, str | None]] = {
    "DPM++ 2M": ("dpmpp_2m", "dpmpp_2m_karras"),
    "Euler a": ("euler_a", None),
    "Euler": ("euler", None),
    "DDIM": ("ddim", None),
}
SAMPLER_ALIASES = {  # other names clients send: A1111's aliases, its names before 1.9, and ours
    "k_dpmpp_2m": "DPM++ 2M",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    **{ours: a1111 for a1111, (ours, _) in SAMPLERS.items()},
}
LEGACY_KARRAS = {"DPM++ 2M Karras": "dpmpp_2m_karras", "dpmpp_2m_karras": "dpmpp_2m_karras"}
# A1111's schedulers: `automatic`, `uniform` and `normal` are the sampler's own sigmas there (the same
# k-diffusion `get_sigmas`), and here; `karras` is the Karras et al. (2022) schedule.
DEFAULT_SCHEDULES = ("automatic", "uniform", "normal")
KARRAS = "karras"
assert {s for pair in SAMPLERS.values() for s in pair if s} <= set(OUR_SAMPLERS)
# The request type's field names as this API names them (`loc` of a 422).
PARAMS = {
    "guidance_scale": "cfg_scale",
    "sampler": "sampler_name",
    "strength": "denoising_strength",
    "init_image": "init_images",
    "n": "batch_size",
}


def sampler(name: str | None, scheduler: str | None) -> str | None:
    """Our sampler for A1111's name and scheduler (None: the model's default)."""
    schedule = (scheduler or "automatic").lower()
    if schedule not in (*DEFAULT_SCHEDULES, KARRAS):
        choices = ", ".join((*DEFAULT_SCHEDULES, KARRAS))
        raise RequestError("scheduler", f"unknown scheduler {scheduler!r}; choose from {choices}")
    if not name:
        if schedule == KARRAS:
            raise RequestError("scheduler", "the Karras schedule needs sampler_name 'DPM++ 2M'")
        return None
    if name in LEGACY_KARRAS:
        return LEGACY_KARRAS[name]
    folded = {key.lower(): key for key in [*SAMPLERS, *SAMPLER_ALIASES]}
    key = folded.get(name.lower())
    if key is None:
        raise RequestError("sampler_name", f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    plain, karras = SAMPLERS[SAMPLER_ALIASES.get(key, key)]
    if schedule != KARRAS:
        return plain
    if karras is None:
        raise RequestError("scheduler", f"sampler {name!r} has no Karras schedule here")
    return karras


def a1111_sampler(ours: str) -> tuple[str, str]:
    """A1111's sampler name and schedule label for one of ours."""
    for name, (plain, karras) in SAMPLERS.items():
        if ours == plain:
            return name, "Automatic"
        if ours == karras:
            return name, "Karras"
    return ours, "Automatic"


def match_checkpoint(value: str, names: list[str]) -> str | None:
    """The served model a checkpoint title names: `NAME`, `NAME [hash]` or a file name, any case."""
    wanted = value.split(" [", 1)[0].strip()
    folded = {name.lower(): name for name in names}
    return folded.get(wanted.lower()) or folded.get(Path(wanted).stem.lower())


class Txt2ImgA1111(BaseModel):
    """POST /sdapi/v1/txt2img. Absent or null fields take the model's defaults; `seed` -1 is random.
    Strict about types (no "5" for 5), as the native API; fields not listed are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = ""
    negative_prompt: str | None = None
    seed: Int | None = Field(default=-1, description="-1: random; image i gets seed + i")
    sampler_name: str | None = Field(default=None, description="see /sdapi/v1/samplers")
    sampler_index: str | None = Field(default=None, description="the old name of sampler_name")
    scheduler: str | None = Field(default=None, description="see /sdapi/v1/schedulers")
    batch_size: Int = Field(default=1, description="batch_size x n_iter images, one job each")
    n_iter: Int = 1
    steps: Int | None = None
    cfg_scale: float | None = None
    width: Int | None = None
    height: Int | None = None
    eta: float | None = None
    denoising_strength: float | None = Field(default=None, description="img2img's strength")
    enable_hr: bool | None = Field(default=None, description="hires fix: refused when true")
    override_settings: dict[str, Any] | None = Field(
        default=None, description="`sd_model_checkpoint`: this request's model (the rest is ignored)"
    )
    send_images: bool = True


class Img2ImgA1111(Txt2ImgA1111):
    """POST /sdapi/v1/img2img: base64 images (PNG, JPEG or WebP, `data:` prefix or not); the mask's
    white is repainted (black with `inpainting_mask_invert: 1`)."""

    init_images: list[str] | None = None
    mask: str | None = None
    inpainting_mask_invert: Int = 0
    include_init_images: bool = False


class ImagesA1111(BaseModel):
    images: list[str] = Field(description="base64 PNGs")
    parameters: dict[str, Any] = Field(description="the request")
    info: str = Field(description="a JSON object: seed, all_seeds, infotexts, ...")


class StateA1111(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressA1111(BaseModel):
    progress: float = Field(description="0 to 1 over the caller's unfinished jobs; 0 when idle")
    eta_relative: float
    state: StateA1111
    current_image: str | None = None
    textinfo: str | None = None


class ErrorA1111(BaseModel):
    error: str
    detail: str
    body: str = ""
    errors: str


def infotext(request: ResolvedRequest, seed: int, model: str, img2img: bool) -> str:
    """The parameters text of one image, as A1111 writes it."""
    name, schedule = a1111_sampler(request.sampler)
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
    values: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": name,
        "Schedule type": schedule,
        "CFG scale": request.guidance_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
    }
    if img2img:
        values["Denoising strength"] = request.strength
    values["Version"] = VERSION
    return f"{request.prompt}{negative}\n" + ", ".join(f"{k}: {v}" for k, v in values.items())


def info(request: ResolvedRequest, seeds: list[int], model: str, body: Txt2ImgA1111, img2img: bool) -> str:
    """A1111's `info`: the generation's parameters, with every image's seed and infotext."""
    name, schedule = a1111_sampler(request.sampler)
    n = len(seeds)
    return json.dumps(
        {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * n,
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * n,
            "seed": seeds[0] if seeds else -1,
            "all_seeds": seeds,
            "subseed": seeds[0] if seeds else -1,
            "all_subseeds": seeds,
            "subseed_strength": 0,
            "width": request.width,
            "height": request.height,
            "sampler_name": name,
            "scheduler": schedule,
            "cfg_scale": request.guidance_scale,
            "steps": request.steps,
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "restore_faces": False,
            "sd_model_name": model,
            "sd_model_hash": None,
            "denoising_strength": request.strength if img2img else None,
            "extra_generation_params": {"Schedule type": schedule},
            "index_of_first_image": 0,
            "infotexts": [infotext(request, seed, model, img2img) for seed in seeds],
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": VERSION,
        }
    )
