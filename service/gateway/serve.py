"""Running the gateway: uvicorn serves HTTP and, on the same asyncio loop, the app's lifespan runs gRPC."""

from __future__ import annotations

import logging

import uvicorn

from ..settings import GatewaySettings
from .app import create_app

log = logging.getLogger(__name__)
GRACEFUL_S = 5  # open requests (event streams included) get this long after SIGTERM


def serve(settings: GatewaySettings) -> int:
    """Serves until SIGINT / SIGTERM; returns the exit code."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.http_port,
        loop="asyncio",  # grpc.aio runs on the plain asyncio loop
        log_config=None,  # the `ldm` command's logging
        access_log=settings.access_log,
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    server = uvicorn.Server(config)
    log.info(
        "gateway: HTTP on http://%s:%d (docs at /docs), redis %s, models %s",
        settings.host,
        settings.http_port,
        settings.redis_url,
        ", ".join(settings.models),
    )
    server.run()
    return 0 if server.started else 1
