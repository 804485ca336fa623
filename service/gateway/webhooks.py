"""Webhooks: a job's chosen events POSTed to the URL its request gave, signed, at least once.

- **Which URLs**: only hosts in `LDM_WEBHOOK_ALLOW` (exact hosts, or suffixes written `.example.com`);
  after DNS resolution a private, loopback, link-local or reserved address is refused unless that
  exact host or address is in the list (`LDM_WEBHOOK_ALLOW=127.0.0.1` allows a local receiver and
  nothing else on loopback). Checked at submit (422 naming `webhook.url`) and again before each
  attempt (the name may resolve elsewhere by then). Redirects are not followed.
- **Signature** (Stripe's scheme): `LDM-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "t.body">`,
  keyed with `LDM_WEBHOOK_SECRET`; `verify` is the receiver's side (README).
- **Delivery**: the job's state changes queue a delivery in the stream `ldm:webhooks` in the same
  atomic step as the event (`queue/scripts.py`), so none is lost with a gateway. Gateways read it as
  one consumer group; a delivery that fails is acknowledged and put in `ldm:webhooks:retry` for
  later (exponential backoff from `LDM_WEBHOOK_BACKOFF_S`), until `LDM_WEBHOOK_MAX_ATTEMPTS` or
  `LDM_WEBHOOK_MAX_AGE_S`; one whose gateway died is claimed by another after a minute. Each
  attempt is counted in the job's hash (`GET /v1/jobs/{id}`: `webhook`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import redis.asyncio

from ..queue import keys
from ..queue.states import JobState, Webhook
from ..queue.store import text
from ..settings import GatewaySettings
from .errors import InvalidField
from .metrics import GatewayMetrics
from .signed_urls import UrlSigner

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "LDM-Signature"
CLAIM_IDLE_MS = 60_000  # a delivery its gateway has not finished for this long is taken over
# Moves the retries that are due back to the stream, atomically. KEYS: retries, stream. ARGV: now.
_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, item in ipairs(due) do
  local d = cjson.decode(item)
  redis.call('XADD', KEYS[2], '*', 'job', d.job, 'type', d.type, 'time', d.time, 'attempt', d.attempt)
  redis.call('ZREM', KEYS[1], item)
end
return #due
"""


def sign(secret: str, body: bytes, now: int) -> str:
    digest = hmac.new(secret.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={now},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does: the signature is ours, over this body, and recent."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, body, stamp).partition(",v1=")[2]
    return abs(time.time() - stamp) <= tolerance_s and hmac.compare_digest(expected, parts.get("v1", ""))


async def check_url(url: str, allow: list[str]) -> None:
    """InvalidField (`webhook.url`) unless the URL may be called; see the module's docstring."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidField("webhook.url", "must be an http or https URL with a host")
    exact = host in allow
    if not exact and not any(entry.startswith(".") and host.endswith(entry) for entry in allow):
        raise InvalidField("webhook.url", f"host {host!r} is not in LDM_WEBHOOK_ALLOW")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidField("webhook.url", f"host {host!r} does not resolve ({e})") from None
    for address in {str(info[4][0]) for info in infos}:
        ip = ipaddress.ip_address(address.split("%")[0])
        private = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
        if private and not exact and address not in allow:
            raise InvalidField("webhook.url", f"{host!r} resolves to {address}, a private address")


class Dispatcher:
    """Delivers the queued webhook events; every gateway runs one (`run`)."""

    def __init__(
        self,
        settings: GatewaySettings,
        client: redis.asyncio.Redis,
        signer: UrlSigner,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.client = client
        self.signer = signer
        self.metrics = metrics
        self.name = uuid.uuid4().hex
        self._due = client.register_script(_DUE)
        self._http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    async def run(self) -> None:
        while True:
            try:
                await self._ensure_group()
                while True:
                    await self._due(keys=[keys.WEBHOOK_RETRIES, keys.WEBHOOKS], args=[time.time()])
                    entries = await self._claim_stalled() + await self._read()
                    await asyncio.gather(*(self._deliver(entry_id, fields) for entry_id, fields in entries))
            except asyncio.CancelledError:
                await self._http.aclose()
                raise
            except redis.RedisError as e:
                log.debug("webhooks: redis unavailable (%s)", e)
                await asyncio.sleep(1.0)

    async def _ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(keys.WEBHOOKS, keys.WEBHOOK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _read(self) -> list[tuple[str, dict[str, str]]]:
        reply: Any = await self.client.xreadgroup(
            keys.WEBHOOK_GROUP, self.name, {keys.WEBHOOKS: ">"}, count=32, block=500
        )
        return [(text(i), _fields(f)) for _stream, entries in reply or [] for i, f in entries]

    async def _claim_stalled(self) -> list[tuple[str, dict[str, str]]]:
        reply: Any = await self.client.xautoclaim(
            keys.WEBHOOKS, keys.WEBHOOK_GROUP, self.name, CLAIM_IDLE_MS, "0-0", count=32
        )
        return [(text(i), _fields(f)) for i, f in reply[1] if f]

    async def _deliver(self, entry_id: str, event: dict[str, str]) -> None:
        job_key = keys.job(event.get("job", ""))
        raw = {text(k): text(v) for k, v in (await self.client.hgetall(job_key)).items()}
        outcome = await self._attempt(raw, event)
        attempt = int(event.get("attempt", "1"))
        if outcome != "delivered" and raw:
            age = time.time() - float(event.get("time", "0") or 0)
            if attempt < self.settings.webhook_max_attempts and age < self.settings.webhook_max_age_s:
                delay = self.settings.webhook_backoff_s * 2 ** (attempt - 1)
                retry = json.dumps({**event, "attempt": attempt + 1})
                await self.client.zadd(keys.WEBHOOK_RETRIES, {retry: time.time() + delay})
                outcome = "retrying"
            else:
                outcome = "gave_up"
                what = (raw.get("id"), event.get("type"), attempt)
                log.warning("webhook of job %s (%s): giving up after %d attempts", *what)
        self.metrics.webhooks.labels(outcome).inc()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xack(keys.WEBHOOKS, keys.WEBHOOK_GROUP, entry_id)
            pipe.xdel(keys.WEBHOOKS, entry_id)
            await pipe.execute()

    async def _attempt(self, raw: dict[str, str], event: dict[str, str]) -> str:
        """POSTs the event once; "delivered", or why not (also recorded in the job's hash)."""
        if not raw.get("webhook"):
            return "delivered"  # the job is gone (its records expired): nothing left to say
        state = JobState.from_hash(raw)
        hook = Webhook.model_validate_json(raw["webhook"])
        try:
            await check_url(hook.url, self.settings.webhook_allow)
            body = json.dumps(self._payload(state, raw, event)).encode()
            signature = sign(self._secret(), body, int(time.time()))
            headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature}
            reply = await self._http.post(hook.url, content=body, headers=headers)
            status = str(reply.status_code)
            ok = 200 <= reply.status_code < 300
        except InvalidField as e:
            status, ok = e.detail, False
        except httpx.HTTPError as e:
            status, ok = type(e).__name__, False
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(keys.job(state.id), "webhook_attempts", 1)
            pipe.hset(keys.job(state.id), "webhook_status", status)
            if ok:
                pipe.hincrby(keys.job(state.id), "webhook_delivered", 1)
            await pipe.execute()
        return "delivered" if ok else "failed"

    def _payload(self, state: JobState, raw: dict[str, str], event: dict[str, str]) -> dict[str, Any]:
        spec = json.loads(raw.get("spec") or "{}")
        started = state.started or state.created
        timings = {"queue_ms": (started - state.created) * 1000}
        if state.finished is not None:
            timings["inference_ms"] = (state.finished - started) * 1000
        payload: dict[str, Any] = {
            "id": state.id,
            "event": event.get("type"),
            "status": str(state.status),
            "model": state.model,
            "seed": spec.get("seed"),
            "timings": timings,
        }
        if state.error:
            payload["error"] = state.error
        if event.get("type") == "succeeded":
            base = (
                self.settings.public_url.rstrip("/")
                or f"http://{self.settings.host}:{self.settings.http_port}"
            )
            payload["image_url"] = self.signer.link(base, state.id)
        return payload

    def _secret(self) -> str:
        return self.settings.webhook_secret.get_secret_value()


def _fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}
