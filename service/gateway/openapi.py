"""The OpenAPI document as this gateway is configured: the settings' limits and the models' names in
the request schemas (the schemas in `schemas.py` hold only the protocol's hard bounds), and no API key
asked for while authentication is off. What JSON Schema cannot say (the pixel budget, that an image
is a PNG of a suitable size) is still checked, and answered 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ..settings import GatewaySettings


def configure_openapi(app: FastAPI, settings: GatewaySettings, multiples: list[int]) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            _limit(document, settings, multiples)
            if not settings.api_keys:
                _without_auth(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _limit(document: dict[str, Any], settings: GatewaySettings, multiples: list[int]) -> None:
    limits: dict[str, dict[str, Any]] = {
        "prompt": {"maxLength": settings.max_prompt_chars},
        "negative_prompt": {"maxLength": settings.max_prompt_chars},
        "n": {"maximum": settings.max_n},
        "steps": {"maximum": settings.max_steps},
        "width": {"maximum": settings.max_side},
        "height": {"maximum": settings.max_side},
        "model": {"enum": list(settings.models)},
    }
    if len(set(multiples)) == 1:  # one factor for every model: sizes are multiples of it
        for side in ("width", "height"):
            limits[side] |= {"multipleOf": multiples[0], "minimum": multiples[0]}
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("Txt2ImgCreate", "Img2ImgCreate"):
        properties = schemas.get(name, {}).get("properties", {})
        for field, extra in limits.items():
            if field in properties:
                _constrain(properties[field], extra)


def _constrain(schema: dict[str, Any], extra: dict[str, Any]) -> None:
    """Applies to the non-null branch of an `anyOf: [X, null]` (an optional field)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") != "null":
            branch.update(extra)
            if "enum" in extra:
                branch.pop("pattern", None)


def _without_auth(document: dict[str, Any]) -> None:
    document.get("components", {}).pop("securitySchemes", None)
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
