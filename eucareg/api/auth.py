"""Who may call what. Operator endpoints: loopback only, with the admin bearer token. Component
and peer endpoints: requests signed by the sender's own key, fresh, never replayed; the handler
then decides whether that key may have what it asks for (docs/security.md).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from eucareg.api.context import CONTEXT
from eucareg.api.validate import ApiError, as_object, parse_json
from eucareg.pki import credentials as cred

SIGNATURE_HEADER = "X-Eucareg-Signature"
CLOCK_SKEW = 300.0  # seconds a signed request may be early or late
MAX_NONCE = 128  # characters; agents send 32, and every nonce is kept for a while

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the operator ------------------------------------------------------------------------------


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def check_admin(remote: str | None, authorization: str, admin_token: str) -> None:
    """Raise the ApiError an operator request gets, unless it may pass."""
    if not is_loopback(remote):
        raise ApiError(403, "operator endpoints answer on loopback only")
    given = authorization.removeprefix("Bearer ").strip()
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError),
    # and the header is whatever the client sent. surrogateescape keeps undecodable bytes.
    if not given or not hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), admin_token.encode()
    ):
        raise ApiError(401, "the local admin credential is required (see docs/security.md)")


def operator_only(handler: Handler) -> Handler:
    """Wrap an operator endpoint: loopback and the admin credential, else 403 or 401."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        token = request.app[CONTEXT].admin_token
        check_admin(request.remote, request.headers.get("Authorization", ""), token)
        return await handler(request)

    return checked


# -- signed requests ---------------------------------------------------------------------------


class NonceCache:
    """The nonces of accepted signed requests, kept as long as their timestamps could still
    pass the freshness check: a captured request cannot be replayed in that time, and after it
    the timestamp refuses it."""

    def __init__(self, keep: float = 2 * CLOCK_SKEW) -> None:
        self._keep = keep
        self._seen: OrderedDict[str, float] = OrderedDict()  # oldest first

    def fresh(self, nonce: str, now: float) -> bool:
        # Drop from the old end only: each nonce is dropped once, so a flood costs O(1) each.
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if at > now - self._keep:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)


NONCES = web.AppKey("nonces", NonceCache)


def signed_body(key: cred.PrivateKey, fields: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A request body carrying our public key, a time and a nonce, and its signature header."""
    body = json.dumps(
        {
            **fields,
            "public_key": cred.public_pem(key.public_key()),
            "timestamp": time.time(),
            "nonce": secrets.token_hex(16),
        }
    ).encode()
    return body, {SIGNATURE_HEADER: cred.sign(key, body), "Content-Type": "application/json"}


def verify_signed(
    body: bytes, signature: str, nonces: NonceCache, now: float | None = None
) -> tuple[dict[str, Any], cred.PublicKey]:
    """Check a signed request: well formed (400), signature, freshness, no replay (401)."""
    payload = as_object(parse_json(body), "a signed request")
    pem, stamp, nonce = payload.get("public_key"), payload.get("timestamp"), payload.get("nonce")
    if not isinstance(pem, str):
        raise ApiError(400, "malformed signed request: public_key must be a PEM string")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        # NaN would pass every freshness comparison, and the request could be replayed forever.
        raise ApiError(400, "malformed signed request: timestamp must be a Unix time")
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
        raise ApiError(400, f"malformed signed request: nonce must be 1-{MAX_NONCE} characters")
    try:
        public_key = cred.load_public_pem(pem)
    except cred.CredentialError as exc:
        raise ApiError(400, f"malformed signed request: {exc}") from exc
    now = time.time() if now is None else now
    if not cred.verify(public_key, body, signature):
        raise ApiError(401, "signature does not verify with the enclosed key")
    if abs(now - stamp) > CLOCK_SKEW:
        raise ApiError(401, f"request time is {now - stamp:+.0f}s off; check the clocks")
    if not nonces.fresh(nonce, now):
        raise ApiError(401, "replayed request (nonce already used)")
    return payload, public_key


async def read_signed(request: web.Request) -> tuple[dict[str, Any], cred.PublicKey]:
    """The verified payload and key of a signed request (ApiError otherwise)."""
    body = await request.read()
    signature = request.headers.get(SIGNATURE_HEADER, "")
    return verify_signed(body, signature, request.app[NONCES])
