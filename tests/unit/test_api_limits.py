"""Per-source rate limits for unauthenticated requests, and the nonce cache under a flood of
validly signed ones (eucareg/api/limits.py, eucareg/api/auth.py NonceCache; docs/security.md
"Rate limits"). Requests here come from made-up LAN sources: a middleware outside the API's
own sets each request's remote address from a test header.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eucareg.api import limits
from eucareg.api.auth import (
    CLOCK_SKEW,
    NONCES,
    NonceCache,
    verify_signed,
)
from eucareg.api.limits import LIMITER, RateLimits, SourceLimiter, source_key
from eucareg.api.validate import ApiError
from eucareg.config.file import from_mapping
from eucareg.config.values import ConfigError
from eucareg.core.model import Announcement, Role
from eucareg.core.trust import announcement_proof_message, make_proof, parse_token
from eucareg.core.view import RegistrarSettings
from eucareg.pki import certificates, keypairs, signatures
from eucareg.pki import credentials as cred
from eucareg.pki.signing import SIGNATURE_HEADER, SIGNED_VERSION
from tests.factories import ann, sighting
from tests.unit.test_api_harness import (
    ADMIN_TOKEN,
    CC_SETTINGS,
    Harness,
    eventually,
)
from tests.unit.test_api_harness import served as harness_served

REMOTE = "X-Test-Remote"  # the source address a request pretends to come from
CREDENTIALS = "/v1/credentials"
ATTACKER = "10.66.0.9"


@web.middleware
async def from_header(request: web.Request, handler: Any) -> web.StreamResponse:
    remote = request.headers.get(REMOTE)
    if remote is not None:
        request = request.clone(remote=remote)
    response: web.StreamResponse = await handler(request)
    return response


def served(
    tmp_path: Path,
    rate_limits: RateLimits,
    *,
    settings: RegistrarSettings = CC_SETTINGS,
    nonces: NonceCache | None = None,
) -> contextlib.AbstractAsyncContextManager[Harness]:
    """A CC registrar whose API has these limits (and this nonce cache), on 127.0.0.1."""
    return harness_served(
        tmp_path, settings, outer=(from_header,), limits=rate_limits, nonces=nonces
    )


def limiter_of(h: Harness) -> SourceLimiter:
    return h.client.app[LIMITER]  # type: ignore[no-any-return, index]


def nonces_of(h: Harness) -> NonceCache:
    return h.client.app[NONCES]  # type: ignore[no-any-return, index]


@pytest.fixture(scope="module")
def keys() -> list[keypairs.PrivateKey]:
    """Self-made keys, as an attacker would use: a few, reused with fresh ids and nonces."""
    return [keypairs.generate_key() for _ in range(12)]


Answer = tuple[int, Any, dict[str, str]]


async def request(
    h: Harness,
    method: str,
    path: str,
    *,
    source: str | None,
    data: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = dict(headers or {})
    if source is not None:
        sent[REMOTE] = source
    async with h.client.request(method, path, data=data, headers=sent) as resp:
        raw = await resp.read()
        body = json.loads(raw) if raw else None
        return resp.status, body, dict(resp.headers)


def envelope(
    h: Harness,
    key: keypairs.PrivateKey,
    path: str,
    fields: dict[str, Any],
    *,
    timestamp: float | None = None,
    signer: keypairs.PrivateKey | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A signed request for `path` (with its query) at the harness's registrar, carrying
    `key`'s public key; signed by `signer` (a forgery) when given."""
    body = json.dumps(
        {
            **fields,
            "v": SIGNED_VERSION,
            "method": "POST",
            "path": path,
            "audience": h.audience,
            "public_key": keypairs.public_pem(key.public_key()),
            "timestamp": time.time() if timestamp is None else timestamp,
            "nonce": secrets.token_hex(16),
        }
    ).encode()
    signature = signatures.sign(signer or key, body)
    return body, {SIGNATURE_HEADER: signature, "Content-Type": "application/json"}


async def signed(
    h: Harness,
    key: keypairs.PrivateKey,
    path: str,
    fields: dict[str, Any],
    *,
    source: str | None,
    query: str = "",
    timestamp: float | None = None,
    signer: keypairs.PrivateKey | None = None,
) -> Answer:
    body, headers = envelope(h, key, path + query, fields, timestamp=timestamp, signer=signer)
    return await request(h, "POST", path + query, source=source, data=body, headers=headers)


async def collect(
    h: Harness,
    key: keypairs.PrivateKey,
    component_id: str,
    *,
    source: str | None,
    wait: float = 0,
    signer: keypairs.PrivateKey | None = None,
    **fields: Any,
) -> Answer:
    return await signed(
        h,
        key,
        CREDENTIALS,
        {"component_id": component_id, **fields},
        source=source,
        query=f"?wait={wait:g}",
        signer=signer,
    )


def txt_of(a: Announcement) -> dict[str, str]:
    return dict(sighting(a).txt)


async def admin(h: Harness, path: str, body: Any) -> Any:
    status, answer = await h.post(path, body)  # from loopback, with the admin credential
    assert status == 200, answer
    return answer


async def registered_nc(h: Harness, key: keypairs.PrivateKey, source: str) -> Announcement:
    """An NC admitted in an install window (heard over mDNS), whose key collected its
    credentials from `source`; the window is closed again."""
    await admin(h, "/v1/trust/install-window", {"open": True, "for": "10m"})
    nc = ann(Role.NC, "cluster1", fingerprint=keypairs.fingerprint(key.public_key()))
    h.announce(nc)
    await h.record_status(nc.component_id, "awaiting-key")
    status, answer, _ = await collect(h, key, nc.component_id, source=source, wait=10)
    assert status == 200, answer
    await admin(h, "/v1/trust/install-window", {"open": False})
    return nc


def serial_of(files: dict[str, str]) -> str:
    cert = certificates.load_cert_pem(files[cred.LAYOUTS[Role.NC].cert])
    return format(cert.serial_number, "x")


def assert_limited(answer: Answer) -> None:
    status, body, headers = answer
    assert status == 429, body
    assert body["code"] == "rate-limited" and body["error"], body
    assert int(headers["Retry-After"]) >= 1


# -- sources and buckets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "source"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("::ffff:10.0.0.5", "10.0.0.5"),  # a dual-stack socket's view of an IPv4 peer
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("fd00::1%$(touch x)", "fd00::/64"),
        ("not an address", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_each_source_is_an_ipv4_address_or_an_ipv6_64(remote: str | None, source: str) -> None:
    assert source_key(remote) == source


def test_a_bucket_gives_a_burst_then_its_rate_and_says_how_long_to_wait() -> None:
    now = [1000.0]
    limiter = SourceLimiter(RateLimits(rate=2, burst=3), clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # the 4th: one token is 0.5 s away
    assert limiter.take("b") == 0.0  # another source has its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] += 100
    assert [limiter.take("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_a_source_that_claimed_a_key_it_did_not_prove_owes_at_most_a_burst() -> None:
    now = [0.0]
    limiter = SourceLimiter(RateLimits(rate=1, burst=5), clock=lambda: now[0])
    for _ in range(50):
        limiter.debit("a")
    assert limiter.tokens("a") == -5.0
    assert limiter.take("a") == pytest.approx(6.0)
    now[0] += 6.0
    assert limiter.take("a") == 0.0


def test_the_table_of_sources_is_bounded_in_size_and_in_time() -> None:
    now = [0.0]
    limiter = SourceLimiter(RateLimits(rate=10, burst=20, sources=100), clock=lambda: now[0])
    for _ in range(20):
        limiter.take("first")
    assert limiter.take("first") > 0
    for n in range(10_000):
        limiter.take(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        assert len(limiter) <= 100
    # "first" was heard least recently and was forgotten: it starts again with a full bucket.
    assert limiter.take("first") == 0.0
    # A bucket idle long enough to be full again is forgotten at the next request.
    now[0] += 2 * 20 / 10
    limiter.take("last")
    assert len(limiter) == 1


def test_the_limits_refuse_nonsense() -> None:
    for bad in (
        {"rate": 0},
        {"rate": float("nan")},
        {"rate": float("inf")},
        {"burst": 0},
        {"sources": 0},
        {"in_flight": 0},
    ):
        with pytest.raises(ValueError):
            RateLimits(**bad)  # type: ignore[arg-type]


def test_requests_with_any_credential_header_are_classified_not_charged_at_once() -> None:
    assert SIGNATURE_HEADER in limits.CREDENTIAL_HEADERS
    assert "Authorization" in limits.CREDENTIAL_HEADERS


# -- configuration -----------------------------------------------------------------------------


def config(**registrar: Any) -> dict[str, Any]:
    return {"address": "10.1.2.3", "registrar": registrar, "components": {"clc": {}}}


def test_the_limits_are_configured_in_the_registrar_section() -> None:
    cfg = from_mapping(config())
    assert (
        (cfg.rate_limit, cfg.rate_burst, cfg.rate_sources, cfg.max_in_flight)
        == (
            limits.DEFAULT_RATE,
            limits.DEFAULT_BURST,
            limits.DEFAULT_SOURCES,
            limits.DEFAULT_IN_FLIGHT,
        )
        == (10, 100, 10_000, 1000)
    )
    cfg = from_mapping(config(rate_limit=50, rate_burst="2000", rate_sources=100, max_in_flight=10))
    assert (cfg.rate_limit, cfg.rate_burst, cfg.rate_sources, cfg.max_in_flight) == (
        50,
        2000,
        100,
        10,
    )
    RateLimits(cfg.rate_limit, cfg.rate_burst, cfg.rate_sources, cfg.max_in_flight)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rate_limit", 0, "registrar.rate_limit: must be between 1 and 1000000, got 0"),
        ("rate_limit", 2.5, "registrar.rate_limit: expected a whole number"),
        ("rate_limit", True, "registrar.rate_limit: expected a whole number"),
        ("rate_limit", "\u0661\u0660", "registrar.rate_limit: '\u0661\u0660' is not a number"),
        ("rate_burst", 10**7, "registrar.rate_burst: must be between 1 and 1000000"),
        ("rate_burst", "many", "registrar.rate_burst: 'many' is not a number"),
        ("rate_sources", 99, "registrar.rate_sources: must be between 100 and 10000000"),
        ("max_in_flight", 9, "registrar.max_in_flight: must be between 10 and 1000000"),
        ("max_in_flight", float("inf"), "registrar.max_in_flight: expected a whole number"),
    ],
)
def test_bad_limits_are_refused_with_the_key_and_the_reason(
    key: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        from_mapping(config(**{key: value}))
    assert message in str(refused.value)


# -- the API: N+1 at the limit, sources, loopback --------------------------------------------


async def test_one_request_past_the_burst_is_429_with_retry_after(tmp_path: Path) -> None:
    async with served(tmp_path, RateLimits(rate=0.05, burst=5)) as h:
        for _ in range(5):
            assert (await request(h, "GET", "/v1/health", source=ATTACKER))[0] == 200
        answer = await request(h, "GET", "/v1/health", source=ATTACKER)
        assert_limited(answer)
        assert answer[2]["Retry-After"] == "20"  # one token at 0.05 a second
        assert "from 10.66.0.9" in answer[1]["error"]
        # Another source has its own budget; loopback (this host) has none to run out of.
        assert (await request(h, "GET", "/v1/health", source="10.66.0.10"))[0] == 200
        for _ in range(20):
            assert (await request(h, "GET", "/v1/health", source=None))[0] == 200
        assert limiter_of(h).in_flight == 0


async def test_mapped_ipv4_and_one_ipv6_64_share_a_bucket(tmp_path: Path) -> None:
    async with served(tmp_path, RateLimits(rate=0.05, burst=3)) as h:

        async def health(source: str) -> int:
            return (await request(h, "GET", "/v1/health", source=source))[0]

        assert [await health("10.66.0.1") for _ in range(3)] == [200] * 3
        assert await health("::ffff:10.66.0.1") == 429
        assert [await health(f"2001:db8:0:1::{n}") for n in range(1, 4)] == [200] * 3
        assert await health("2001:db8:0:1:ffff::7") == 429
        assert await health("2001:db8:0:2::1") == 200
        # Only a socket's own loopback is this host; a mapped 127.0.0.1 is a source like any.
        assert [await health("::ffff:127.0.0.1") for _ in range(3)] == [200] * 3
        assert await health("::ffff:127.0.0.1") == 429
        assert await health("127.0.0.1") == 200


async def test_requests_refused_before_their_key_is_known_are_charged(
    tmp_path: Path, keys: list[keypairs.PrivateKey], verifies: list[int]
) -> None:
    """Junk of every kind drains one bucket; past it, junk gets 429 and costs no check."""
    junk: list[tuple[str, str, bytes, dict[str, str], int]] = [
        ("POST", CREDENTIALS + "?wait=0", b"{}", {}, 401),  # unsigned
        ("POST", "/v1/announce", b"{" * 5000, {SIGNATURE_HEADER: "A" * 344}, 400),
        ("POST", "/v1/peer/registry", b"\xff\xfe", {SIGNATURE_HEADER: "A" * 344}, 400),
        ("GET", "/v1/nothing-here", b"", {}, 404),
        ("GET", CREDENTIALS, b"", {}, 405),
        ("GET", "/v1/registry", b"", {"Authorization": f"Bearer {ADMIN_TOKEN}"}, 403),
        ("GET", "/v1/health", b"", {"Authorization": "Bearer nonsense"}, 200),
    ]
    async with served(tmp_path, RateLimits(rate=0.05, burst=len(junk))) as h:
        for method, path, data, headers, expected in junk:
            answer = await request(h, method, path, source=ATTACKER, data=data, headers=headers)
            assert answer[0] == expected, (path, answer)
        for method, path, data, headers, _ in junk:
            answer = await request(h, method, path, source=ATTACKER, data=data, headers=headers)
            assert_limited(answer)
        # A request signed by a key nobody admitted is charged before its signature is checked.
        for n in range(5):
            assert_limited(await collect(h, keys[0], f"nc-z{n:011d}", source=ATTACKER))
        assert verifies == []
        assert limiter_of(h).in_flight == 0


# -- the API: who is never limited -------------------------------------------------------------


async def test_a_registered_component_sharing_the_attackers_address_is_never_limited(
    tmp_path: Path, keys: list[keypairs.PrivateKey], verifies: list[int]
) -> None:
    async with served(tmp_path, RateLimits(rate=0.05, burst=10)) as h:
        nc_key, token_key, attacker_key = keys[0], keys[1], keys[2]
        nc = await registered_nc(h, nc_key, ATTACKER)  # collected: one request, uncharged
        for _ in range(10):
            await request(h, "GET", "/v1/health", source=ATTACKER)
        assert_limited(await request(h, "GET", "/v1/health", source=ATTACKER))
        assert_limited(await collect(h, attacker_key, "nc-zzzzzzzzzzaa", source=ATTACKER))
        before = len(verifies)
        # 1. The registered NC: collects and watches its credentials as often as it likes.
        for _ in range(30):
            status, answer, _ = await collect(h, nc_key, nc.component_id, source=ATTACKER)
            assert status == 200, answer
        serial = serial_of(answer["files"])
        status, answer, _ = await collect(h, nc_key, nc.component_id, source=ATTACKER, have=serial)
        assert status == 200
        # 2. A newcomer whose announcement carries a valid join-token proof (mode local).
        token = (await admin(h, "/v1/tokens", {"role": "nc", "cluster": "cluster1"}))["token"]
        newcomer = ann(
            Role.NC, "cluster1", fingerprint=keypairs.fingerprint(token_key.public_key())
        )
        parsed = parse_token(token)
        stamp = int(time.time())
        proof = make_proof(parsed.secret, announcement_proof_message(newcomer, stamp))
        newcomer = replace(newcomer, token_id=parsed.token_id, token_stamp=stamp, token_proof=proof)
        status, answer, _ = await signed(
            h, token_key, "/v1/announce", {"txt": txt_of(newcomer)}, source=ATTACKER
        )
        assert status == 200, answer
        # Admitted now: its own credential request is trusted too.
        status, answer, _ = await collect(
            h, token_key, newcomer.component_id, source=ATTACKER, wait=10
        )
        assert status == 200, answer
        # 3. The CLC reading this CC's registry with the cloud CA's key.
        status, answer, _ = await signed(h, h.cloud.key, "/v1/peer/registry", {}, source=ATTACKER)
        assert status == 200, answer
        assert len(verifies) == before + 34  # every one of them was checked, none limited
        # The attacker, still, is not.
        assert_limited(await collect(h, attacker_key, "nc-zzzzzzzzzzab", source=ATTACKER))
        assert len(verifies) == before + 34


async def test_a_request_naming_a_registered_key_without_its_signature_is_charged(
    tmp_path: Path, keys: list[keypairs.PrivateKey]
) -> None:
    async with served(tmp_path, RateLimits(rate=0.05, burst=3)) as h:
        nc_key, attacker_key = keys[0], keys[3]
        nc = await registered_nc(h, nc_key, "10.66.1.1")
        limiter = limiter_of(h)
        # The registered NC's public key and id, signed by another key: 401, and charged after
        # the fact, down to a burst's worth owed.
        for n in range(8):
            status, _body, _ = await collect(
                h, nc_key, nc.component_id, source=ATTACKER, signer=attacker_key
            )
            assert status == 401
            assert limiter.tokens(ATTACKER) == pytest.approx(max(-3, 2 - n), abs=0.01)
        assert_limited(await collect(h, attacker_key, "nc-zzzzzzzzzzac", source=ATTACKER))
        # The NC itself, from that same address, is not affected.
        assert (await collect(h, nc_key, nc.component_id, source=ATTACKER))[0] == 200


async def test_a_trusted_key_past_its_nonce_quota_is_treated_like_anyone(
    tmp_path: Path, keys: list[keypairs.PrivateKey]
) -> None:
    async with served(
        tmp_path, RateLimits(rate=0.05, burst=2), nonces=NonceCache(key_quota=4)
    ) as h:
        nc = await registered_nc(h, keys[0], "10.66.1.1")  # its first nonce
        for _ in range(3):
            assert (await collect(h, keys[0], nc.component_id, source=ATTACKER))[0] == 200
        assert limiter_of(h).tokens(ATTACKER) == pytest.approx(2, abs=0.01)
        # Four nonces held: from now on its requests are charged like anyone's.
        for _ in range(2):
            assert (await collect(h, keys[0], nc.component_id, source=ATTACKER))[0] == 200
        assert_limited(await collect(h, keys[0], nc.component_id, source=ATTACKER))


async def test_unauthenticated_requests_at_once_are_capped_across_sources(
    tmp_path: Path, keys: list[keypairs.PrivateKey]
) -> None:
    async with served(tmp_path, RateLimits(rate=100, burst=100, in_flight=10)) as h:
        nc = await registered_nc(h, keys[0], "10.66.1.1")
        limiter = limiter_of(h)
        # The cap itself: requests being answered fill it (here, as if by slow senders).
        limiter.in_flight = 10
        answer = await collect(h, keys[1], "nc-zzzzzzzzzzff", source="10.66.3.1")
        assert_limited(answer)
        assert answer[2]["Retry-After"] in ("1", "2", "3")  # spread: not all back at once
        assert "answering 10 unauthenticated requests" in answer[1]["error"]
        # The registered component, and the operator, still get through.
        assert (await collect(h, keys[0], nc.component_id, source="10.66.3.1"))[0] == 200
        assert (await h.get("/v1/status"))[0] == 200
        limiter.in_flight = 0
        assert (await collect(h, keys[1], "nc-zzzzzzzzzzff", source="10.66.3.1"))[0] == 202


async def test_held_unauthenticated_long_polls_take_at_most_half_the_cap(
    tmp_path: Path, keys: list[keypairs.PrivateKey]
) -> None:
    """Components waiting for approval long-poll for hours: past half the in-flight cap their
    long-polls are answered at once (202, their status), so they never fill the cap and
    everyone else's unauthenticated requests still get through."""
    async with served(tmp_path, RateLimits(rate=100, burst=100, in_flight=10)) as h:
        limiter = limiter_of(h)
        held = [
            asyncio.create_task(
                collect(h, keys[1], f"nc-z{n:011d}", source=f"10.66.2.{n}", wait=20)
            )
            for n in range(5)
        ]
        await eventually(lambda: limiter.in_flight == 5, "5 long-polls held: half the cap")
        assert not any(task.done() for task in held)  # held until their wait runs out
        began = time.monotonic()
        more = [
            await collect(h, keys[1], f"nc-y{n:011d}", source=f"10.66.4.{n}", wait=20)
            for n in range(8)
        ]
        assert [a[0] for a in more] == [202] * 8  # none turned away, none held
        assert time.monotonic() - began < 10  # answered at once, not after their 20 s
        assert limiter.in_flight == 5 and not any(task.done() for task in held)
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await eventually(lambda: limiter.in_flight == 0, "the held ones released")


# -- the nonce cache under a flood of validly signed requests ---------------------------------


def test_a_full_open_partition_waits_and_never_raises_the_floor() -> None:
    nonces = NonceCache(cap=5, started=0.0, open_cap=3)
    now = 1000.0
    for n in range(3):
        assert nonces.open_wait(now) is None
        nonces.add(f"open-{n}", now - 10 + n, now, key=f"k{n}", trusted=False)
    assert nonces.open_wait(now) == pytest.approx(CLOCK_SKEW - 10)
    with pytest.raises(ValueError, match="open nonce partition is full"):
        nonces.add("open-3", now, now, trusted=False)
    assert nonces.floor == 0.0  # nothing forgotten early
    for n in range(8):  # the trusted partition evicts its oldest, and raises the floor
        nonces.add(f"trusted-{n}", now - 8 + n, now, key="nc")
    assert nonces.floor == now - 6
    assert all(nonces.seen(f"open-{n}", now) for n in range(3))
    # Once the oldest are as old as the clock window, there is room again.
    assert nonces.open_wait(now - 10 + CLOCK_SKEW + 0.5) is None


def test_one_key_holds_at_most_its_quota_of_trusted_nonces() -> None:
    nonces = NonceCache(started=0.0, key_quota=3)
    for n in range(3):
        assert not nonces.over_quota("sha256:a")
        nonces.add(f"a{n}", 100.0 + n, 100.0, key="sha256:a")
    assert nonces.over_quota("sha256:a") and not nonces.over_quota("sha256:b")
    nonces.seen("x", 103.0 + CLOCK_SKEW)  # all three expired
    assert not nonces.over_quota("sha256:a")


async def test_a_registered_component_gets_through_a_flood_of_validly_signed_requests(
    tmp_path: Path, keys: list[keypairs.PrivateKey]
) -> None:
    """Before: any key's nonce filled one cache whose floor then rose past the stamps of
    honest requests. Now: self-made keys fill a partition of their own, which waits when it
    is full; the floor stays, and a registered component's request is accepted, even one
    signed before the flood began."""
    open_cap = 200
    async with served(
        tmp_path,
        RateLimits(rate=1000, burst=1000),
        # Its replay memory began a minute ago, so a request stamped 5 s ago may pass.
        nonces=NonceCache(cap=open_cap, open_cap=open_cap, started=time.time() - 60),
    ) as h:
        nc_key = keys[0]
        nc = await registered_nc(h, nc_key, "10.66.1.1")
        nonces = nonces_of(h)
        floor = nonces.floor
        # Signed now, delivered after the flood (a slow link, or a long-poll's next request).
        early = envelope(
            h,
            nc_key,
            CREDENTIALS + "?wait=0",
            {"component_id": nc.component_id},
            timestamp=time.time() - 5,
        )
        statuses = []
        for n in range(open_cap + 50):
            status, _body, _ = await collect(
                h, keys[1 + n % 10], f"nc-w{n:011d}", source=f"10.67.{n // 200}.{n % 200}"
            )
            statuses.append(status)
        assert statuses.count(202) == open_cap  # the NC's own nonce is kept apart
        assert statuses.count(429) == 50
        assert nonces.floor == floor  # nothing was forgotten early
        body, headers = early
        status, answer, _ = await request(
            h, "POST", CREDENTIALS + "?wait=0", source=ATTACKER, data=body, headers=headers
        )
        assert status == 200, answer
        # The same flood against one shared partition (every key counted as trusted): the
        # floor rises past the early request, which is then refused.
        shared = NonceCache(cap=open_cap, started=floor)
        now = time.time()
        for n in range(open_cap + 50):
            shared.add(f"flood-{n}", now - 4 + n / 1000, now)
        with pytest.raises(ApiError, match="replay memory"):
            verify_signed(
                body,
                headers[SIGNATURE_HEADER],
                shared,
                method="POST",
                path=CREDENTIALS + "?wait=0",
                audiences={h.audience},
            )


# -- a flood, at unit scale ----------------------------------------------------------------------


async def test_a_flood_of_unauthenticated_requests_leaves_bounded_state(
    tmp_path: Path, keys: list[keypairs.PrivateKey]
) -> None:
    """2,000 requests with unique ids and nonces from 300 sources (IPv4 and IPv6): HTTP
    announcements in mode any, credential requests, peer reads, junk. Nothing answers 5xx,
    every table stays within its cap, nothing per id is left behind, and afterwards the
    registrar answers and registers a legitimate component."""
    cap = 10
    settings = replace(CC_SETTINGS, max_unadmitted=cap)
    rate_limits = RateLimits(rate=0.1, burst=4, sources=1000, in_flight=40)
    nonces = NonceCache(open_cap=500)
    async with served(tmp_path, rate_limits, settings=settings, nonces=nonces) as h:
        await admin(h, "/v1/trust/mode", {"mode": "any"})
        registrar = h.registrar
        limiter = limiter_of(h)
        sources = [f"10.68.{n // 250}.{n % 250 + 1}" for n in range(200)] + [
            f"fd00:68:0:{n:x}::1" for n in range(100)
        ]
        serial = itertools.count()

        async def one(n: int) -> int:
            source = sources[n % len(sources)]
            key = keys[n % len(keys)]
            component_id = f"nc-y{next(serial):011d}"
            kind = n % 5
            if kind == 0 and ":" not in source:
                a = ann(
                    Role.NC,
                    "cluster1",
                    component_id=component_id,
                    address=source,
                    fingerprint=keypairs.fingerprint(key.public_key()),
                )
                answer = await signed(h, key, "/v1/announce", {"txt": txt_of(a)}, source=source)
            elif kind in (0, 1):
                answer = await collect(h, key, component_id, source=source, wait=n % 3 / 10)
            elif kind == 2:
                answer = await signed(h, key, "/v1/peer/registry", {}, source=source)
            elif kind == 3:
                junk = [b"[" * 60_000, b"[]", b'{"v": 2, "nonce": "x"}', secrets.token_bytes(64)]
                answer = await request(
                    h,
                    "POST",
                    ["/v1/announce", CREDENTIALS, "/v1/peer/registry"][n % 3],
                    source=source,
                    data=junk[n % 4],
                    headers={SIGNATURE_HEADER: "A" * 344},
                )
            else:
                answer = await request(h, "GET", ["/v1/health", "/v1/x"][n % 2], source=source)
            return answer[0]

        statuses: list[int] = []
        for batch in range(40):
            statuses += await asyncio.gather(*(one(batch * 50 + n) for n in range(50)))
        assert len(statuses) == 2000
        assert not [s for s in statuses if s >= 500]
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        assert counts.get(429, 0) > 300 and counts.get(202, 0) > 50, counts
        # Every table within its cap, nothing per id left behind.
        assert registrar.memory.unadmitted <= cap
        assert len(registrar.memory.records) <= cap
        assert len(limiter) <= len(sources) and limiter.in_flight == 0
        assert len(nonces) <= 500
        assert not registrar._changed and not registrar._waiters
        assert len(registrar.proven) <= cap and len(registrar.presence.polling) <= cap
        events = (await h.get("/v1/events", limit="100000"))[1]["events"]
        assert len(events) <= 200, len(events)
        # Afterwards: the registrar answers, and a legitimate NC registers from a flooded source.
        assert (await request(h, "GET", "/v1/health", source="10.69.0.1"))[0] == 200
        await admin(h, "/v1/trust/mode", {"mode": "local"})
        nc = await registered_nc(h, keypairs.generate_key(), sources[0])
        record = registrar.record(nc.component_id)
        assert record is not None and record.status.value == "registered"
