"""AUTOMATIC1111's web UI API on this service (`/sdapi/v1/...`): txt2img, img2img, the option and
list endpoints its clients read, progress, interrupt and skip.

An adapter: its fields are mapped onto `GenerationRequest` and `Gateway.submit`, which check them, and
errors are answered in A1111's shapes (a field error: 422 with `detail[].loc` naming A1111's field;
anything else: `{"error", "detail", "body", "errors"}`). Auth is HTTP Basic with an API key as the
password (A1111's `--api-auth`), or Bearer.

What A1111 keeps globally is kept per API key here: the checkpoint (`sd_model_checkpoint`, in Redis,
`keys.a1111_options`), and the jobs that progress, interrupt and skip see (the key's own,
`keys.owner_jobs`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..ldm.request import GenerationRequest, RequestError, extract_loras, resolve
from ..queue.states import JobStatus
from . import uploads
from .a1111_schemas import DEFAULT_SCHEDULES as SCHEDULES
from .a1111_schemas import (
    PARAMS,
    SAMPLERS,
    ErrorA1111,
    ImagesA1111,
    Img2ImgA1111,
    ProgressA1111,
    StateA1111,
    Txt2ImgA1111,
    info,
    match_checkpoint,
    sampler,
)
from .deps import BasicCaller, GatewayDep
from .errors import GatewayError, InvalidField, Unauthenticated
from .generation import Gateway
from .schemas import ValidationErrorPublic
from .shaped import shaped_route

CHECKPOINT = "sd_model_checkpoint"


def a1111_error(request: Request, e: Exception) -> JSONResponse:
    """Any error of the A1111 routes in A1111's shape."""
    if isinstance(e, InvalidField):
        loc = ["body", *PARAMS.get(e.field, e.field).split(".")]
        detail = [{"loc": loc, "msg": e.detail, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)
    if isinstance(e, RequestValidationError):
        detail = [{"loc": list(x.get("loc", ())), "msg": str(x.get("msg")), "type": str(x.get("type"))}
                  for x in e.errors()]  # fmt: skip
        return JSONResponse({"detail": detail}, status_code=422)
    if isinstance(e, HTTPException) and e.status_code == 400:  # a body FastAPI cannot decode
        detail = [{"loc": ["body"], "msg": "the body is not valid JSON", "type": "json_invalid"}]
        return JSONResponse({"detail": detail}, status_code=422)
    if isinstance(e, GatewayError):
        status, message, headers = e.http_status, e.message, dict(e.headers)
        if isinstance(e, Unauthenticated):
            headers["WWW-Authenticate"] = "Basic"
    else:
        assert isinstance(e, HTTPException)
        status, message, headers = e.status_code, str(e.detail), dict(e.headers or {})
    body = {"error": type(e).__name__, "detail": message, "body": "", "errors": message}
    return JSONResponse(body, status_code=status, headers=headers)


router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], route_class=shaped_route(a1111_error))
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorA1111, "description": "no valid API key (HTTP Basic: the key as password)"},
    404: {"model": ErrorA1111, "description": "unknown model"},
    422: {"model": ValidationErrorPublic, "description": "invalid field (named in loc); nothing enqueued"},
    429: {"model": ErrorA1111, "description": "queue full; see Retry-After"},
    502: {"model": ErrorA1111, "description": "a worker failed the job"},
    503: {"model": ErrorA1111, "description": "the job queue (Redis) is unavailable"},
    504: {"model": ErrorA1111, "description": "no result in time; the jobs go on"},
}


@router.post("/txt2img", response_model=ImagesA1111, responses=ERRORS)
async def txt2img(body: Txt2ImgA1111, gateway: GatewayDep, owner: BasicCaller) -> ImagesA1111:
    """Text to image: batch_size x n_iter images, seeds seed .. seed + n - 1."""
    return await _generate(body, gateway, owner, None, None)


@router.post("/img2img", response_model=ImagesA1111, responses=ERRORS)
async def img2img(body: Img2ImgA1111, gateway: GatewayDep, owner: BasicCaller) -> ImagesA1111:
    """Image to image from the first init image (inpainting with a mask)."""
    if not body.init_images:
        raise RequestError("init_images", "at least one image is required")
    limit = gateway.settings.max_pixels
    raw = uploads.decode_base64(body.init_images[0], "init_images")
    init = await asyncio.to_thread(uploads.init_image_png, raw, "init_images", limit)
    mask = None
    if body.mask:
        raw = uploads.decode_base64(body.mask, "mask")
        invert = body.inpainting_mask_invert == 1
        mask = await asyncio.to_thread(uploads.grey_mask_png, raw, "mask", limit, invert)
    return await _generate(body, gateway, owner, init, mask)


async def _generate(
    body: Txt2ImgA1111, gateway: Gateway, owner: str, init: bytes | None, mask: bytes | None
) -> ImagesA1111:
    if body.enable_hr:
        raise RequestError("enable_hr", "hires fix is not supported here")
    for field in ("batch_size", "n_iter"):
        if getattr(body, field) < 1:
            raise RequestError(field, "must be at least 1")
    model = await _checkpoint(gateway, owner, body.override_settings)
    prompt, loras = extract_loras(body.prompt)  # A1111's <lora:name:weight> tags
    generation = GenerationRequest.parse(
        {
            "prompt": prompt,
            "loras": [ref.model_dump() for ref in loras] or None,
            "negative_prompt": body.negative_prompt,
            "seed": None if body.seed == -1 else body.seed,
            "sampler": sampler(body.sampler_name or body.sampler_index, body.scheduler),
            "steps": body.steps,
            "guidance_scale": body.cfg_scale,
            "width": body.width,
            "height": body.height,
            "eta": body.eta,
            "init_image": init,
            "mask": mask,
            "strength": body.denoising_strength if init is not None else None,
        }
    )
    n = body.batch_size * body.n_iter
    submission = await gateway.submit(generation, owner, n=n, model=model, waiting=True)
    generated = await gateway.wait_for_images(submission, cancelled_ok=True)  # interrupt: what is done
    info_model = gateway.catalog.get(submission.model)
    assert info_model is not None  # submit checked it
    seeds = [image.seed for image in generated.images]
    resolved = resolve(generation.model_copy(update={"seed": submission.seeds[0]}), info_model.config,
                       gateway.settings.limits())  # fmt: skip
    parameters = body.model_dump(mode="json")
    if not getattr(body, "include_init_images", True):
        parameters |= {"init_images": None, "mask": None}
    images = [base64.b64encode(image.png).decode() for image in generated.images] if body.send_images else []
    text = info(resolved, seeds, submission.model, body, img2img=init is not None)
    return ImagesA1111(images=images, parameters=parameters, info=text)


async def _checkpoint(gateway: Gateway, owner: str, override: dict[str, Any] | None) -> str | None:
    """The model of a request: `override_settings`, else the key's option, else the default (None)."""
    names = gateway.catalog.names()
    wanted = (override or {}).get(CHECKPOINT)
    if wanted is None or wanted == "":
        stored = (await gateway.jobs.owner_options(owner)).get(CHECKPOINT)
        return stored if stored in names else None
    if not isinstance(wanted, str):
        raise RequestError(f"override_settings.{CHECKPOINT}", "must be a string")
    return match_checkpoint(wanted, names) or wanted  # an unknown name: 404, as on the native API


@router.get("/options", responses=ERRORS)
async def get_options(gateway: GatewayDep, owner: BasicCaller) -> dict[str, Any]:
    """The caller's options (the checkpoint is kept per API key); the others are fixed here."""
    return {
        CHECKPOINT: await _checkpoint(gateway, owner, None) or gateway.catalog.default,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
    }


@router.post("/options", responses=ERRORS)
async def set_options(
    gateway: GatewayDep, owner: BasicCaller, options: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Sets the caller's checkpoint (`sd_model_checkpoint`: a title from /sdapi/v1/sd-models); other
    options are accepted and ignored."""
    wanted = options.get(CHECKPOINT)
    if wanted is not None and wanted != "":
        name = match_checkpoint(wanted, gateway.catalog.names()) if isinstance(wanted, str) else None
        if name is None:
            raise RequestError(CHECKPOINT, f"no model {wanted!r}; see /sdapi/v1/sd-models")
        await gateway.jobs.set_owner_options(owner, {CHECKPOINT: name})
    return {}


@router.get("/sd-models", responses=ERRORS)
async def sd_models(gateway: GatewayDep, _owner: BasicCaller) -> list[dict[str, Any]]:
    """The models served here (`title` is what `sd_model_checkpoint` takes)."""
    return [
        {"title": i.name, "model_name": i.name, "hash": None, "sha256": None, "filename": str(i.path),
         "config": None}
        for i in gateway.catalog.infos()
    ]  # fmt: skip


@router.get("/samplers", responses=ERRORS)
async def samplers(_owner: BasicCaller) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [plain], "options": {}} for name, (plain, _) in SAMPLERS.items()]


@router.get("/schedulers", responses=ERRORS)
async def schedulers(_owner: BasicCaller) -> list[dict[str, Any]]:
    """`karras` works with DPM++ 2M only."""
    names = [*SCHEDULES, "karras"]
    return [
        {"name": n, "label": n.capitalize(), "aliases": None, "default_rho": 7.0 if n == "karras" else -1.0,
         "need_inner_model": False}
        for n in names
    ]  # fmt: skip


@router.get("/upscalers", responses=ERRORS)
async def upscalers(_owner: BasicCaller) -> list[dict[str, Any]]:
    """No upscalers (hires fix is not supported): only A1111's `None`."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": None}]


@router.get("/latent-upscale-modes", responses=ERRORS)
async def latent_upscale_modes(_owner: BasicCaller) -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae", responses=ERRORS)
async def sd_vae(_owner: BasicCaller) -> list[dict[str, Any]]:
    """Each model's own autoencoder only."""
    return []


@router.get("/scripts", responses=ERRORS)
async def scripts(_owner: BasicCaller) -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/progress", response_model=ProgressA1111, responses=ERRORS)
async def progress(gateway: GatewayDep, owner: BasicCaller) -> ProgressA1111:
    """Progress over the caller's own unfinished jobs (A1111's is the whole server's): the mean of
    their step fractions; `state` shows the furthest running one. 0 and job_count 0 when idle."""
    jobs = await gateway.jobs.unfinished(owner)
    if not jobs:
        return ProgressA1111(progress=0, eta_relative=0, state=StateA1111())
    fractions = [job.step / job.steps if job.steps else 0.0 for job in jobs]
    done = min(1.0, max(0.01, sum(fractions) / len(fractions)))  # 0.01: as A1111, never 0 while busy
    started = min(job.started or job.created for job in jobs)
    elapsed = max(0.0, time.time() - started)
    running = [job for job in jobs if job.status == JobStatus.RUNNING]
    current = max(running, key=lambda job: job.step / job.steps if job.steps else 0.0, default=None)
    state = StateA1111(
        job=current.id if current else "",
        job_count=len(jobs),
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        sampling_step=current.step if current else 0,
        sampling_steps=current.steps if current else 0,
    )
    return ProgressA1111(progress=done, eta_relative=elapsed / done - elapsed, state=state)


@router.post("/interrupt", responses=ERRORS)
async def interrupt(gateway: GatewayDep, owner: BasicCaller) -> dict[str, Any]:
    """Cancels the caller's unfinished jobs, queued or running (a request waiting on them answers with
    the images already done)."""
    for job in await gateway.jobs.unfinished(owner):
        await gateway.jobs.cancel(job.id)
    return {}


@router.post("/skip", responses=ERRORS)
async def skip(gateway: GatewayDep, owner: BasicCaller) -> dict[str, Any]:
    """Cancels the caller's running jobs; queued ones go on."""
    for job in await gateway.jobs.unfinished(owner):
        if job.status == JobStatus.RUNNING:
            await gateway.jobs.cancel(job.id)
    return {}
