"""Pure ASGI middleware: the body-size bound (413 before parsing) and the request metrics."""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import GatewayMetrics


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body reading passes it on instead of answering 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """Answers 413 when Content-Length says the body is too big, without reading it; a chunked body
    is counted as it streams in and refused as soon as it passes the bound."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            self.metrics.rejected.labels("body_too_large").inc()
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    self.metrics.rejected.labels("body_too_large").inc()
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send(
            {"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]}
        )
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """`ldm_http_requests_total{route,status}` and `ldm_http_request_seconds{route}`, by route template
    (`/v1/jobs/{job_id}`, not the id), so that the label set stays small."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = _route(scope)
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - started)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("ldm_route")  # refused before routing: its path
    return str(path) if path else "unmatched"
