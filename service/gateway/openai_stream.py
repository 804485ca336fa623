"""The OpenAI Images API's streaming answer (`stream: true`) and the encodings it shares with the JSON
answer: `{kind}.partial_image` events from the workers' previews, then `{kind}.completed` ones."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..ldm.request import image_size
from . import uploads
from .errors import GatewayError, WaitTimeout
from .generation import Gateway, Generated, Submission
from .openai_schemas import ImageOptions, Usage

DEFAULT_COMPRESSION = 100  # OpenAI's default output_compression


async def encoded_images(options: ImageOptions, generated: Generated) -> list[str]:
    output_format = options.output_format or "png"
    quality = DEFAULT_COMPRESSION if options.output_compression is None else options.output_compression
    out = []
    for image in generated.images:
        data = await asyncio.to_thread(uploads.encode, image.png, output_format, quality)
        out.append(base64.b64encode(data).decode())
    return out


async def _partial(kind: str, options: ImageOptions, gateway: Gateway, job_id: str, index: int) -> str:
    png = await gateway.jobs.preview(job_id, index)
    if png is None:  # expired already
        return ""
    quality = DEFAULT_COMPRESSION if options.output_compression is None else options.output_compression
    output_format = options.output_format or "png"
    data = await asyncio.to_thread(uploads.encode, png, output_format, quality)
    width, height = image_size(png, "image")
    body = {
        "type": f"{kind}.partial_image",
        "b64_json": base64.b64encode(data).decode(),
        "partial_image_index": index,
        "created_at": int(time.time()),
        "size": f"{width}x{height}",
        "quality": options.quality or "auto",
        "background": "opaque",
        "output_format": output_format,
    }
    return f"event: {kind}.partial_image\ndata: {json.dumps(body)}\n\n"


def image_size_text(generated: Generated) -> str:
    width, height = image_size(generated.images[0].png, "image") if generated.images else (0, 0)
    return f"{width}x{height}"


async def stream_events(
    kind: str,
    options: ImageOptions,
    gateway: Gateway,
    submission: Submission,
    error_of: Callable[[Exception], dict[str, Any]],
) -> AsyncIterator[str]:
    """`{kind}.partial_image` for every preview a worker publishes (the decoded x0 estimate at evenly
    spaced steps, `partial_images` of them per image), then `{kind}.completed` for every image once
    all are done; an `error` event instead when the jobs fail or the wait runs out."""
    settings = gateway.settings
    deadline = submission.received + settings.request_timeout_s
    tick = min(settings.sse_keepalive_s, settings.request_timeout_s)
    events = gateway.jobs.waiting.follow(submission.job_ids, idle_s=tick)
    try:
        async for event in events:
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"no result within {settings.request_timeout_s:g} s; the job goes on: "
                    f"follow /v1/jobs/{submission.id}",
                    submission.job_ids,
                )
            if event is None:
                yield ": keepalive\n\n"
            elif event.type == "preview":
                partial = await _partial(kind, options, gateway, event.job_id, int(event.fields["index"]))
                if partial:
                    yield partial
        generated = await gateway.collect(submission)
        encoded = await encoded_images(options, generated)
    except GatewayError as e:
        error = error_of(e)
        yield f"event: error\ndata: {json.dumps({'type': 'error', **error})}\n\n"
        return
    finally:
        await events.aclose()
    size = image_size_text(generated)
    for b64 in encoded:
        data = {
            "type": f"{kind}.completed",
            "b64_json": b64,
            "created_at": int(time.time()),
            "size": size,
            "quality": options.quality or "auto",
            "background": "opaque",
            "output_format": options.output_format or "png",
            "usage": Usage().model_dump(),
        }
        yield f"event: {kind}.completed\ndata: {json.dumps(data)}\n\n"
