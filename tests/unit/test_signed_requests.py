"""Signed requests mean one thing: each is bound to its method, its path with query, the
registrar it was meant for and its time; it cannot be replayed, not even after the registrar
restarts; only RSA 2048-4096 keys with e=65537 sign them; and every cheaper check runs before
the signature is verified, so a flood of forged requests never reaches `verify`.
(docs/credentials.md "Signed requests", docs/security.md "Signed requests mean one thing".)
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from eucareg.agent import collect
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.api import peer
from eucareg.api.app import json_errors
from eucareg.api.auth import (
    CLOCK_SKEW,
    NONCE_CAP,
    NONCES,
    NonceCache,
    read_signed,
    verify_signed,
)
from eucareg.api.context import CONTEXT, ApiContext
from eucareg.api.validate import ApiError
from eucareg.core.model import AnnouncedState, Role
from eucareg.pki import keypairs, signatures
from eucareg.pki.signing import SIGNATURE_HEADER, SIGNED_VERSION, signed_body, socket_audience
from tests.factories import ann
from tests.unit.test_api_harness import CC_SETTINGS, CLC_SETTINGS, Harness, served

CREDENTIALS = "/v1/credentials?wait=0"
CLC_ID = "clc-0000000000c1"
KEY_RULE = "signed requests need an RSA key of 2048-4096 bits with e=65537"

Envelope = tuple[bytes, dict[str, str]]


@pytest.fixture(scope="module")
def key() -> keypairs.PrivateKey:
    return keypairs.generate_key()


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS) as harness:
        harness.local.append({"role": "clc", "component_id": CLC_ID})
        yield harness


def at(h: Harness) -> str:
    """The harness's registrar as a client that connects to its address signs it."""
    return socket_audience(str(h.client.host), h.client.port or 0)


def fields(key: keypairs.PrivateKey | None, audience: str, **overrides: Any) -> dict[str, Any]:
    """A credential request's envelope, field by field (signed_body fills these itself)."""
    pem = keypairs.public_pem(key.public_key()) if key is not None else ""
    return {
        "component_id": "walrus-000000000001",
        "v": SIGNED_VERSION,
        "method": "POST",
        "path": CREDENTIALS,
        "audience": audience,
        "public_key": pem,
        "timestamp": time.time(),
        "nonce": secrets.token_hex(16),
        **overrides,
    }


def sign_raw(key: keypairs.PrivateKey, payload: dict[str, Any]) -> Envelope:
    """Exactly this payload, signed (json.dumps writes NaN and Infinity as Python does)."""
    body = json.dumps(payload).encode()
    return body, {SIGNATURE_HEADER: signatures.sign(key, body), "Content-Type": "application/json"}


def request_for(key: keypairs.PrivateKey, audience: str, path: str = CREDENTIALS) -> Envelope:
    body = {"component_id": "walrus-000000000001"}
    return signed_body(key, body, method="POST", path=path, audience=audience)


async def send(
    h: Harness | TestClient[Any, Any], path: str, envelope: Envelope, method: str = "POST"
) -> tuple[int, Any]:
    client = h.client if isinstance(h, Harness) else h
    body, headers = envelope
    async with client.request(method, path, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


# -- what is signed --------------------------------------------------------------------------


def test_the_envelope_names_its_version_method_path_registrar_time_and_nonce(
    key: keypairs.PrivateKey,
) -> None:
    body, headers = signed_body(
        key, {"component_id": "nc-1"}, method="POST", path=CREDENTIALS, audience="cc-1"
    )
    payload = json.loads(body)
    assert payload["v"] == SIGNED_VERSION == 2
    assert (payload["method"], payload["path"], payload["audience"]) == (
        "POST",
        CREDENTIALS,
        "cc-1",
    )
    assert payload["component_id"] == "nc-1"
    assert abs(payload["timestamp"] - time.time()) < 5 and len(payload["nonce"]) == 32
    assert signatures.verify(key.public_key(), body, headers[SIGNATURE_HEADER])
    nonces = NonceCache(started=0.0)
    checked, _key = verify_signed(
        body,
        headers[SIGNATURE_HEADER],
        nonces,
        method="POST",
        path=CREDENTIALS,
        audiences={"cc-1", "10.0.0.1:8780"},
    )
    assert checked == payload and len(nonces) == 1


async def test_a_request_is_refused_on_another_path_or_query(
    clc: Harness, key: keypairs.PrivateKey
) -> None:
    envelope = request_for(key, CLC_ID)
    for path in ("/v1/announce", "/v1/peer/registry", "/v1/credentials?wait=30"):
        status, answer = await send(clc, path, envelope)
        assert status == 401, path
        assert answer["error"] == f"request was signed for POST {CREDENTIALS}, not POST {path}"
    # None of that used up its nonce: where it was meant to go, it is answered.
    assert (await send(clc, CREDENTIALS, envelope))[0] == 202


async def test_a_request_is_refused_with_another_method(key: keypairs.PrivateKey) -> None:
    async def echo(request: web.Request) -> web.Response:
        payload, _key = await read_signed(request)
        return web.json_response({"component_id": payload["component_id"]})

    app = web.Application(middlewares=[json_errors])
    app[NONCES] = NonceCache()
    local = [{"role": "cc", "component_id": "cc-000000000001"}]
    app[CONTEXT] = ApiContext("admin", lambda: local, lambda: None)
    app.router.add_route("*", "/echo", echo)
    async with TestClient(TestServer(app)) as client:
        envelope = request_for(key, "cc-000000000001", path="/echo")
        for method in ("PUT", "DELETE", "PATCH"):
            status, answer = await send(client, "/echo", envelope, method)
            assert (status, answer) == (
                401,
                {
                    "error": f"request was signed for POST /echo, not {method} /echo",
                    "code": "unauthorized",
                },
            )
        assert await send(client, "/echo", envelope) == (
            200,
            {"component_id": "walrus-000000000001"},
        )


async def test_a_request_for_one_registrar_is_refused_by_another(
    tmp_path: Path, key: keypairs.PrivateKey
) -> None:
    async with (
        served(tmp_path / "a", CC_SETTINGS) as cc_a,
        served(tmp_path / "b", CC_SETTINGS) as cc_b,
    ):
        cc_a.local.append({"role": "cc", "component_id": "cc-00000000000a"})
        cc_b.local.append({"role": "cc", "component_id": "cc-00000000000b"})
        # Named by its announced id (what an agent hears over mDNS) or by the address and
        # port a client connects to (the configured fallback): either way, only A takes it.
        for audience in ("cc-00000000000a", at(cc_a)):
            envelope = request_for(key, audience)
            status, answer = await send(cc_b, CREDENTIALS, envelope)
            assert status == 401
            assert answer["error"].startswith(f"request was signed for registrar {audience},")
            assert at(cc_b) in answer["error"] and "cc-00000000000b" in answer["error"]
            assert (await send(cc_a, CREDENTIALS, envelope))[0] == 202
        # An id that is not a registrar's (an NC on the same host) is not the registrar.
        cc_a.local.append({"role": "nc", "component_id": "nc-00000000000a"})
        assert (await send(cc_a, CREDENTIALS, request_for(key, "nc-00000000000a")))[0] == 401


async def test_the_clcs_peer_request_is_good_for_the_cc_it_names_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        served(tmp_path / "a", CC_SETTINGS) as cc_a,
        served(tmp_path / "b", CC_SETTINGS) as cc_b,
    ):
        target = ann(Role.CC, "cluster1", state=AnnouncedState.REGISTERED, api_port=8780)
        cc_a.local.append({"role": "cc", "component_id": target.component_id})
        cc_b.local.append({"role": "cc", "component_id": "cc-00000000000b"})
        async with aiohttp.ClientSession() as session:
            monkeypatch.setattr(peer, "_url", lambda _a, _p: f"{cc_a.base}/v1/peer/registry")
            root = cc_a.cloud.issuer.cert
            assert await peer._fetch_nodes(session, cc_a.cloud.key, root, target) == []
            # The same CLC request, sent to another CC (or replayed by a CC to another one).
            monkeypatch.setattr(peer, "_url", lambda _a, _p: f"{cc_b.base}/v1/peer/registry")
            with pytest.raises(aiohttp.ClientResponseError) as refused:
                await peer._fetch_nodes(session, cc_b.cloud.key, root, target)
            assert refused.value.status == 401


async def test_a_request_is_refused_after_the_registrar_restarts(
    tmp_path: Path, key: keypairs.PrivateKey
) -> None:
    local = {"role": "clc", "component_id": CLC_ID}
    async with served(tmp_path, CLC_SETTINGS) as before:
        before.local.append(local)
        envelope = request_for(key, CLC_ID)
        assert (await send(before, CREDENTIALS, envelope))[0] == 202
        assert (await send(before, CREDENTIALS, envelope))[1] == {
            "error": "replayed request (nonce already used)",
            "code": "unauthorized",
        }
    # The same registrar (same registry, same id) started again: its nonces are gone, and
    # still the captured request is refused, well inside the clock window.
    async with served(tmp_path, CLC_SETTINGS) as after:
        after.local.append(local)
        status, answer = await send(after, CREDENTIALS, envelope)
        assert status == 401
        assert answer["error"].startswith("request signed before this registrar's replay memory")
        assert (await send(after, CREDENTIALS, request_for(key, CLC_ID)))[0] == 202


# -- malformed times, refused keys ----------------------------------------------------------


@pytest.mark.parametrize(
    ("stamp", "message"),
    [
        ("NaN", "NaN is not a JSON value"),
        ("Infinity", "Infinity is not a JSON value"),
        ("-Infinity", "-Infinity is not a JSON value"),
        ('"NaN"', "timestamp must be a Unix time"),
        ('"1700000000"', "timestamp must be a Unix time"),
        ("1e308", "timestamp must be a Unix time"),
        ("1" + "0" * 40, "timestamp must be a Unix time"),
        ("-1700000000", "timestamp must be a Unix time"),
        ("-0.5", "timestamp must be a Unix time"),
        ("0", "timestamp must be a Unix time"),
        ("null", "timestamp must be a Unix time"),
        ("true", "timestamp must be a Unix time"),
    ],
)
async def test_impossible_timestamps_are_400(
    clc: Harness, key: keypairs.PrivateKey, verifies: list[int], stamp: str, message: str
) -> None:
    payload = fields(key, CLC_ID, timestamp="@STAMP@")
    body = json.dumps(payload).replace('"@STAMP@"', stamp).encode()
    headers = {SIGNATURE_HEADER: signatures.sign(key, body)}  # a valid signature over all of it
    status, answer = await send(clc, CREDENTIALS, (body, headers))
    assert status == 400, answer
    assert message in answer["error"]
    assert verifies == []


def public_numbers_key(bits: int, exponent: int = 65537) -> keypairs.PublicKey:
    """A public key of any size without generating one (8192-bit generation takes seconds)."""
    modulus = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def pem_of(public_key: Any) -> str:
    return keypairs.public_pem(public_key)


@pytest.mark.parametrize(
    ("make", "refused"),
    [
        (lambda: rsa.generate_private_key(65537, 1024).public_key(), "RSA-1024"),
        (lambda: public_numbers_key(2040), "RSA-2040"),
        (lambda: public_numbers_key(4104), "RSA-4104"),
        (lambda: public_numbers_key(8192), "RSA-8192"),
        (lambda: public_numbers_key(2048, exponent=3), "RSA exponent 3"),
        (lambda: ec.generate_private_key(ec.SECP256R1()).public_key(), "EC (secp256r1)"),
        (lambda: ec.generate_private_key(ec.SECP384R1()).public_key(), "EC (secp384r1)"),
        (lambda: ed25519.Ed25519PrivateKey.generate().public_key(), "Ed25519"),
    ],
)
async def test_keys_of_another_type_size_or_exponent_are_403_before_any_verify(
    clc: Harness, verifies: list[int], make: Callable[[], Any], refused: str
) -> None:
    payload = fields(None, CLC_ID, public_key=pem_of(make()))
    body = json.dumps(payload).encode()
    headers = {SIGNATURE_HEADER: "A" * 344}  # whatever it signed, it is not looked at
    status, answer = await send(clc, CREDENTIALS, (body, headers))
    assert status == 403
    assert answer["error"].startswith(f"key refused: {refused}")
    assert answer["error"].endswith(KEY_RULE)
    assert verifies == []
    with pytest.raises(signatures.KeyRefused):
        signatures.load_request_key(payload["public_key"])


async def test_rsa_2048_to_4096_with_e_65537_is_accepted(
    clc: Harness, key: keypairs.PrivateKey
) -> None:
    big = rsa.generate_private_key(65537, 4096)
    for signer in (key, big):
        assert (await send(clc, CREDENTIALS, request_for(signer, CLC_ID)))[0] == 202
    assert signatures.load_request_key(pem_of(public_numbers_key(3072))).key_size == 3072
    with pytest.raises(keypairs.CredentialError, match="not a PEM public key"):
        signatures.load_request_key(
            "-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----"
        )
    with pytest.raises(keypairs.CredentialError, match="not a PEM public key"):
        signatures.load_request_key("\ud800")  # a lone surrogate JSON may carry: 400, not 500


# -- cheap before expensive --------------------------------------------------------------------


async def test_a_flood_failing_any_cheaper_check_never_reaches_verify(
    clc: Harness, key: keypairs.PrivateKey, verifies: list[int]
) -> None:
    accepted = request_for(key, CLC_ID)
    assert (await send(clc, CREDENTIALS, accepted))[0] == 202
    assert len(verifies) == 1
    accepted_nonce = json.loads(accepted[0])["nonce"]
    small = pem_of(rsa.generate_private_key(65537, 1024).public_key())
    floods: dict[str, tuple[Callable[[], Envelope], int]] = {
        "not JSON": (lambda: (b"{" * 100, {SIGNATURE_HEADER: "A" * 344}), 400),
        "no signature": (lambda: (request_for(key, CLC_ID)[0], {}), 401),
        "huge signature": (
            lambda: (request_for(key, CLC_ID)[0], {SIGNATURE_HEADER: "A" * 5000}),
            401,
        ),
        "old version": (lambda: sign_raw(key, fields(key, CLC_ID, v=1)), 400),
        "stale": (lambda: sign_raw(key, fields(key, CLC_ID, timestamp=time.time() - 400)), 401),
        "early": (lambda: sign_raw(key, fields(key, CLC_ID, timestamp=time.time() + 400)), 401),
        "before start": (
            lambda: sign_raw(key, fields(key, CLC_ID, timestamp=time.time() - 200)),
            401,
        ),
        "other path": (lambda: request_for(key, CLC_ID, path="/v1/announce"), 401),
        "other method": (lambda: sign_raw(key, fields(key, CLC_ID, method="PUT")), 401),
        "other registrar": (lambda: request_for(key, "clc-0000000000ff"), 401),
        "replayed": (lambda: sign_raw(key, fields(key, CLC_ID, nonce=accepted_nonce)), 401),
        "small key": (lambda: sign_raw(key, fields(key, CLC_ID, public_key=small)), 403),
    }
    for name, (make, expected) in floods.items():
        for _ in range(20):
            status, answer = await send(clc, CREDENTIALS, make())
            assert status == expected, (name, answer)
    assert len(verifies) == 1  # 240 refusals, not one signature check among them
    # A bad signature is the one refusal that costs a check.
    forged = sign_raw(keypairs.generate_key(), fields(key, CLC_ID))
    assert await send(clc, CREDENTIALS, forged) == (
        401,
        {"error": "signature does not verify with the enclosed key", "code": "unauthorized"},
    )
    assert len(verifies) == 2


async def test_a_forged_request_does_not_use_up_its_nonce(
    clc: Harness, key: keypairs.PrivateKey
) -> None:
    payload = fields(key, CLC_ID)
    forged = sign_raw(keypairs.generate_key(), payload)
    assert (await send(clc, CREDENTIALS, forged))[0] == 401
    # The nonce is remembered only once a signature verified: the real request still passes.
    assert (await send(clc, CREDENTIALS, sign_raw(key, payload)))[0] == 202
    assert (await send(clc, CREDENTIALS, sign_raw(key, payload)))[0] == 401


def test_checks_run_in_the_documented_order(key: keypairs.PrivateKey) -> None:
    """Stale and for another path and replayed and a small key: the clock speaks first; then
    the binding; then the nonce; then the key; and only then the signature."""
    nonces = NonceCache(started=0.0)
    now = time.time()
    good = fields(key, CLC_ID, timestamp=now)
    body, headers = sign_raw(key, good)

    def refusal(**overrides: Any) -> str:
        payload = {**good, **overrides}
        data = json.dumps(payload).encode()
        with pytest.raises(ApiError) as refused:
            verify_signed(
                data,
                headers[SIGNATURE_HEADER],
                nonces,
                method="POST",
                path=CREDENTIALS,
                audiences={CLC_ID},
                now=now,
            )
        return refused.value.message

    verify_signed(
        body,
        headers[SIGNATURE_HEADER],
        nonces,
        method="POST",
        path=CREDENTIALS,
        audiences={CLC_ID},
        now=now,
    )
    small = pem_of(public_numbers_key(1024))
    worst = {"timestamp": now - 400, "path": "/x", "audience": "y", "public_key": small}
    assert "check the clocks" in refusal(**worst)
    del worst["timestamp"]
    assert "signed for POST /x" in refusal(**worst)
    del worst["path"]
    assert "signed for registrar y" in refusal(**worst)
    del worst["audience"]
    assert refusal(**worst) == "replayed request (nonce already used)"
    assert refusal(public_key=small, nonce="fresh").startswith("key refused: RSA-1024")
    assert refusal(nonce="fresh") == "signature does not verify with the enclosed key"


# -- the nonce cache -------------------------------------------------------------------------


def test_the_nonce_cache_stays_bounded_and_drops_what_expired() -> None:
    cap = 10_000
    nonces = NonceCache(window=CLOCK_SKEW, cap=cap, started=0.0)
    start = 1_000_000.0
    for i in range(20_000):
        stamp = start + i * 0.001
        nonces.add(f"nonce-{i}", stamp, stamp)
        assert len(nonces) <= cap
    assert len(nonces) == cap
    # The oldest 10 000 were forgotten to make room; the floor stands at the last of them, so
    # none of them passes again although all are well inside the clock window.
    assert nonces.floor == pytest.approx(start + 9_999 * 0.001)
    now = start + 20.0
    assert not nonces.seen("nonce-9999", now) and nonces.seen("nonce-10000", now)
    # Once their stamps are more than the window old, the rest go too.
    assert not nonces.seen("nonce-19999", start + 20 + CLOCK_SKEW + 1)
    assert len(nonces) == 0


def test_a_request_whose_nonce_was_evicted_is_still_refused(key: keypairs.PrivateKey) -> None:
    nonces = NonceCache(cap=3, started=0.0)
    now = time.time()
    first = sign_raw(key, fields(key, CLC_ID, timestamp=now - 10))

    def check(envelope: Envelope) -> None:
        body, headers = envelope
        verify_signed(
            body,
            headers[SIGNATURE_HEADER],
            nonces,
            method="POST",
            path=CREDENTIALS,
            audiences={CLC_ID},
            now=now,
        )

    check(first)
    for delay in (3, 2, 1):
        check(sign_raw(key, fields(key, CLC_ID, timestamp=now - delay)))
    assert len(nonces) == 3 and nonces.floor == now - 10
    with pytest.raises(ApiError, match="replay memory"):
        check(first)


def test_the_default_nonce_cache_holds_a_busy_windows_worth() -> None:
    nonces = NonceCache(started=0.0)
    assert nonces.cap == NONCE_CAP >= 20_000
    for i in range(20_000):
        nonces.add(f"n{i}", 5000.0 + i / 100, 5000.0 + i / 100)
    assert len(nonces) == 20_000 and nonces.floor == 0.0
    assert not nonces.seen("n0", 5200.0 + CLOCK_SKEW + 1)
    assert len(nonces) == 0


# -- the agent's side ------------------------------------------------------------------------


async def test_the_agent_signs_for_the_registrar_it_heard_or_the_address_it_dials(
    tmp_path: Path, key: keypairs.PrivateKey
) -> None:
    identity = Identity("walrus-000000000001", key, keypairs.fingerprint(key.public_key()))
    async with served(tmp_path / "clc", CLC_SETTINGS, tls_dir=tmp_path / "tls") as clc:
        clc.local.append({"role": "clc", "component_id": CLC_ID})
        port = clc.client.port or 0
        heard = Endpoint("127.0.0.1", port, CLC_ID)
        assert await collect._target(heard) == (f"https://127.0.0.1:{port}", CLC_ID)
        assert await collect._target(Endpoint("localhost", port, "")) == (
            f"https://127.0.0.1:{port}",
            f"127.0.0.1:{port}",
        )
        async with aiohttp.ClientSession() as session:
            for endpoint in (
                heard,
                Endpoint("127.0.0.1", port, ""),
                Endpoint("localhost", port, ""),
            ):
                outcome = await collect.collect_credentials(
                    session, identity, Role.WALRUS, endpoint, tmp_path, wait=0
                )
                assert outcome is collect.Outcome.PENDING
            # A registrar heard under another id is not this one: refused in the TLS
            # handshake, before the request is sent.
            stranger = Endpoint("127.0.0.1", port, "clc-0000000000ff")
            with pytest.raises(aiohttp.ClientConnectorCertificateError, match="ff announced"):
                await collect.collect_credentials(
                    session, identity, Role.WALRUS, stranger, tmp_path, wait=0
                )
