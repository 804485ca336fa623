"""What every part of a request's definition shares (`request.py`, `request_sdxl.py`): the error that
names a field, JSON Schema's idea of an integer, and how a served model is named. Torch-free."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

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
