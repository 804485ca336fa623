"""Typed FastAPI dependencies: the shared gateway state and the caller's owner id (API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .generation import Gateway

# auto_error=False: the gateway answers 401 itself, and only when keys are configured.
bearer = HTTPBearer(auto_error=False, description="an API key from LDM_API_KEYS (when set)")


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def caller(
    gateway: GatewayDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The owner id of the caller's key ("" while authentication is off); 401 without a valid key."""
    authorization = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    return gateway.authenticate(authorization)


Caller = Annotated[str, Depends(caller)]
