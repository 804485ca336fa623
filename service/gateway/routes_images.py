"""POST /v1/txt2img, /v1/img2img and /v1/upscale: answer with the images when done, or 202 with
`Prefer: respond-async`."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from .deps import Caller, GatewayDep
from .errors import InvalidField
from .generation import Gateway, Generated, Submission
from .schemas import (
    ErrorPublic,
    ImagePublic,
    ImagesPublic,
    Img2ImgCreate,
    JobRef,
    JobsAccepted,
    TimingsPublic,
    Txt2ImgCreate,
    UpscaleCreate,
    ValidationErrorPublic,
)

router = APIRouter(prefix="/v1", tags=["images"])

PREFER_HELP = "`respond-async`: answer 202 at once, with Location: /v1/jobs/{id}"
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}},
        "description": "the images (with Accept: image/png and n = 1: the PNG)",
    },
    202: {"model": JobsAccepted, "description": "queued (Prefer: respond-async)"},
    401: {"model": ErrorPublic, "description": "no valid API key"},
    404: {"model": ErrorPublic, "description": "unknown model"},
    409: {"model": ErrorPublic, "description": "cancelled while waiting"},
    413: {"model": ErrorPublic, "description": "body too large"},
    422: {"model": ValidationErrorPublic, "description": "invalid field (named in loc); nothing enqueued"},
    429: {"model": ErrorPublic, "description": "queue full; see Retry-After"},
    502: {"model": ErrorPublic, "description": "a worker failed the job"},
    503: {"model": ErrorPublic, "description": "the job queue (Redis) is unavailable"},
    504: {"model": ErrorPublic, "description": "no result in time; the job goes on (Location)"},
}
Prefer = Annotated[str | None, Header(description=PREFER_HELP)]
IDEMPOTENCY_HELP = (
    "any string up to 256 characters: the same key from the same caller within LDM_IDEMPOTENCY_TTL_S "
    "answers with the jobs of the first request and enqueues nothing again"
)
IdempotencyKey = Annotated[str | None, Header(max_length=256, description=IDEMPOTENCY_HELP)]


@router.post("/txt2img", response_model=ImagesPublic, responses=RESPONSES)
async def txt2img(
    body: Txt2ImgCreate,
    request: Request,
    gateway: GatewayDep,
    owner: Caller,
    prefer: Prefer = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Text to image: n images, one job each, seeds seed .. seed + n - 1."""
    return await _generate(gateway, body, request, owner, prefer, idempotency_key)


@router.post("/img2img", response_model=ImagesPublic, responses=RESPONSES)
async def img2img(
    body: Img2ImgCreate,
    request: Request,
    gateway: GatewayDep,
    owner: Caller,
    prefer: Prefer = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Image to image (and inpainting with a mask): the init image redrawn from `strength`."""
    return await _generate(gateway, body, request, owner, prefer, idempotency_key)


@router.post("/upscale", response_model=ImagesPublic, responses=RESPONSES)
async def upscale(
    body: UpscaleCreate,
    request: Request,
    gateway: GatewayDep,
    owner: Caller,
    prefer: Prefer = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Super-resolution with an x4 upscaler: `image` upscaled 4x (the first upscaler served, unless
    `model` names one)."""
    if body.model is None:
        body = body.model_copy(update={"model": gateway.default_model_for("upscale")})
    return await _generate(gateway, body, request, owner, prefer, idempotency_key)


async def _generate(
    gateway: Gateway,
    body: Txt2ImgCreate,
    request: Request,
    owner: str,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    wants_png = _wants_png(request.headers.get("accept", ""))
    if wants_png and body.n != 1:
        raise InvalidField("n", "Accept: image/png answers one image: n must be 1")
    key, webhook = idempotency_key or "", body.webhook
    respond_async = prefer is not None and "respond-async" in [p.strip().lower() for p in prefer.split(",")]
    submission = await gateway.submit(
        body.to_request(),
        owner,
        n=body.n,
        model=body.model,
        idempotency_key=key,
        webhook=webhook,
        waiting=not respond_async,
    )
    if respond_async:
        return accepted(submission)
    generated = await gateway.wait_for_images(submission)
    if wants_png:
        image = generated.images[0]
        headers = {"X-Job-Id": image.job_id, "X-Seed": str(image.seed)}
        return Response(image.png, media_type="image/png", headers=headers)
    return JSONResponse(images_public(generated).model_dump(mode="json"))


def _wants_png(accept: str) -> bool:
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "image/png" in types and "application/json" not in types


def accepted(submission: Submission) -> JSONResponse:
    body = JobsAccepted(
        id=submission.id,
        model=submission.model,
        jobs=[
            JobRef(id=job_id, seed=seed, location=f"/v1/jobs/{job_id}")
            for job_id, seed in zip(submission.job_ids, submission.seeds, strict=True)
        ],
    )
    headers = {"Location": f"/v1/jobs/{submission.id}", "Preference-Applied": "respond-async"}
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)


def images_public(generated: Generated) -> ImagesPublic:
    return ImagesPublic(
        id=generated.id,
        model=generated.model,
        job_ids=generated.job_ids,
        images=[
            ImagePublic(job_id=i.job_id, seed=i.seed, png_base64=base64.b64encode(i.png).decode())
            for i in generated.images
        ],
        timings=TimingsPublic(**generated.timings),
    )
