"""Who may call what. Operator endpoints: loopback only, with the admin bearer token. Component
and peer endpoints: requests signed by the sender's own key for one method, path and registrar,
fresh, never replayed; the handler then decides whether that key may have what it asks for
(docs/security.md). Signed requests are checked cheapest first, so a flood of forged ones costs
the registrar a JSON parse each, not a signature check (docs/credentials.md, "Signed requests").
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import hmac
import ipaddress
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web

from eucareg.api import limits
from eucareg.api.context import CONTEXT, REGISTRAR
from eucareg.api.validate import MAX_BODY, ApiError, as_object, parse_json
from eucareg.pki import keypairs, signatures
from eucareg.pki.signing import SIGNATURE_HEADER, SIGNED_VERSION, socket_audience

CLOCK_SKEW = 300.0  # seconds a signed request may be early or late
MAX_NONCE = 128  # characters; agents send 32, and every nonce is kept for a while
MAX_PEM = 4096  # characters; an RSA-4096 public key in PEM is about 800
MAX_BOUND = 512  # characters of "method", "path" and "audience" (ours are far shorter)
MAX_TIMESTAMP = 2**33  # year 2242: a larger "Unix time" is not one
NONCE_CAP = 50_000  # nonces of trusted keys remembered at most (a few MB); see NonceCache
OPEN_NONCE_CAP = 20_000  # nonces of other keys; past it, their requests wait (429)
KEY_NONCE_QUOTA = 1_000  # a trusted key's nonces at most; past it, it is treated as untrusted
# Registrar identities a request may be signed for: the component ids this host announces a
# registrar API under (the TXT `id` of its CLC and its CC).
REGISTRAR_ROLES = frozenset({"clc", "cc"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the operator ------------------------------------------------------------------------------


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


UNIX_PEER = "unix"  # the caller's "address" on the operator's socket (root-only, this host)


def caller(request: web.Request) -> str | None:
    """The caller's address, or UNIX_PEER for a request over the registrar's Unix socket."""
    transport = request.transport
    if transport is not None and isinstance(transport.get_extra_info("sockname"), str):
        return UNIX_PEER
    return request.remote


def check_admin(remote: str | None, authorization: str, admin_token: str) -> None:
    """Raise the ApiError an operator request gets, unless it may pass."""
    if remote != UNIX_PEER and not is_loopback(remote):
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
        check_admin(caller(request), request.headers.get("Authorization", ""), token)
        limits.exempt(request)
        return await handler(request)

    return checked


# -- signed requests ---------------------------------------------------------------------------


class NonceCache:
    """The nonces of accepted signed requests, bounded in time and in number, kept in two
    partitions: requests by trusted keys (`limits.proven`: registered or admitted components,
    the cloud CA, a valid join-token proof), at most `cap`; and all others, at most `open_cap`.

    The invariant: every request accepted since the registrar started and stamped after
    `floor` is remembered. `floor` starts at the registrar's start time (a request signed before
    a restart can never be replayed after it: the nonces it had are gone) and is raised to the
    timestamp of every nonce forgotten, either because the clock check refuses it anyway
    (stamped more than `window` ago) or because the trusted partition is full (its oldest
    stamp goes first). Requests stamped at or before `floor` are refused, so forgetting never
    re-admits one. The open partition never forgets a nonce early: when it is full it takes no
    more (`open_wait`), so a flood of requests signed by keys anyone can make fills it and
    waits, and cannot raise the floor past the requests of the registrar's own components.
    One trusted key holds at most `key_quota` nonces (`over_quota`): past it, its requests are
    treated like anyone's, so one leaked key cannot fill the trusted partition either.
    """

    def __init__(
        self,
        window: float = CLOCK_SKEW,
        cap: int = NONCE_CAP,
        started: float | None = None,
        *,
        open_cap: int = OPEN_NONCE_CAP,
        key_quota: int = KEY_NONCE_QUOTA,
    ) -> None:
        self.window = window
        self.cap = cap
        self.open_cap = open_cap
        self.key_quota = key_quota
        self.started = time.time() if started is None else started
        self.floor = self.started
        # Heaps, the oldest stamp first: (stamp, nonce, key fingerprint) and (stamp, nonce).
        self._trusted: list[tuple[float, str, str]] = []
        self._open: list[tuple[float, str]] = []
        self._seen: set[str] = set()
        self._per_key: dict[str, int] = {}  # trusted nonces held per key

    def seen(self, nonce: str, now: float) -> bool:
        """Whether a request with this nonce was accepted (and is still remembered)."""
        self._expire(now)
        return nonce in self._seen

    def over_quota(self, key: str) -> bool:
        """Whether this trusted key holds its quota of nonces already."""
        return self._per_key.get(key, 0) >= self.key_quota

    def open_wait(self, now: float) -> float | None:
        """None when the open partition has room; else the seconds until it will."""
        self._expire(now)
        if len(self._open) < self.open_cap:
            return None
        return max(1.0, self._open[0][0] + self.window - now)

    def add(
        self, nonce: str, stamp: float, now: float, *, key: str = "", trusted: bool = True
    ) -> None:
        """Remember an accepted request's nonce (after its signature verified). An untrusted
        one needs room (open_wait, checked in the same step): ValueError otherwise."""
        self._expire(now)
        if nonce in self._seen:
            return
        if trusted:
            while len(self._trusted) >= self.cap:
                self._forget_trusted()
            key = sys.intern(key)  # one string per key, however many nonces it has
            heapq.heappush(self._trusted, (stamp, nonce, key))
            self._per_key[key] = self._per_key.get(key, 0) + 1
        else:
            if len(self._open) >= self.open_cap:
                raise ValueError("the open nonce partition is full; check open_wait first")
            heapq.heappush(self._open, (stamp, nonce))
        self._seen.add(nonce)

    def _expire(self, now: float) -> None:
        # Each nonce is forgotten once, so a flood costs O(log n) per request.
        oldest = now - self.window
        while self._trusted and self._trusted[0][0] < oldest:
            self._forget_trusted()
        while self._open and self._open[0][0] < oldest:
            stamp, nonce = heapq.heappop(self._open)
            self._seen.discard(nonce)
            self.floor = max(self.floor, stamp)

    def _forget_trusted(self) -> None:
        stamp, nonce, key = heapq.heappop(self._trusted)
        self._seen.discard(nonce)
        self.floor = max(self.floor, stamp)
        left = self._per_key[key] - 1
        if left:
            self._per_key[key] = left
        else:
            del self._per_key[key]

    def __len__(self) -> int:
        return len(self._seen)


NONCES = web.AppKey("nonces", NonceCache)


def verify_signed(
    body: bytes,
    signature: str,
    nonces: NonceCache,
    *,
    method: str,
    path: str,
    audiences: Collection[str],
    now: float | None = None,
    admit: Callable[[dict[str, Any], str], bool] | None = None,
) -> tuple[dict[str, Any], keypairs.PublicKey]:
    """Check a signed request, cheapest check first; the signature is verified last, and its
    nonce remembered only once it did.

    `admit(payload, key fingerprint)`, called just before the signature is verified, says
    whether the key is a trusted one (its nonce goes to the trusted partition) and may refuse
    the request (read_signed charges an untrusted one to its source there). Without it every
    key counts as trusted.

    400: malformed (body, fields, version, key PEM); 401: unsigned, stale or early, signed for
    another method, path or registrar, replayed, or a signature that does not verify;
    403: a key of a type or size signed requests may not use; 429: an untrusted key while the
    nonces of untrusted keys fill their partition (or whatever `admit` refuses).
    """
    # 1. Bounded input, parsed.
    if len(body) > MAX_BODY:
        raise ApiError(400, f"malformed signed request: body over {MAX_BODY} bytes")
    if not signature or len(signature) > signatures.MAX_SIGNATURE_CHARS:
        raise ApiError(401, f"missing or oversized {SIGNATURE_HEADER} header")
    payload = as_object(parse_json(body), "a signed request")
    version = payload.get("v")
    if version != SIGNED_VERSION or isinstance(version, bool):
        shown = "none" if version is None else json.dumps(version)[:20]
        raise ApiError(
            400,
            f"signed request version {shown} is not supported: this registrar speaks version "
            f"{SIGNED_VERSION} (upgrade eucareg on the component and the registrar together)",
        )
    pem, stamp, nonce = payload.get("public_key"), payload.get("timestamp"), payload.get("nonce")
    if not isinstance(pem, str) or len(pem) > MAX_PEM:
        raise ApiError(
            400,
            f"malformed signed request: public_key must be a PEM string of at most {MAX_PEM} "
            "characters",
        )
    if (
        isinstance(stamp, bool)
        or not isinstance(stamp, int | float)
        # NaN would pass every freshness comparison, and the request could be replayed forever.
        or not math.isfinite(stamp)
        or not 0 < stamp < MAX_TIMESTAMP
    ):
        raise ApiError(400, "malformed signed request: timestamp must be a Unix time in seconds")
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
        raise ApiError(400, f"malformed signed request: nonce must be 1-{MAX_NONCE} characters")
    bound = {k: payload.get(k) for k in ("method", "path", "audience")}
    for name, value in bound.items():
        if not isinstance(value, str) or not 0 < len(value) <= MAX_BOUND:
            raise ApiError(
                400, f"malformed signed request: {name} must be 1-{MAX_BOUND} characters"
            )
    # 2. Fresh: within the clock window, and signed after this registrar started (and after
    # any nonce it has had to forget).
    now = time.time() if now is None else now
    stamp = float(stamp)
    if abs(now - stamp) > CLOCK_SKEW:
        raise ApiError(401, f"request time is {now - stamp:+.0f}s off; check the clocks")
    if stamp <= nonces.floor:
        raise ApiError(
            401,
            "request signed before this registrar's replay memory begins "
            f"({nonces.floor - stamp:.0f}s earlier: it restarted, or its clock is ahead); "
            "send a new one",
        )
    # 3. Meant for this very request: method, path with query, and this registrar.
    if bound["method"] != method or bound["path"] != path:
        raise ApiError(
            401,
            f"request was signed for {bound['method']} {bound['path']}, not {method} {path}",
        )
    if bound["audience"] not in audiences:
        raise ApiError(
            401,
            f"request was signed for registrar {bound['audience']}, not this one "
            f"({', '.join(sorted(audiences)) or 'unknown'})",
        )
    # 4. Not a replay.
    if nonces.seen(nonce, now):
        raise ApiError(401, "replayed request (nonce already used)")
    # 5. A key we accept.
    try:
        public_key = signatures.load_request_key(pem)
    except signatures.KeyRefused as exc:
        raise ApiError(403, f"key refused: {exc}") from exc
    except keypairs.CredentialError as exc:
        raise ApiError(400, f"malformed signed request: {exc}") from exc
    # 6. Whose key it claims to be: a trusted key is never limited; any other is charged
    # (admit) and needs room among the nonces of untrusted keys.
    fingerprint = keypairs.fingerprint(public_key)
    trusted = True if admit is None else admit(payload, fingerprint)
    if not trusted:
        wait = nonces.open_wait(now)
        if wait is not None:
            raise limits.RateLimited(
                f"the registrar holds {nonces.open_cap} recent requests of unregistered keys; "
                "ask again later, or authenticate with a join token",
                wait,
            )
    # 7. Only now the expensive part; remembered only when it verified.
    if not signatures.verify(public_key, body, signature):
        raise ApiError(401, "signature does not verify with the enclosed key")
    nonces.add(nonce, stamp, now, key=fingerprint, trusted=trusted)
    return payload, public_key


def registrar_audiences(request: web.Request) -> set[str]:
    """The names a signed request may give this registrar: the component ids it announces its
    API under, and the address and port this connection reached."""
    names = {
        c["component_id"]
        for c in request.app[CONTEXT].local_components()
        if c.get("role") in REGISTRAR_ROLES and isinstance(c.get("component_id"), str)
    }
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        with contextlib.suppress(ValueError):  # not an IP socket
            names.add(socket_audience(str(sockname[0]), int(sockname[1])))
    return names


async def read_signed(request: web.Request) -> tuple[dict[str, Any], keypairs.PublicKey]:
    """The verified payload and key of a signed request (ApiError otherwise). A request by a
    key the registrar does not trust is charged to its source before its signature is
    checked (limits.py), and may be refused 429 there."""
    body = await request.read()
    nonces = request.app[NONCES]
    claimed = False

    def admit(payload: dict[str, Any], fingerprint: str) -> bool:
        nonlocal claimed
        registrar = request.app.get(REGISTRAR)  # (an app without one trusts no key)
        claimed = (
            registrar is not None
            and limits.proven(
                registrar,
                request.app[CONTEXT].ca_fingerprint(),
                payload,
                fingerprint,
                request.remote,
            )
            and not nonces.over_quota(fingerprint)
        )
        if claimed:
            limits.exempt(request)
        else:
            limits.charge(request)
        return claimed

    try:
        return verify_signed(
            body,
            request.headers.get(SIGNATURE_HEADER, ""),
            nonces,
            method=request.method,
            path=request.raw_path,
            audiences=registrar_audiences(request),
            admit=admit,
        )
    except ApiError:
        if claimed:
            limits.debit(request)  # it named a trusted key, and its signature did not verify
        raise
