"""Expiring links to stored images, signed so that they work without an API key (the OpenAI API's
`response_format: url`).

A link names a job and an expiry time and carries HMAC-SHA256(secret, "job_id:expires"): it cannot be
made to name another job or to live longer. The secret is `LDM_URL_SECRET`; without one, each gateway
process draws its own, and its links die with it (and are refused by other replicas).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time

log = logging.getLogger(__name__)


class UrlSigner:
    def __init__(self, secret: str, ttl_s: int) -> None:
        if not secret:
            log.warning(
                "LDM_URL_SECRET is not set: image links are signed with a random key, so they stop "
                "working when this gateway restarts and are refused by other gateway replicas"
            )
            secret = secrets.token_hex(32)
        self._key = secret.encode()
        self.ttl_s = ttl_s

    def _signature(self, job_id: str, expires: int) -> str:
        return hmac.new(self._key, f"{job_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, job_id: str, now: float | None = None) -> tuple[int, str]:
        """The expiry time (Unix seconds) and signature of a new link to the job's image."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return expires, self._signature(job_id, expires)

    def valid(self, job_id: str, expires: int, signature: str) -> bool:
        """Whether the signature is this gateway's for the job and expiry (expired or not)."""
        return hmac.compare_digest(self._signature(job_id, expires), signature)

    @staticmethod
    def expired(expires: int, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= expires

    def link(self, base: str, job_id: str) -> str:
        """An absolute link to the job's PNG under `base` (this gateway as clients reach it)."""
        expires, signature = self.sign(job_id)
        return f"{base}/v1/images/files/{job_id}.png?expires={expires}&signature={signature}"
