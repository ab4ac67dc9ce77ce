"""Per-source rate limits for unauthenticated requests (docs/security.md, "Rate limits").

A request is authenticated when it is proven by the admin credential (operator_only), or signed
by a key the registrar trusts: a registered or admitted component's key for its own id, the
cloud CA's key, or a key whose announcement carries a valid join-token proof (`proven`). Such a
request is never limited here, so a thousand NCs behind one NAT address, or the benchmark's
fleet on one address, collect and watch their credentials at any rate.

Every other request is charged to its source: one token bucket per address (an IPv6 address by
its /64, which one host can fill at will; an IPv4-mapped IPv6 address as the IPv4 address it
is). Past the bucket it is answered 429 with Retry-After and {"error", "code": "rate-limited"}.
Unauthenticated requests being answered at once (held long-polls included) are capped too, so
that many sources together cannot hold more than that; and past half the cap, an
unauthenticated long-poll is answered at once instead of held (`hold_for`). Loopback
(127.0.0.0/8, ::1) and the operator's Unix socket are this host: they have no bucket (a local
user has cheaper ways to load the machine, and local probes and tools must not see 429), but
count toward that cap.
The table of buckets is bounded in size (the least recently used source is forgotten first)
and in time (a bucket that has filled up again is forgotten: it would say the same as none).

The check costs a dictionary look-up. A request that carries no credential at all (no
signature, no Authorization header) is charged before its handler runs; a signed one once its
envelope passed the cheap checks and before its signature is verified (auth.read_signed), since
only then is it known whose key it claims. A request that claimed a trusted key and failed to
prove it is charged afterwards.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from eucareg.api.validate import ApiError
from eucareg.core.model import HOLDS_TOKEN_USE
from eucareg.core.trust import check_token
from eucareg.core.txt import Rejected, decode

if TYPE_CHECKING:
    from eucareg.registrar.engine import Registrar

# Defaults of the [registrar] keys rate_limit, rate_burst, rate_sources and max_in_flight
# (docs/configuration.md). An unauthenticated caller (a component waiting for approval, a
# monitoring probe) sends a request every few seconds; 10 a second with a burst of 100 lets a
# site put a hundred such components behind one address, while one source can hold at most
# 100 + 30 s x 10 long-polls open (MAX_WAIT is 30 s; the longer MAX_WATCH is for registered keys,
# which are never charged) and make at most 10 records a second.
DEFAULT_RATE = 10  # requests a second per source
DEFAULT_BURST = 100  # requests a source may send at once after a quiet spell
DEFAULT_SOURCES = 10_000  # sources tracked at once (about 150 bytes each)
DEFAULT_IN_FLIGHT = 1_000  # unauthenticated requests being answered at once, all sources together

# Headers that may make a request authenticated; one without either is charged at once.
# (signing.SIGNATURE_HEADER is the second; auth imports this module, not the other way round.)
CREDENTIAL_HEADERS = ("Authorization", "X-Eucareg-Signature")
UNIX_SOURCE = "unix"  # the operator's socket: root on this host
UNKNOWN_SOURCE = "unknown"


@dataclass(frozen=True)
class RateLimits:
    """How much unauthenticated traffic the API takes (docs/configuration.md)."""

    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST
    sources: int = DEFAULT_SOURCES
    in_flight: int = DEFAULT_IN_FLIGHT

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number, got {self.rate!r}")
        if min(self.burst, self.sources, self.in_flight) < 1:
            raise ValueError("burst, sources and in_flight must be at least 1")


# The longest Retry-After the in-flight cap asks for (docs/configuration.md, max_in_flight).
IN_FLIGHT_RETRY_MAX = 3.0


class RateLimited(ApiError):
    """A request refused before its work, to be asked again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, message, "rate-limited")
        self.retry_after = retry_after


def limited_response(exc: RateLimited) -> web.Response:
    seconds = max(1, math.ceil(exc.retry_after))
    return web.json_response(
        {"error": exc.message, "code": "rate-limited"},
        status=429,
        headers={"Retry-After": str(seconds)},
    )


def source_key(remote: str | None) -> str:
    """The source a request is charged to: an IPv4 address; an IPv6 address's /64 (a host is
    handed a whole /64 and may use any address in it); an IPv4-mapped IPv6 address as IPv4."""
    if remote is None:
        return UNKNOWN_SOURCE
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return UNKNOWN_SOURCE
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        # Without its zone: "fe80::1%eth0" and "fe80::1%eth1" are one host's link-local /64s.
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class SourceLimiter:
    """Token buckets per source, in a table bounded in size and time; and the count of
    unauthenticated requests being answered."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        # source -> [tokens, when counted]; least recently used first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # A bucket untouched this long is full again (it may be down to -burst: see debit).
        self._idle = 2 * limits.burst / limits.rate
        self.in_flight = 0

    def take(self, source: str) -> float:
        """Take a token for one request: 0.0 when it may go ahead, else the seconds until
        the source has one again (nothing is taken then)."""
        bucket = self._bucket(source)
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.limits.rate

    def debit(self, source: str) -> None:
        """Charge a request that was already answered (it claimed a key it did not prove):
        the source may owe up to a burst's worth."""
        bucket = self._bucket(source)
        bucket[0] = max(-float(self.limits.burst), bucket[0] - 1.0)

    def tokens(self, source: str) -> float:
        """What the source has left now (a full bucket when it is not in the table)."""
        bucket = self._buckets.get(source)
        if bucket is None:
            return float(self.limits.burst)
        elapsed = max(0.0, self.clock() - bucket[1])
        return min(float(self.limits.burst), bucket[0] + elapsed * self.limits.rate)

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, source: str) -> list[float]:
        now = self.clock()
        buckets = self._buckets
        # Forget buckets that filled up again: the least recently used come first.
        while buckets:
            oldest = buckets[next(iter(buckets))]
            if now - oldest[1] < self._idle:
                break
            buckets.popitem(last=False)
        bucket = buckets.get(source)
        if bucket is None:
            while len(buckets) >= self.limits.sources:
                buckets.popitem(last=False)
            bucket = buckets[source] = [float(self.limits.burst), now]
            return bucket
        buckets.move_to_end(source)
        elapsed = max(0.0, now - bucket[1])
        bucket[0] = min(float(self.limits.burst), bucket[0] + elapsed * self.limits.rate)
        bucket[1] = now
        return bucket


@dataclass
class Charge:
    """One request's standing with the limiter."""

    source: str
    local: bool = False  # loopback or the Unix socket: no bucket
    decided: bool = False  # found authenticated, or charged
    counted: bool = False  # holds one of the in-flight places


LIMITER = web.AppKey("limiter", SourceLimiter)
CHARGE = web.RequestKey("charge", Charge)


def install(app: web.Application, limits: RateLimits) -> None:
    """Give an app (before it starts) its limiter and the middleware that applies it."""
    app[LIMITER] = SourceLimiter(limits)
    app.middlewares.append(limit_unauthenticated)


def request_charge(request: web.Request) -> Charge:
    """Whom a request is charged to."""
    transport = request.transport
    if transport is not None and isinstance(transport.get_extra_info("sockname"), str):
        return Charge(UNIX_SOURCE, local=True)
    return Charge(source_key(request.remote), local=is_local(request.remote))


def is_local(remote: str | None) -> bool:
    """Loopback as the socket reports it: 127.0.0.0/8 or ::1. Not ::ffff:127.0.0.1, which no
    local connection shows (the API's IPv6 sockets are IPv6-only) and one from elsewhere might."""
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def exempt(request: web.Request) -> None:
    """The request is authenticated: nothing is charged."""
    state = request.get(CHARGE)
    if state is not None:
        state.decided = True


def charge(request: web.Request) -> None:
    """Charge an unauthenticated request to its source; RateLimited when it must wait."""
    state = request.get(CHARGE)
    limiter = request.app.get(LIMITER)
    if state is None or limiter is None or state.decided:
        return
    state.decided = True
    wait = 0.0 if state.local else limiter.take(state.source)
    if wait > 0:
        raise RateLimited(
            f"too many unauthenticated requests from {state.source} "
            f"(the limit is {limiter.limits.rate:g} a second, {limiter.limits.burst} at once); "
            "ask again later, or authenticate with a join token",
            wait,
        )
    if limiter.in_flight >= limiter.limits.in_flight:
        raise RateLimited(
            f"the registrar is answering {limiter.in_flight} unauthenticated requests already; "
            "ask again shortly",
            # 1, 2 or 3 s: one constant would bring everyone it sends away back together.
            random.uniform(0.5, IN_FLIGHT_RETRY_MAX),
        )
    limiter.in_flight += 1
    state.counted = True


def hold_for(request: web.Request, wait: float) -> float:
    """How long this request may be held (a long-poll): as asked, unless it is unauthenticated
    and half the in-flight places are taken already. Components waiting for approval hold
    such long-polls for hours; past half the cap they are answered at once with their status
    (and ask again after their own interval), so they can never fill the cap against
    everyone else's short requests."""
    state = request.get(CHARGE)
    limiter = request.app.get(LIMITER)
    if state is None or limiter is None or not state.counted:
        return wait
    return 0.0 if limiter.in_flight > limiter.limits.in_flight // 2 else wait


def debit(request: web.Request) -> None:
    """A request that claimed a trusted key and did not prove it: charged after the fact."""
    state = request.get(CHARGE)
    limiter = request.app.get(LIMITER)
    if state is not None and limiter is not None and not state.local:
        limiter.debit(state.source)


@web.middleware
async def limit_unauthenticated(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    limiter = request.app[LIMITER]
    state = request[CHARGE] = request_charge(request)
    try:
        if not any(name in request.headers for name in CREDENTIAL_HEADERS):
            charge(request)  # nothing it sends can prove anything: before any work
        response: web.StreamResponse = await handler(request)
        if not state.decided:
            charge(request)  # it sent a credential header that nothing checked
        return response
    except RateLimited as exc:
        return limited_response(exc)
    except (ApiError, web.HTTPClientError):
        # Refused before anyone looked at its key (malformed, unsigned, not loopback, ...).
        if not state.decided:
            try:
                charge(request)
            except RateLimited as limited:
                return limited_response(limited)
        raise
    finally:
        if state.counted:
            limiter.in_flight -= 1


# -- who is authenticated ------------------------------------------------------------------------

# A record in one of these states is a component the registrar admitted (by token, window or
# operator): its key is trusted for its own id.
TRUSTED_STATUSES = HOLDS_TOKEN_USE


def proven(
    registrar: Registrar,
    ca_fingerprint: str | None,
    payload: Mapping[str, Any],
    fingerprint: str,
    remote: str | None,
) -> bool:
    """Whether a signed request's key is one the registrar trusts (its signature is checked
    afterwards): the cloud CA's; the key of an admitted component, for that component's id
    (`component_id`, or the `id` of an announced TXT record); or the key an announcement with
    a valid join-token proof names (the proof binds id, key and address). Cheap: look-ups and,
    for a token, one HMAC."""
    if ca_fingerprint is not None and fingerprint == ca_fingerprint:
        return True
    records = registrar.memory.records
    txt = payload.get("txt")
    txt = txt if isinstance(txt, dict) else {}
    for component_id in (payload.get("component_id"), txt.get("id")):
        if isinstance(component_id, str):
            record = records.get(component_id)
            if (
                record is not None
                and record.fingerprint == fingerprint
                and record.status in TRUSTED_STATUSES
            ):
                return True
    if "tok" not in txt or not all(isinstance(v, str) for v in txt.values()):
        return False
    ann = decode(f"fallback:{remote}", txt, (), registrar.settings.allowed_ranges)
    if isinstance(ann, Rejected) or ann.token_id is None or ann.fingerprint != fingerprint:
        return False
    token = registrar.memory.tokens.get(ann.token_id)
    return check_token(token, ann, registrar.master_key, registrar.clock()).ok
