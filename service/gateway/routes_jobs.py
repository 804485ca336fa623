"""GET and DELETE /v1/jobs/{id}, and its server-sent events: the asynchronous side of the API."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..ldm.request import MAX_PREVIEWS
from ..queue.states import JobState, JobStatus
from .deps import Caller, GatewayDep
from .errors import Unavailable
from .generation import Gateway, Image
from .schemas import ErrorPublic, ImagePublic, JobPublic, ProgressPublic, WebhookPublic
from .waiting import Event

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "no valid API key"},
    404: {"model": ErrorPublic, "description": "no such job (or another key's)"},
    503: {"model": ErrorPublic, "description": "the job queue (Redis) is unavailable"},
}
# The protocol's event types, as the API names them: a worker's `running` is the job having started.
SSE_TYPES = {"running": "started"}


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses={
        **NOT_FOUND,
        200: {"content": {"image/png": {}}, "description": "the job; its PNG with Accept"},
    },
)
async def get_job(job_id: str, request: Request, gateway: GatewayDep, owner: Caller) -> Response:
    """Status, progress, queue position, and the result when done (`Accept: image/png`: the PNG itself,
    404 until the job has succeeded)."""
    state = await gateway.owned_job(job_id, owner)
    image = await gateway.result(state)
    if "image/png" in request.headers.get("accept", "") and "json" not in request.headers.get("accept", ""):
        if image is None:
            return JSONResponse({"detail": f"job {job_id} has no image ({state.status})"}, status_code=404)
        return Response(image.png, media_type="image/png", headers={"X-Job-Id": job_id})
    return JSONResponse((await job_public(gateway, state, image)).model_dump(mode="json"))


@router.get(
    "/{job_id}/previews/{index}",
    responses={**NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "the preview's PNG"}},
    response_class=Response,
)
async def get_preview(job_id: str, index: int, gateway: GatewayDep, owner: Caller) -> Response:
    """Preview `index` (0: first) of a job that asked for `previews`: its x0 estimate, decoded at an
    evenly spaced step (announced by a `preview` event); 404 until then, or once its TTL is over."""
    await gateway.owned_job(job_id, owner)
    png = await gateway.jobs.preview(job_id, index) if 0 <= index < MAX_PREVIEWS else None
    if png is None:
        return JSONResponse({"detail": f"job {job_id} has no preview {index}"}, status_code=404)
    return Response(png, media_type="image/png", headers={"X-Job-Id": job_id})


@router.delete("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
async def cancel_job(job_id: str, gateway: GatewayDep, owner: Caller) -> JobPublic:
    """Cancels a queued or running job (a running one stops at its next step); a job that has already
    ended keeps its status."""
    await gateway.owned_job(job_id, owner)
    await gateway.jobs.cancel(job_id)
    return await job_public(gateway, await gateway.owned_job(job_id, owner), None)


@router.get(
    "/{job_id}/events",
    responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "the job's events"}},
)
async def job_events(
    job_id: str,
    gateway: GatewayDep,
    owner: Caller,
    last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None,
) -> StreamingResponse:
    """Server-sent events, replayed from the start: `queued`, `started`, `progress` (step, total), then
    `succeeded`, `failed`, `cancelled` or `expired`, after which the stream ends. If the job queue goes
    away meanwhile the stream ends early with a `retry:` field: reconnect with Last-Event-ID."""
    await gateway.owned_job(job_id, owner)
    after = {job_id: last_event_id} if last_event_id and _is_event_id(last_event_id) else None
    return StreamingResponse(
        _sse(gateway, job_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(gateway: Gateway, job_id: str, after: dict[str, str] | None) -> AsyncIterator[str]:
    """The job's events as SSE messages; a comment after `sse_keepalive_s` of quiet (proxies close idle
    streams), and the end of the stream if the job's records expire meanwhile. When Redis goes away the
    stream ends cleanly, asking the client to reconnect (SSE `retry`, in ms) with Last-Event-ID: the
    headers are sent, so an error status can no longer be."""
    keepalive = gateway.settings.sse_keepalive_s
    events = gateway.jobs.waiting.follow([job_id], after, idle_s=keepalive)
    last_sent = time.monotonic()
    try:
        async for event in events:
            if event is not None:
                yield sse_message(event)
            elif await gateway.jobs.get(job_id) is None:
                return
            elif time.monotonic() - last_sent >= keepalive:
                yield ": keepalive\n\n"
            else:
                continue
            last_sent = time.monotonic()
    except Unavailable as e:
        why = " ".join(e.message.split())  # one comment line
        yield f": {why}; the job goes on: reconnect with Last-Event-ID\nretry: {e.retry_after_s * 1000}\n\n"
    finally:
        await events.aclose()


def sse_message(event: Event) -> str:
    kind = SSE_TYPES.get(event.type, event.type)
    data: dict[str, Any] = {"job_id": event.job_id, "type": kind, "time": float(event.fields.get("time", 0))}
    if event.type == "progress":
        data |= {"step": int(event.fields.get("step", 0)), "total": int(event.fields.get("steps", 0))}
    if "error" in event.fields:
        data["error"] = event.fields["error"]
    if event.type == JobStatus.SUCCEEDED:
        data["location"] = f"/v1/jobs/{event.job_id}"
    if event.type == "preview":  # the request asked for previews: a PNG of the x0 estimate
        index = int(event.fields.get("index", 0))
        data |= {"index": index, "step": int(event.fields.get("step", 0))}
        data["location"] = f"/v1/jobs/{event.job_id}/previews/{index}"
    return f"id: {event.id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


async def job_public(gateway: Gateway, state: JobState, image: Image | None) -> JobPublic:
    result = None
    if image is not None:
        result = ImagePublic(
            job_id=state.id, seed=image.seed, png_base64=base64.b64encode(image.png).decode()
        )
    return JobPublic(
        id=state.id,
        model=state.model,
        status=str(state.status),
        queue_position=await gateway.jobs.queue_position(state),
        progress=ProgressPublic(step=state.step, total=state.steps),
        created=state.created,
        started=state.started,
        finished=state.finished,
        error=state.error,
        result=result,
        webhook=_webhook(state),
    )


def _webhook(state: JobState) -> WebhookPublic | None:
    if not state.webhook:
        return None
    delivered = state.webhook_delivered
    return WebhookPublic(
        attempts=state.webhook_attempts, last_status=state.webhook_status, delivered=delivered
    )


def _is_event_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit() and len(value) < 40
