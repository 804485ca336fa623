"""The gateway's app: `create_app(settings)` builds the FastAPI app; its lifespan connects to Redis, reads
the models' headers and starts the gRPC server on the same event loop (when `grpc_port` is set).

    uvicorn --factory service.gateway.app:create_app     # or `ldm gateway`, which sets the loop up

No torch here, or in anything this imports: the gateway starts in well under a second on a CPU node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..queue.connection import COMMAND_CONNECTIONS, async_client_for
from ..queue.store import JobStore
from ..settings import GatewaySettings, gateway_settings
from . import a1111_api, openai_api, routes_images, routes_jobs, routes_meta
from .admission import FastRefusal
from .catalog import Catalog
from .errors import GatewayError, InvalidField
from .generation import Gateway
from .grpc_server import start_grpc
from .job_service import JobService
from .metrics import GatewayMetrics
from .middleware import BodyLimit, RequestMetrics
from .openapi import configure_openapi
from .routes_page import mount_page
from .signed_urls import UrlSigner
from .sweeper import sweep_forever
from .webhooks import Dispatcher

log = logging.getLogger(__name__)
GRPC_GRACE_S = 5.0
DESCRIPTION = """Text-to-image and image-to-image with latent diffusion models, through a Redis job queue.

Synchronous by default: the answer carries the images. With `Prefer: respond-async` the answer is
`202` with `Location: /v1/jobs/{id}`: poll it, follow `/v1/jobs/{id}/events` (server-sent events) or
cancel it with `DELETE`. A request for `n` images makes `n` jobs (seeds `seed` .. `seed + n - 1`),
each with its own id. With API keys set (`LDM_API_KEYS`), send `Authorization: Bearer <key>`.

The same service also speaks OpenAI's Images API (`/v1/images/...`, errors in OpenAI's shape) and
AUTOMATIC1111's web UI API (`/sdapi/v1/...`, HTTP Basic with the key as password), for their clients.
"""


def build_gateway(settings: GatewaySettings, metrics: GatewayMetrics, catalog: Catalog) -> Gateway:
    store = JobStore.from_settings(settings)
    # Blocking reads wait up to jobs.BLOCK_S: the socket timeout must outlast them.
    client = async_client_for(settings, max_connections=COMMAND_CONNECTIONS)
    jobs = JobService(store, client, settings.retry_after_s, waits=async_client_for(settings))
    metrics.watch_queue(lambda: jobs.queue_gauges(catalog.names()))
    return Gateway(settings, catalog, jobs, metrics)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or gateway_settings()
    metrics = GatewayMetrics()
    catalog = Catalog(settings.models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = build_gateway(settings, metrics, catalog)
        app.state.gateway = gateway
        server: grpc.aio.Server | None = None
        if settings.grpc_port:
            server, _port = await start_grpc(gateway, settings.host, settings.grpc_port)
        sweeper = asyncio.create_task(sweep_forever(gateway.jobs.store, catalog, settings.expiry_sweep_s))
        dispatcher = Dispatcher(settings, gateway.jobs.client, app.state.url_signer, metrics)
        webhooks = asyncio.create_task(dispatcher.run())
        try:
            yield
        finally:
            sweeper.cancel()
            webhooks.cancel()
            if server is not None:
                await server.stop(GRPC_GRACE_S)
            await gateway.jobs.close()
            gateway.jobs.store.redis.close()

    app = FastAPI(title="ldm-service gateway", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.add_middleware(FastRefusal)  # inside the body bound: it peeks at small bodies only
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the 413s too
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error(metrics))
    app.add_exception_handler(HTTPException, _http_error(metrics))
    app.state.url_signer = UrlSigner(settings.url_secret.get_secret_value(), settings.url_ttl_s)
    for module in (routes_images, routes_jobs, routes_meta, openai_api, a1111_api):
        app.include_router(module.router)
    mount_page(app)  # GET /: the page to try it
    configure_openapi(app, settings, [info.config.downsample_factor for info in catalog.infos()])
    return app


async def _gateway_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, GatewayError)
    if isinstance(e, InvalidField):  # the shape of FastAPI's own 422s: detail[].loc names the field
        detail = [{"loc": ["body", *e.field.split(".")], "msg": e.detail, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)
    body = {"detail": e.message, "job_ids": e.job_ids}
    return JSONResponse(body, status_code=e.http_status, headers=e.headers)


def _http_error(metrics: GatewayMetrics) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handler(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        if e.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8): a 422 here
            metrics.rejected.labels("invalid").inc()
            detail = [{"loc": ["body"], "msg": "the body is not valid JSON", "type": "json_invalid"}]
            return JSONResponse({"detail": detail}, status_code=422)
        return await http_exception_handler(request, e)

    return handler


def _validation_error(metrics: GatewayMetrics) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        metrics.rejected.labels("invalid").inc()
        detail = [
            {
                "loc": list(err.get("loc", ())),
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
            for err in e.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    return handler
