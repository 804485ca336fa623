"""API keys: `Authorization: Bearer KEY` (gRPC metadata `authorization`), or HTTP Basic with the key as
the password (what AUTOMATIC1111's `--api-auth` clients send; the user name is not checked); off when
no key is set.

Keys are compared as SHA-256 digests in constant time (hmac.compare_digest, against every key, no
early exit). A job's `owner` is the hex digest of the key that created it, never the key: a job is
visible to that key only, and other keys get 404, as for a job that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from .errors import Unauthenticated

ANONYMOUS = ""  # the owner of every job while authentication is off


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [key_digest(key) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str:
        """The caller's owner id from an Authorization value; Unauthenticated without a valid key."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() == "basic":
            key = _basic_password(key)
        elif scheme.lower() != "bearer":
            key = ""
        if not key:
            raise Unauthenticated("an API key is required: Authorization: Bearer <key>")
        digest = key_digest(key)
        valid = False
        for known in self._digests:
            valid |= hmac.compare_digest(digest, known)
        if not valid:
            raise Unauthenticated("invalid API key")
        return digest.hex()

    def may_see(self, caller: str, owner: str) -> bool:
        return not self.enabled or hmac.compare_digest(caller, owner)


def _basic_password(credentials: str) -> str:
    """The password of Basic credentials (base64 of `user:password`), "" when they do not decode."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, ValueError):
        return ""
    return decoded.partition(":")[2]
