"""Refusing cheaply while a backlog is full.

The enqueue script is the authority on room in a model's backlog, but asking it costs a Redis round
trip, and reaching it costs the whole request path: body parsing, validation, planning. Under a burst
far past the bound nearly every request is refused, so the refusal path sets the pace. Once the script
has refused a model's request, `Admission` remembers it for `HOLD_S`: the model's next requests are
refused here, with the same answer, before their body is parsed (`FastRefusal`, for the native HTTP
routes) or planned (`Gateway.submit`, for every API). A request the script admits clears the mark,
unless it filled the backlog (then the mark is set at once, before the burst's next requests ask);
every `HOLD_S` one request asks the script again, so a slot that frees is taken within `HOLD_S`.
For `PRESSURE_S` after a refusal, the requests on their way to the script are paced by the room it
last reported: a burst that arrives as a few slots free sends Redis that many, not all of itself.

A request with an Idempotency-Key always reaches the script: it may be the retry of one that was
accepted, whose job ids it must get back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import GatewayError, QueueBytesFull, QueueFull

HOLD_S = 0.1  # how long a refusal stands for a model's next requests
PRESSURE_S = 1.0  # how long after a refusal admissions are paced by the room the script reports
PEEK_BYTES = 64 * 1024  # larger bodies (images) are not read early: they go the whole way


@dataclass(frozen=True)
class Refusal:
    kind: type[QueueFull] | type[QueueBytesFull]
    message: str
    retry_after_s: int
    until: float  # time.monotonic()
    body: bytes  # the HTTP answer's body, built once

    def error(self) -> GatewayError:
        return self.kind(self.message, self.retry_after_s)


class Admission:
    def __init__(self, hold_s: float = HOLD_S, pressure_s: float = PRESSURE_S) -> None:
        self.hold_s = hold_s
        self.pressure_s = pressure_s
        self._refusals: dict[str, Refusal] = {}  # standing
        self._last: dict[str, Refusal] = {}  # the last refusal, for those of a crowded model
        self._room: dict[str, tuple[float, int]] = {}  # under pressure: (until, room last reported)
        self._in_flight: dict[str, int] = {}  # jobs of requests on their way to the script

    @property
    def armed(self) -> bool:
        """Whether any model may be refused here (nothing to check otherwise)."""
        return bool(self._refusals or self._room)

    def standing(self, model: str, probe: bool = False) -> Refusal | None:
        """The model's refusal, while it stands. When it has run out and the caller will ask the script
        (`probe`), the caller goes on while the others are refused for one more hold: a burst sends one
        request to Redis per hold, not all of those that arrive at once."""
        refusal = self._refusals.get(model)
        if refusal is None:
            return None
        now = time.monotonic()
        if now < refusal.until:
            return refusal
        if probe:
            self._refusals[model] = dataclasses.replace(refusal, until=now + self.hold_s)
        return None

    def crowded(self, model: str, n: int = 1, probe: bool = False) -> Refusal | None:
        """The refusal a request for n jobs gets here: the standing one, or, while the model is under
        pressure (a refusal within `pressure_s`), the last one when the requests already on their way
        to the script would fill the room it last reported (one of them may always go)."""
        refusal = self.standing(model, probe)
        if refusal is not None or model not in self._room:
            return refusal
        until, room = self._room[model]
        if time.monotonic() >= until:
            del self._room[model]
            return None
        flying = self._in_flight.get(model, 0)
        return self._last[model] if flying and flying + n > room else None

    @contextmanager
    def reserve(self, model: str, n: int) -> Iterator[None]:
        """Raises the refusal a request for n jobs gets here (QueueFull or QueueBytesFull), or counts
        its jobs as on their way to the script until the block ends."""
        if self.armed and (refusal := self.crowded(model, n, probe=True)) is not None:
            raise refusal.error()
        self._in_flight[model] = self._in_flight.get(model, 0) + n
        try:
            yield
        finally:
            left = self._in_flight.pop(model) - n
            if left:
                self._in_flight[model] = left

    def refused(self, model: str, error: QueueFull | QueueBytesFull) -> None:
        body = json.dumps({"detail": error.message, "job_ids": []}).encode()
        now = time.monotonic()
        refusal = Refusal(type(error), error.message, error.retry_after_s, now + self.hold_s, body)
        self._refusals[model] = self._last[model] = refusal
        self._room[model] = (now + self.pressure_s, 0)

    def admitted(self, model: str, room: int) -> None:
        """The script took a request; `room`: jobs the backlog takes still."""
        self._refusals.pop(model, None)
        if model in self._room:
            self._room[model] = (time.monotonic() + self.pressure_s, room)

    def clear(self) -> None:
        self._refusals.clear()
        self._room.clear()


# The native routes whose body names the model (`model`); None: the route's default model.
NATIVE_ROUTES = frozenset({"/v1/txt2img", "/v1/img2img", "/v1/upscale"})


class FastRefusal:
    """Pure ASGI: while a model's refusal stands, a small POST to a native generation route naming it
    (or its default) is answered 429 / 503 after a peek at its body, before routing, parsing and
    validation. Everything else passes through untouched (the body it read is replayed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Any = getattr(getattr(scope.get("app"), "state", None), "gateway", None)
        if (
            scope["type"] != "http"
            or gateway is None
            or not gateway.jobs.admission.armed
            or scope["method"] != "POST"
            or scope["path"] not in NATIVE_ROUTES
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if b"idempotency-key" in headers or not length.isdigit() or int(length) > PEEK_BYTES:
            await self.app(scope, receive, send)
            return
        messages = [await receive()]
        while messages[-1]["type"] == "http.request" and messages[-1].get("more_body", False):
            messages.append(await receive())
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        refusal = gateway.jobs.admission.crowded(*_model_and_n(body, scope["path"], gateway))
        if refusal is not None and messages[-1]["type"] == "http.request":
            gateway.metrics.rejected.labels(REASONS[refusal.kind]).inc()
            scope["ldm_route"] = scope["path"]
            await _answer(send, refusal)
            return
        replay = iter(messages)

        async def replaying() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replaying, send)


REASONS = {QueueFull: "queue_full", QueueBytesFull: "queue_bytes_full"}


def _model_and_n(body: bytes, path: str, gateway: Any) -> tuple[str, int]:
    """The model a body names (or the route's default) and its number of images (1 unless given)."""
    try:
        values = json.loads(body)
    except ValueError:
        values = None
    values = values if isinstance(values, dict) else {}
    n = values.get("n", 1)
    n = n if isinstance(n, int) and n > 0 else 1
    model = values.get("model")
    if isinstance(model, str):
        return model, n
    if path == "/v1/upscale":
        return str(gateway.default_model_for("upscale") or gateway.catalog.default), n
    return str(gateway.catalog.default), n


async def _answer(send: Send, refusal: Refusal) -> None:
    status = QueueBytesFull.http_status if refusal.kind is QueueBytesFull else QueueFull.http_status
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(refusal.body)).encode()),
        (b"retry-after", str(refusal.retry_after_s).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": refusal.body})
