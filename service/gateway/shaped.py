"""Routes that answer errors in their own API's shape (the OpenAI and AUTOMATIC1111 layers).

`shaped_route(shape)` is a route class: every error raised while one of its routes handles a request
(a body that does not validate, a field the request type refuses, a gateway refusal, an HTTP error)
goes to the API's `shape`, which builds the answer. Refused input is counted as the native API's is.
The native API's shape is app.py's exception handlers, for everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ..ldm.request import RequestError
from .errors import GatewayError, InvalidField
from .middleware import BodyTooLarge

ErrorShape = Callable[[Request, Exception], Response]
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def shaped_route(shape: ErrorShape) -> type[APIRoute]:
    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except BodyTooLarge:
                    raise  # answered by the middleware, which has stopped reading the body
                except RequestError as e:
                    return shape(request, request.app.state.gateway.invalid(e))
                except (RequestValidationError, HTTPException) as e:
                    if not isinstance(e, HTTPException) or e.status_code in (400, 422):
                        request.app.state.gateway.metrics.rejected.labels("invalid").inc()
                    return shape(request, e)
                except (GatewayError, InvalidField) as e:
                    return shape(request, e)

            return shaped

    return ShapedRoute
