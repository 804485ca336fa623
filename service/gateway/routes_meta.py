"""GET /v1/models, /v1/loras, /healthz (live), /readyz (Redis reachable), /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import Caller, GatewayDep
from .openai_api import openai_models
from .schemas import ErrorPublic, LoraPublic, LorasPublic, ModelPublic, ModelsPublic

router = APIRouter(tags=["service"])


@router.get("/v1/models", response_model=ModelsPublic, responses={401: {"model": ErrorPublic}})
async def list_models(gateway: GatewayDep, _owner: Caller) -> ModelsPublic:
    """The models served here: native size, size multiple, defaults, samplers, live workers; and in
    OpenAI's shape (`data`: the models, then their aliases)."""
    models = [ModelPublic(**model) for model in await gateway.models()]
    return ModelsPublic(models=models, data=openai_models(gateway))


@router.get("/v1/loras", response_model=LorasPublic, responses={401: {"model": ErrorPublic}})
async def list_loras(gateway: GatewayDep, _owner: Caller) -> LorasPublic:
    """The LoRA adapters a request may name in `loras` (the files of LDM_LORA_DIR)."""
    loras = await asyncio.to_thread(gateway.lora_list)
    return LorasPublic(loras=[LoraPublic(**lora) for lora in loras])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Live: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis is unreachable"}})
async def readyz(gateway: GatewayDep) -> Any:
    """Ready: Redis answers (jobs for a known model are accepted even while no worker is alive)."""
    if await gateway.jobs.ping():
        return {"status": "ready"}
    return JSONResponse({"status": "redis unreachable"}, status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(gateway: GatewayDep) -> Response:
    # The queue gauges read Redis (blocking) while collecting: off the event loop.
    body = await asyncio.to_thread(gateway.metrics.scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
