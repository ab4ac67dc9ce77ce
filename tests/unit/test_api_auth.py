"""Who may call the API: the operator only from loopback with the admin token; components only
with requests signed by their own key, fresh and not replayed. Every refusal is a JSON error
with the documented status, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eucareg.api.app import OPERATOR_ROUTES
from eucareg.api.auth import (
    CLOCK_SKEW,
    NonceCache,
    check_admin,
    is_loopback,
    verify_signed,
)
from eucareg.api.validate import ApiError
from eucareg.pki import keypairs, signatures
from eucareg.pki.signing import SIGNATURE_HEADER, SIGNED_VERSION, socket_audience
from tests.unit.test_api_harness import ADMIN_TOKEN, CLC_SETTINGS, Harness, served

ADMIN_REFUSED = "the local admin credential is required (see docs/security.md)"
ADMIN_REFUSAL = {"error": ADMIN_REFUSED, "code": "unauthorized"}


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS) as harness:
        yield harness


@pytest.fixture(scope="module")
def key() -> keypairs.PrivateKey:
    return keypairs.generate_key()


def signed(key: keypairs.PrivateKey, payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A body signed exactly as given (signed_body always adds a fresh time and nonce)."""
    body = json.dumps(payload).encode()
    return body, {SIGNATURE_HEADER: signatures.sign(key, body), "Content-Type": "application/json"}


AUDIENCE = "clc-00000000000a"  # the registrar verify_signed is told it is, below


def request_fields(
    key: keypairs.PrivateKey, audience: str = AUDIENCE, **overrides: Any
) -> dict[str, Any]:
    """A credential request for POST /v1/credentials at `audience`, field by field."""
    return {
        "component_id": "walrus-000000000001",
        "v": SIGNED_VERSION,
        "method": "POST",
        "path": "/v1/credentials",
        "audience": audience,
        "public_key": keypairs.public_pem(key.public_key()),
        "timestamp": time.time(),
        "nonce": "n" * 32,
        **overrides,
    }


def at(h: Harness) -> str:
    """The name of the harness's registrar as a client connecting to it signs it."""
    return socket_audience(str(h.client.host), h.client.port or 0)


def check(body: bytes, signature: str, nonces: NonceCache) -> Any:
    return verify_signed(
        body, signature, nonces, method="POST", path="/v1/credentials", audiences={AUDIENCE}
    )


# -- the operator ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, _h in OPERATOR_ROUTES])
async def test_every_operator_route_wants_the_admin_token(
    clc: Harness, method: str, path: str
) -> None:
    assert await clc.admin(method, path, {}, token=None) == (401, ADMIN_REFUSAL)
    assert await clc.admin(method, path, {}, token="not-the-token") == (401, ADMIN_REFUSAL)


async def test_the_admin_token_opens_operator_routes_and_health_is_open(clc: Harness) -> None:
    status, trust = await clc.get("/v1/trust")
    assert status == 200 and trust["mode"] == "local"
    assert await clc.admin("GET", "/v1/health", token=None) == (200, {"ok": True})


async def test_a_non_ascii_bearer_token_is_401_not_500(clc: Harness) -> None:
    # Raw bytes: a client library would refuse to send this header, an attacker would not.
    reader, writer = await asyncio.open_connection(clc.client.host, clc.client.port)
    writer.write(
        b"GET /v1/trust HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer \xe4\xbb\xa4\xe7\x89\x8c\xff\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert json.loads(body) == ADMIN_REFUSAL
    with pytest.raises(ApiError) as refused:
        check_admin("127.0.0.1", "Bearer t\u00f6ken", ADMIN_TOKEN)
    assert refused.value.status == 401


def test_the_admin_check_wants_loopback_before_anything_else() -> None:
    for remote in ("10.0.2.7", "::ffff:10.0.2.7", None, "not-an-address"):
        with pytest.raises(ApiError) as refused:
            check_admin(remote, f"Bearer {ADMIN_TOKEN}", ADMIN_TOKEN)
        assert (refused.value.status, refused.value.message) == (
            403,
            "operator endpoints answer on loopback only",
        )
    check_admin("::1", f"Bearer {ADMIN_TOKEN}", ADMIN_TOKEN)  # passes
    assert is_loopback("127.0.0.5") and not is_loopback("10.0.0.1")


async def test_operator_routes_refuse_a_lan_address_even_with_the_token(tmp_path: Path) -> None:
    @web.middleware
    async def from_the_lan(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request.clone(remote="10.0.2.7"))
        return response

    async with served(tmp_path, CLC_SETTINGS, middlewares=(from_the_lan,)) as harness:
        assert await harness.get("/v1/trust") == (
            403,
            {"error": "operator endpoints answer on loopback only", "code": "forbidden"},
        )
        # Component endpoints do not care where a request comes from.
        assert await harness.admin("GET", "/v1/health", token=None) == (200, {"ok": True})


# -- signed requests ---------------------------------------------------------------------------


async def test_a_signature_over_another_body_is_401(clc: Harness, key: keypairs.PrivateKey) -> None:
    body, headers = signed(key, request_fields(key, at(clc)))
    _other, other_headers = signed(key, request_fields(key, at(clc), nonce="m" * 32))
    status, answer = await clc.signed(
        "/v1/credentials", key, {}, body_and_headers=(body, other_headers)
    )
    assert (status, answer["error"], answer["code"]) == (
        401,
        "signature does not verify with the enclosed key",
        "unauthorized",
    )
    missing = {k: v for k, v in headers.items() if k != SIGNATURE_HEADER}
    assert (await clc.signed("/v1/credentials", key, {}, body_and_headers=(body, missing)))[
        0
    ] == 401


async def test_a_stale_or_future_request_is_401(clc: Harness, key: keypairs.PrivateKey) -> None:
    for offset in (-CLOCK_SKEW - 60, CLOCK_SKEW + 60):
        body = signed(key, request_fields(key, at(clc), timestamp=time.time() + offset))
        status, answer = await clc.signed("/v1/credentials", key, {}, body_and_headers=body)
        assert status == 401
        assert "check the clocks" in answer["error"]


async def test_a_replayed_request_is_401(clc: Harness, key: keypairs.PrivateKey) -> None:
    body = signed(key, request_fields(key, at(clc)))
    first, _ = await clc.signed("/v1/credentials", key, {}, body_and_headers=body)
    assert first == 202
    assert await clc.signed("/v1/credentials", key, {}, body_and_headers=body) == (
        401,
        {"error": "replayed request (nonce already used)", "code": "unauthorized"},
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "body is not JSON"),
        (b"[" * 60_000, "nested too deeply"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, got a list"),
        (b"1" * 5000, "not JSON we accept"),
        (b'{"timestamp": NaN}', "NaN is not a JSON value"),
    ],
)
async def test_malformed_signed_bodies_are_400(
    clc: Harness, key: keypairs.PrivateKey, raw: bytes, message: str
) -> None:
    for path in ("/v1/credentials", "/v1/announce", "/v1/peer/registry"):
        headers = {SIGNATURE_HEADER: signatures.sign(key, raw)}
        status, answer = await clc.signed(path, key, {}, body_and_headers=(raw, headers))
        assert status == 400, (path, answer)
        assert message in answer["error"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"public_key": 42}, "public_key must be a PEM string"),
        ({"public_key": "-----BEGIN nonsense"}, "not a PEM public key"),
        ({"timestamp": "yesterday"}, "timestamp must be a Unix time"),
        ({"timestamp": 1e400}, "Infinity is not a JSON value"),
        ({"timestamp": float("nan")}, "NaN is not a JSON value"),
        ({"timestamp": "NaN"}, "timestamp must be a Unix time"),
        ({"timestamp": True}, "timestamp must be a Unix time"),
        ({"timestamp": -1.0}, "timestamp must be a Unix time"),
        ({"timestamp": 1e300}, "timestamp must be a Unix time"),
        ({"timestamp": 10**30}, "timestamp must be a Unix time"),
        ({"v": 1}, "version 1 is not supported"),
        ({"v": None}, "version none is not supported"),
        ({"v": True}, "version true is not supported"),
        ({"path": 7}, "path must be"),
        ({"audience": ""}, "audience must be"),
        ({"nonce": ["n"]}, "nonce must be"),
        ({"nonce": "n" * 129}, "nonce must be"),
        ({"nonce": ""}, "nonce must be"),
    ],
)
def test_signed_request_fields_are_checked_before_the_signature(
    key: keypairs.PrivateKey, overrides: dict[str, Any], message: str
) -> None:
    fields = request_fields(key, **overrides)
    body = json.dumps(fields).encode()  # Python writes 1e400 as Infinity, which is not JSON
    with pytest.raises(ApiError) as refused:
        check(body, signatures.sign(key, body), NonceCache(started=0.0))
    assert refused.value.status == 400
    assert message in refused.value.message


def test_verify_signed_returns_the_payload_and_key(key: keypairs.PrivateKey) -> None:
    body, headers = signed(key, request_fields(key))
    # (A registrar refuses what was signed before it started: this one started long ago.)
    payload, public_key = check(body, headers[SIGNATURE_HEADER], NonceCache(started=0.0))
    assert payload["component_id"] == "walrus-000000000001"
    assert keypairs.fingerprint(public_key) == keypairs.fingerprint(key.public_key())


def test_the_nonce_cache_forgets_only_what_the_clock_check_refuses_anyway() -> None:
    nonces = NonceCache(window=300, started=0.0)
    nonces.add("a", 1000.0, 1000.0)
    assert nonces.seen("a", 1299.0)
    for n in range(1000):
        nonces.add(f"flood-{n}", 1200.0, 1200.0)
    assert len(nonces) == 1001 and nonces.floor == 0.0
    # 300 s after its stamp, "a" is dropped (a replay of it is stale by now); the flood stays,
    # and the floor rises to "a"'s stamp, so "a" stays refused even if the clock went back.
    assert not nonces.seen("a", 1300.5)
    assert len(nonces) == 1000 and nonces.floor == 1000.0
    assert nonces.seen("flood-7", 1300.5)
    # Once the flood is old too, the cache shrinks back to what is recent.
    nonces.add("c", 1600.0, 1600.0)
    assert len(nonces) == 1  # "c"
    assert nonces.floor == 1200.0
