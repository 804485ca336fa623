"""What every part of a request's definition shares (`request.py`, `request_sdxl.py`,
`request_upscale.py`): the error that names a field, JSON Schema's idea of an integer, images as base64
text, and how a served model is named. Torch-free."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

# How a served model is named: the `model` field of every API, and part of its Redis keys.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RequestError(ValueError):
    """A request that cannot run as given; `field` names the offending field (the request's name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 3.0: accepted as 3 (strings and booleans are still refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict about types (no "5" for 5, no true for 1), but with JSON Schema's idea of an integer.
Int = Annotated[int, BeforeValidator(_integral)]


def decode_base64(value: Any, kinds: str) -> Any:
    """Image bytes from base64 text (standard or URL-safe alphabet); bytes pass as they are; `kinds`
    names the formats in the error."""
    if not isinstance(value, str):
        return value
    try:
        altchars = b"-_" if ("-" in value or "_" in value) else None
        return base64.b64decode(value, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be base64 (a {kinds} image)") from None


# How image bytes are written in a job's JSON, and described in the OpenAPI schema.
AS_BASE64 = PlainSerializer(lambda b: base64.urlsafe_b64encode(b).decode(), return_type=str, when_used="json")
IMAGE_SCHEMA = WithJsonSchema(
    {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}
)
