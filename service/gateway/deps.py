"""Typed FastAPI dependencies: the shared gateway state and the caller's owner id (API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBearer
from starlette.requests import HTTPConnection

from .generation import Gateway

# auto_error=False: the gateway answers 401 itself, and only when keys are configured. The schemes
# are declared for the OpenAPI document; the key is read from the Authorization header (auth.py).
bearer = HTTPBearer(auto_error=False, description="an API key from LDM_API_KEYS (when set)")


class DeclaredBasic(HTTPBasic):
    """HTTP Basic in the OpenAPI document only: FastAPI's own check would refuse malformed credentials
    even while authentication is off."""

    async def __call__(self, request: HTTPConnection) -> None:
        return None


basic = DeclaredBasic(
    scheme_name="HTTPBasic",
    auto_error=False,
    description="any user name, an API key from LDM_API_KEYS as password",
)


# Dependencies are `async def`: FastAPI runs a plain `def` one on a worker thread, a hand-off that costs
# more than the work (and adds up under a burst of requests).
async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def caller(
    request: Request,
    gateway: GatewayDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The owner id of the caller's key ("" while authentication is off); 401 without a valid key."""
    return gateway.authenticate(request.headers.get("authorization"))


async def basic_caller(
    request: Request,
    gateway: GatewayDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    _basic: Annotated[None, Depends(basic)],
) -> str:
    """As `caller`, with HTTP Basic (the key as password) also declared: AUTOMATIC1111's clients."""
    return gateway.authenticate(request.headers.get("authorization"))


Caller = Annotated[str, Depends(caller)]
BasicCaller = Annotated[str, Depends(basic_caller)]
