"""OpenAI's Images API on this service: `POST /v1/images/generations`, `POST /v1/images/edits`, the
signed image links, and `GET /v1/models/{id}` (the list is GET /v1/models, in routes_meta.py).

An adapter: its fields are mapped onto `GenerationRequest` and `Gateway.submit`, which check them
(nothing is restated here), and every error is answered in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the status OpenAI's SDKs map to their
exceptions (field errors are 400, never 422: the SDKs raise BadRequestError for 400).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..ldm.request import GenerationRequest, RequestError, first_error, image_size
from ..queue import keys
from ..settings import GatewaySettings
from . import uploads
from .deps import Caller, GatewayDep
from .errors import (
    GatewayError,
    InvalidField,
    JobCancelled,
    JobExpired,
    JobFailed,
    NotFound,
    QueueBytesFull,
    QueueFull,
    Unauthenticated,
    WaitTimeout,
)
from .generation import Gateway, Generated
from .openai_schemas import (
    EDIT_FORM,
    LINK_BY_DEFAULT,
    PARAMS,
    ImageData,
    ImageEditFields,
    ImageGenerationCreate,
    ImageOptions,
    ImagesResponse,
    OpenAIError,
    OpenAIModel,
)
from .openai_stream import encoded_images, image_size_text, stream_events
from .shaped import shaped_route
from .signed_urls import UrlSigner

MAX_FILES = 16  # files in one edits form (OpenAI takes up to 16 images)
MAX_FIELDS = 64
EXTENSIONS = {
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "sampler",
    "loras",
}  # the request type's names
CODES: dict[type[GatewayError], str] = {
    InvalidField: "invalid_value",
    Unauthenticated: "invalid_api_key",
    NotFound: "not_found",
    QueueFull: "rate_limit_exceeded",
    QueueBytesFull: "server_overloaded",
    WaitTimeout: "timeout",
    JobCancelled: "cancelled",
    JobExpired: "expired",
    JobFailed: "generation_failed",
}
# Retrying these would enqueue the work again (a 504's jobs go on), or fail again: OpenAI's SDKs retry
# 409 and 5xx unless told not to.
NO_RETRY = (WaitTimeout, JobCancelled, JobExpired, JobFailed)


class LinkExpired(NotFound):
    http_status = 410


def openai_error(request: Request, e: Exception) -> JSONResponse:
    """Any error of the OpenAI routes in OpenAI's shape."""
    status, body, headers = _error(e)
    return JSONResponse(body, status_code=status, headers=headers)


def _error(e: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and headers of an error."""
    headers: dict[str, str] = {}
    param: str | None = None
    code: str | None = "invalid_value"
    if isinstance(e, RequestValidationError):
        status, (param, message) = 400, _first_validation_error(e)
    elif isinstance(e, InvalidField):
        status, param, message = 400, PARAMS.get(e.field, e.field), e.message
    elif isinstance(e, GatewayError):
        status, message, code = e.http_status, e.message, CODES.get(type(e), type(e).__name__.lower())
        headers = dict(e.headers)
        if isinstance(e, NO_RETRY):
            headers["x-should-retry"] = "false"
    else:
        assert isinstance(e, HTTPException)
        status, message, code = (400 if e.status_code == 422 else e.status_code), str(e.detail), None
        headers = dict(e.headers or {})
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers


def _first_validation_error(e: RequestValidationError) -> tuple[str | None, str]:
    error = e.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    if error.get("type") == "json_invalid":
        return None, "the body is not valid JSON"
    field = loc[0] if loc else None
    return field, f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}"


async def get_signer(request: Request) -> UrlSigner:
    signer: UrlSigner = request.app.state.url_signer
    return signer


SignerDep = Annotated[UrlSigner, Depends(get_signer)]
router = APIRouter(tags=["openai"], route_class=shaped_route(openai_error))
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": description}
    for status, description in {
        400: "invalid field (named in `param`); nothing enqueued",
        401: "no valid API key",
        404: "unknown model",
        409: "cancelled while waiting",
        429: "queue full; see Retry-After",
        502: "a worker failed the job",
        503: "the job queue (Redis) is unavailable",
        504: "no result in time; the job goes on (x-should-retry: false)",
    }.items()
}
IMAGES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"content": {"text/event-stream": {}}, "description": "the images (stream: server-sent events)"},
}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=IMAGES)
async def generations(
    body: ImageGenerationCreate, request: Request, gateway: GatewayDep, owner: Caller, signer: SignerDep
) -> Response:
    """Text to image, as OpenAI's `images.generate`."""
    generation = _request(body)
    return await _answer("image_generation", body, generation, request, gateway, owner, signer)


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    responses=IMAGES,
    openapi_extra={"requestBody": EDIT_FORM},
)
async def edits(request: Request, gateway: GatewayDep, owner: Caller, signer: SignerDep) -> Response:
    """Image to image, as OpenAI's `images.edit`: the first image is redrawn from `strength`; with a
    mask, only its fully transparent pixels are repainted."""
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS) as form:
        fields: dict[str, str] = {}
        images: list[UploadFile] = []
        mask: UploadFile | None = None
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                if name in ("image", "image[]", "mask"):
                    raise RequestError(name.removesuffix("[]"), "must be a file")
                fields[name] = value
            elif name in ("image", "image[]"):
                images.append(value)
            elif name == "mask":
                mask = value
            else:
                raise RequestError(name, "unexpected file")
        try:
            body = ImageEditFields.model_validate(fields)
        except ValidationError as e:
            raise first_error(e) from None
        if not images:
            raise RequestError("image", "an image file is required")
        limit = gateway.settings.max_pixels
        init = await asyncio.to_thread(uploads.init_image_png, await images[0].read(), "image", limit)
        mask_png = None
        if mask is not None:
            mask_png = await asyncio.to_thread(uploads.alpha_mask_png, await mask.read(), "mask", limit)
            if image_size(mask_png, "mask") != image_size(init, "image"):
                raise RequestError("mask", "must have the size of the image")
    size = _fitted(gateway, body.model, image_size(init, "image")) if body.size in (None, "auto") else None
    generation = _request(body, init, mask_png, body.strength, size)
    return await _answer("image_edit", body, generation, request, gateway, owner, signer)


def _fitted(gateway: Gateway, model: str | None, size: tuple[int, int]) -> tuple[int, int] | None:
    """An edit's `auto` size: the image's, rounded down to the model's size multiple (OpenAI takes
    images of any size; the init image is resized to it)."""
    info = gateway.catalog.get(served_model(gateway.settings, model) or gateway.catalog.default)
    if info is None:
        return None  # an unknown model: refused by submit
    multiple = info.config.downsample_factor
    width, height = (max(multiple, side // multiple * multiple) for side in size)
    return width, height


@router.get(
    "/v1/images/files/{name}",
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"},
        400: {"model": OpenAIError, "description": "a malformed link"},
        404: {"model": OpenAIError, "description": "no such image, or a link not signed here"},
        410: {"model": OpenAIError, "description": "the link has expired"},
    },
    response_class=Response,
)
async def image_file(
    name: str, expires: int, signature: str, gateway: GatewayDep, signer: SignerDep
) -> Response:
    """An image link from a `response_format: url` answer; no API key needed, its signature is the key."""
    job_id, _, extension = name.partition(".")
    if extension != "png" or not keys.JOB_ID.match(job_id) or not signer.valid(job_id, expires, signature):
        raise NotFound(f"no image {name!r}")
    if signer.expired(expires):
        raise LinkExpired(f"the link to {name!r} has expired")
    png = await gateway.jobs.result(job_id)
    if png is None:
        raise NotFound(f"the image {name!r} has expired")
    max_age = max(0, int(expires - time.time()))
    return Response(png, media_type="image/png", headers={"Cache-Control": f"private, max-age={max_age}"})


@router.get("/v1/models/{model_id}", response_model=OpenAIModel, responses=ERRORS)
async def retrieve_model(model_id: str, gateway: GatewayDep, _owner: Caller) -> OpenAIModel:
    """One model (or alias) in OpenAI's shape, as `models.retrieve`."""
    for model in openai_models(gateway):
        if model.id == model_id:
            return model
    raise NotFound(f"the model {model_id!r} is not served here; see /v1/models")


def openai_models(gateway: Gateway) -> list[OpenAIModel]:
    """The models served here, then the aliases (LDM_MODEL_ALIASES), in OpenAI's shape."""
    created = {}
    for info in gateway.catalog.infos():
        try:
            created[info.name] = int(info.path.stat().st_mtime)
        except OSError:
            created[info.name] = 0
    models = [OpenAIModel(id=n, created=created[n], owned_by="ldm-service", root=n) for n in created]
    for alias, target in gateway.settings.model_aliases.items():
        if alias not in created:
            root = target or gateway.catalog.default
            models.append(OpenAIModel(id=alias, created=created[root], owned_by="ldm-service", root=root))
    return models


def served_model(settings: GatewaySettings, name: str | None) -> str | None:
    """The served model a `model` names: itself, or an alias's target (None: the default model)."""
    if name is None or name in settings.models or name not in settings.model_aliases:
        return name
    return settings.model_aliases[name] or None


def _request(
    options: ImageOptions,
    init: bytes | None = None,
    mask: bytes | None = None,
    strength: float | None = None,
    size: tuple[int, int] | None = None,
) -> GenerationRequest:
    if options.background == "transparent":
        raise RequestError("background", "transparent backgrounds are not supported: images here are opaque")
    width, height = size or (None, None)
    if options.size not in (None, "auto"):
        width, height = (int(side) for side in options.size.split("x"))
    values = options.model_dump(include=EXTENSIONS | {"prompt"})
    values |= {"width": width, "height": height, "init_image": init, "mask": mask, "strength": strength}
    if options.stream and options.partial_images:  # the workers publish decoded x0 estimates
        values["previews"] = options.partial_images
    return GenerationRequest.parse(values)


async def _answer(
    kind: str,
    options: ImageOptions,
    generation: GenerationRequest,
    request: Request,
    gateway: Gateway,
    owner: str,
    signer: UrlSigner,
) -> Response:
    n = 1 if options.n is None else options.n
    model = served_model(gateway.settings, options.model)
    submission = await gateway.submit(generation, owner, n=n, model=model, waiting=not options.stream)
    if options.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        events = stream_events(kind, options, gateway, submission, lambda e: _error(e)[1])
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    generated = await gateway.wait_for_images(submission)
    link = options.response_format == "url" or (
        options.response_format is None and LINK_BY_DEFAULT.match(options.model or "") is not None
    )
    if link:
        base = gateway.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        urls = [signer.link(base, image.job_id) for image in generated.images]
        data = [ImageData(url=url, revised_prompt=generation.prompt) for url in urls]
        return _json(options, generated, data, "png")
    output_format = options.output_format or "png"
    encoded = await encoded_images(options, generated)
    data = [ImageData(b64_json=b64, revised_prompt=generation.prompt) for b64 in encoded]
    return _json(options, generated, data, output_format)


def _json(
    options: ImageOptions, generated: Generated, data: list[ImageData], output_format: str
) -> JSONResponse:
    body = ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=output_format,  # type: ignore[arg-type]
        quality=options.quality or "auto",
        size=image_size_text(generated),
    )
    return JSONResponse(body.model_dump(mode="json", exclude_none=True))
