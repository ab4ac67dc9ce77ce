"""Attacks on issue 7 part 3 ("TLS, and pinning that sticks"), as a hostile host on the LAN and
as an unlucky operator would mount them. Real TLS on 127.0.0.1 (ephemeral ports) throughout;
mDNS is the in-memory fake; every agent's API is bound to loopback only.

Each test PASSES when the defence holds and FAILS where there is a hole. Tests whose docstring
starts with "DOCUMENTED LIMIT" check that a limit behaves the way docs/security.md says.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import ssl
import stat
import textwrap
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID

from eucareg.agent import collect as agent_collect
from eucareg.agent import service as service_module
from eucareg.agent.host import Agent, AgentTiming
from eucareg.agent.locate import Endpoint, Registrars
from eucareg.agent.tasks import RestartPolicy
from eucareg.cli.main import main as cli_main
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs, names, tls
from eucareg.pki import credentials as cred
from tests.factories import ann, fresh_key, sighting
from tests.unit.test_agent_collect import clc_sighting
from tests.unit.test_agent_fakes import (
    FakeCloud,
    FakeMdns,
    FakeRegistrar,
    bundle_reply,
    eventually,
    key,
    make_config,
    seed_identity,
)
from tests.unit.test_api_components import from_lan
from tests.unit.test_api_harness import CC_SETTINGS, CLOUD_CLC_ID, key_of, served
from tests.unit.test_tls import CC_CERT, CC_EXPECT, CC_KEY, CLOUD, make_cloud, signed_by

TIMING = AgentTiming(
    long_poll=0.3, retry_base=0.02, retry_max=0.1, min_request_interval=0.02, stop_step=1.0
)
NOW = datetime.datetime.now(datetime.UTC)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)

# What a registered Walrus (or CC, SC) expects of its CLC, holding the cloud CA.
CLC_ID = "clc-00000001"  # the id make_cloud() names in CLOUD's CA certificate
CLC_EXPECT = tls.Expect(Role.CLC, component_id=CLC_ID, root=CLOUD.root)
CLOUD_PIN = certificates.cert_fingerprint(CLOUD.root)


# -- certificate and DER helpers ----------------------------------------------------------------


def name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)] if ou else []
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def build(
    subject_key: Any,
    issuer_key: Any,
    *,
    subject: x509.Name,
    issuer: x509.Name | None = None,
    uris: tuple[str, ...] = (),
    raw_san: bytes | None = None,
    ca: bool = False,
    before: datetime.datetime = NOW - HOUR,
    after: datetime.datetime = NOW + DAY,
) -> x509.Certificate:
    """Any certificate an attacker can sign with a key he holds."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    if raw_san is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.17"), raw_san),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = (
        bytes([n])
        if n < 128
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + body


def san_with_edi_party(uri: str) -> bytes:
    """GeneralNames: the expected URI, then an ediPartyName, which OpenSSL parses and
    cryptography refuses with UnsupportedGeneralNameType (not a ValueError)."""
    edi = tlv(0xA5, tlv(0xA1, tlv(0x0C, b"x")))
    return tlv(0x30, tlv(0x86, uri.encode()) + edi)


def pem_of_der(der: bytes) -> bytes:
    lines = textwrap.wrap(base64.b64encode(der).decode(), 64)
    return (
        "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
    ).encode()


def resigned_der(cert: x509.Certificate, signer: Any, patch: Callable[[bytes], bytes]) -> bytes:
    """`cert` with its TBS bytes patched (same length) and signed again by `signer`."""
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    tbs = cert.tbs_certificate_bytes
    at = der.find(tbs)
    new_tbs = patch(tbs)
    assert len(new_tbs) == len(tbs) and new_tbs != tbs
    signature = signer.sign(new_tbs, padding.PKCS1v15(), hashes.SHA256())
    assert len(signature) == len(cert.signature)
    der[at : at + len(tbs)] = new_tbs
    der[-len(signature) :] = signature
    return bytes(der)


def strict_der_violation(signer: Any) -> bytes:
    """A self-signed CA whose `critical` BOOLEAN is 0x01 instead of 0xFF: OpenSSL takes it
    (and serves it in a chain); cryptography's strict DER parser raises ValueError."""
    cert = build(signer, signer, subject=name("junk"), ca=True)
    der = resigned_der(cert, signer, lambda t: t.replace(b"\x01\x01\xff", b"\x01\x01\x01", 1))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(der)
    return der


# -- servers ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rogue:
    url: str
    requests: list[dict[str, Any]]
    port: int


@contextlib.asynccontextmanager
async def https(
    tmp: Path,
    key_: Any,
    chain: list[x509.Certificate] | bytes,
    *,
    status: int = 410,
    body: Any = None,
    context: ssl.SSLContext | None = None,
    reply: Callable[[dict[str, Any]], Any] | None = None,
) -> AsyncIterator[Rogue]:
    """A registrar impostor on 127.0.0.1: `chain` (certificates, or raw PEM bytes), `key_`;
    every request is recorded; the credential desk answers `status` with `body`."""
    await asyncio.to_thread(tmp.mkdir, parents=True, exist_ok=True)
    chain_file, key_file = tmp / "rogue-chain.pem", tmp / "rogue-key.pem"
    if isinstance(chain, bytes):
        cred.write_atomic(chain_file, chain)
    else:
        tls.write_chain(chain_file, chain)
    cred.write_atomic(
        key_file,
        key_.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    requests: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {}
        requests.append({"path": request.path, **(payload if isinstance(payload, dict) else {})})
        if reply is not None:
            return await reply(payload)
        if request.path == "/v1/announce":
            return web.json_response({"status": "pending", "reason": "rogue"})
        return web.json_response(body or {"error": "revoked (rogue)"}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    if context is None:
        context = tls.server_context(chain_file, key_file)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Rogue(f"https://127.0.0.1:{port}", requests, port)
    finally:
        await runner.cleanup()


async def fetch(url: str, expect: tls.Expect, session: aiohttp.ClientSession | None = None) -> Any:
    async def go(s: aiohttp.ClientSession) -> Any:
        async with s.get(url + "/", ssl=tls.client_context(expect)) as response:
            return await response.json(content_type=None)

    if session is not None:
        return await go(session)
    async with aiohttp.ClientSession() as own:
        return await go(own)


async def refused_reason(url: str, expect: tls.Expect) -> str:
    """The reason the handshake refused `url`; fails the test if anything else happened."""
    try:
        await asyncio.wait_for(fetch(url, expect), 10)
    except aiohttp.ClientConnectorCertificateError as exc:
        assert isinstance(exc.certificate_error, tls.UntrustedRegistrar), exc
        return str(exc.certificate_error)
    except aiohttp.ClientError as exc:
        pytest.fail(f"refused, but not by the registrar check: {type(exc).__name__}: {exc}")
    except Exception as exc:
        pytest.fail(f"the handshake raised {type(exc).__name__}: {exc} instead of a refusal")
    pytest.fail("the impostor was accepted")


def refusal(record: logging.LogRecord) -> bool:
    """A log line of the agent saying it would not talk to a registrar, and why."""
    text = record.getMessage()
    return record.levelno >= logging.WARNING and (
        "refusing registrar" in text or "UntrustedRegistrar" in text or "cloud-cert.pem" in text
    )


def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's registrar API binds every interface (host=None); in these tests it binds
    127.0.0.1 only."""

    class LoopbackSite(service_module.PacedTLSSite):
        def __init__(self, runner: Any, host: Any = None, port: Any = None, **kw: Any) -> None:
            super().__init__(runner, "127.0.0.1", port, **kw)

    monkeypatch.setattr(service_module, "PacedTLSSite", LoopbackSite)


@pytest.fixture
async def clc_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    loopback_only(monkeypatch)
    seed_identity(tmp_path / "state", Role.CLC, "clc-00000000c10d", key(4))
    cfg = make_config(tmp_path, {"clc": {}})
    agent = Agent(dataclasses.replace(cfg, api_port=0), backend=FakeMdns(), timing=TIMING)
    await agent.start()
    yield agent
    await agent.stop()


# == 1. The pin of a component that is not registered yet: token / ca_fingerprint ============


async def test_a_token_pinned_component_accepts_the_genuine_clc(tmp_path: Path) -> None:
    """HOLE. The CLC serves TLS with its cloud CA certificate alone (service.py:
    write_chain(clc.pem, [cloud_cert])), but a pin is looked up only in chain[1:]
    (check_registrar: `_pinned_in(chain[1:], pin)`). A Walrus, CC or SC that pins the CA by
    its token or by `ca_fingerprint` (what docs/security.md tells operators to do on any LAN
    they do not control) refuses the genuine CLC as "a rogue registrar?" forever."""
    async with https(tmp_path, CLOUD.key, [CLOUD.root], status=200, body={"ok": 1}) as clc:
        pinned = tls.Expect(Role.CLC, component_id=CLC_ID, pin=CLOUD_PIN)
        assert await fetch(clc.url, pinned) == {"ok": 1}


async def test_a_token_pinned_component_accepts_the_real_agents_clc(clc_agent: Agent) -> None:
    """HOLE (same as above, against the CLC as the agent really serves it)."""
    assert clc_agent.service is not None
    root = certificates.load_cert(clc_agent.config.key_dir / cred.CLOUD_CERT)
    url = f"https://127.0.0.1:{clc_agent.service.port}/v1/health"
    held = tls.Expect(Role.CLC, component_id="clc-00000000c10d", root=root)
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=tls.client_context(held)) as response:
            assert response.status == 200  # the held-root path works...
        pinned = tls.Expect(
            Role.CLC, component_id="clc-00000000c10d", pin=certificates.cert_fingerprint(root)
        )
        async with session.get(url, ssl=tls.client_context(pinned)) as response:
            assert response.status == 200  # ...the token / ca_fingerprint path must too


async def test_a_walrus_with_ca_fingerprint_registers_with_the_genuine_clc(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HOLE (end to end): a Walrus configured with `ca_fingerprint` of the genuine cloud, and
    the genuine CLC as its fallback registrar, never registers."""
    caplog.set_level(logging.INFO, logger="eucareg")
    cloud = FakeCloud()
    genuine = FakeRegistrar(bundle_reply(cloud, Role.WALRUS), cloud)
    url = await genuine.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(
        tmp_path, {"walrus": {}}, fallback_registrar=url, ca_fingerprint=cloud.fingerprint
    )
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None
        try:
            await eventually(lambda: walrus.registered, timeout=5)
        except AssertionError:
            refusals = [r.getMessage() for r in caplog.records if refusal(r)]
            pytest.fail(f"never registered with the genuine CLC: {refusals[:1]}")
    finally:
        await agent.stop()
        await genuine.close()


# == 2. Certificates crafted to crash the check instead of failing it =========================


async def test_a_san_with_an_unsupported_general_name_is_refused_not_raised(tmp_path: Path) -> None:
    """HOLE. cert_identity catches ExtensionNotFound and ValueError only; cryptography raises
    UnsupportedGeneralNameType (an Exception) for an ediPartyName in the SAN. The exception
    leaves SSLObject.do_handshake, which asyncio turns into a 'Fatal error' and aiohttp passes
    on raw: not a ClientError. The identity is read before the pin is checked, so this needs
    no CA key, and works against a registered, pinned component too."""
    rogue_key = fresh_key()
    leaf = build(
        rogue_key,
        rogue_key,
        subject=name("cluster cluster1 cc-00000001", "cluster"),
        raw_san=san_with_edi_party("urn:eucareg:cc:cluster1:cc-00000001"),
    )
    async with https(tmp_path, rogue_key, [leaf]) as rogue:
        reason = await refused_reason(rogue.url, CC_EXPECT)
        assert "cc-00000001" in reason or "certificate" in reason
        assert rogue.requests == []


async def test_a_chain_certificate_cryptography_cannot_parse_is_refused_not_raised(
    tmp_path: Path,
) -> None:
    """HOLE. _peer_chain loads every certificate the peer sent with cryptography, outside any
    try: a chain certificate in BER that OpenSSL accepts makes load_der_x509_certificate raise
    ValueError inside do_handshake (again no ssl.SSLError, again no CA key needed)."""
    rogue_key = fresh_key()
    leaf = build(
        rogue_key,
        rogue_key,
        subject=name("cluster cluster1 cc-00000001", "cluster"),
        uris=("urn:eucareg:cc:cluster1:cc-00000001",),
    )
    junk = strict_der_violation(fresh_key())
    chain = leaf.public_bytes(serialization.Encoding.PEM) + pem_of_der(junk)
    async with https(tmp_path, rogue_key, chain) as rogue:
        await refused_reason(rogue.url, CC_EXPECT)
        assert rogue.requests == []


async def test_a_crafted_certificate_cannot_kill_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HOLE (impact): one rogue registrar with the certificate above makes the component's
    collect task die (the error is not in COLLECT_ERRORS); the Supervisor restarts it, and
    after max_crashes quick deaths the whole agent gives up (AgentFailed, exit non-zero), the
    registrar too if this host runs one. Here with a fast restart policy."""
    caplog.set_level(logging.INFO, logger="eucareg")
    rogue_key = fresh_key()
    leaf = build(
        rogue_key,
        rogue_key,
        subject=name("cloud clc-00000000dead", "cloud"),
        raw_san=san_with_edi_party("urn:eucareg:clc:-:clc-00000000dead"),
    )
    async with https(tmp_path / "rogue", rogue_key, [leaf]) as rogue:
        seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
        cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=rogue.url)
        fast = RestartPolicy(base=0.01, max=0.05, healthy_after=60.0, max_crashes=3)
        agent = Agent(cfg, backend=FakeMdns(), timing=TIMING, restart=fast)
        await agent.start()
        try:
            with contextlib.suppress(AssertionError):
                await eventually(lambda: agent.supervisor.failed.is_set(), timeout=3)
            assert not agent.supervisor.failed.is_set(), agent.supervisor.failure
            assert agent.supervisor.restarts == {}, "the collect task died"
            assert any(refusal(r) for r in caplog.records), "no refusal was logged"
            assert rogue.requests == []
        finally:
            with contextlib.suppress(Exception):
                await agent.stop()


async def test_a_crafted_decoy_does_not_keep_a_registered_component_from_its_registrar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOLE (impact): the issue wants "a decoy delays it by one short timeout at most". A
    decoy listed before the genuine CLC (candidates go by address) with the crafted
    certificate ends _ask_each with an exception it does not catch, every round: the genuine
    CLC is never asked, so a registered, pinned Walrus never watches its credentials."""
    cloud = FakeCloud()
    genuine = FakeRegistrar(bundle_reply(cloud, Role.WALRUS), cloud)
    genuine_url = await genuine.start()
    rogue_key = fresh_key()
    leaf = build(
        rogue_key,
        rogue_key,
        subject=name("cloud clc-00000000dead", "cloud"),
        raw_san=san_with_edi_party("urn:eucareg:clc:-:clc-00000000dead"),
    )
    async with https(tmp_path / "rogue", rogue_key, [leaf]) as rogue:
        seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
        cfg = make_config(tmp_path, {"walrus": {}})
        held = cloud.bundle(Role.WALRUS, key(1).public_key(), "walrus-00000000aaaa")
        cred.write_credentials(
            cfg.key_dir, Role.WALRUS, cred.verify_bundle(held, Role.WALRUS, key(1))
        )
        genuine_port = int(genuine_url.rsplit(":", 1)[1])
        # What mDNS would give: the decoy first (lower address), then the genuine CLC.
        endpoints = [
            Endpoint("127.0.0.1", rogue.port, "clc-00000000dead"),
            Endpoint("127.0.0.1", genuine_port, "test-cloud", cloud.fingerprint),
        ]
        monkeypatch.setattr(Registrars, "candidates", lambda self, *a, **k: list(endpoints))
        agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
        await agent.start()
        try:
            with contextlib.suppress(AssertionError):
                await eventually(lambda: any("have" in r for r in genuine.requests), timeout=5)
            assert any("have" in r for r in genuine.requests), "the genuine CLC was never asked"
            assert agent.supervisor.restarts == {}
        finally:
            with contextlib.suppress(Exception):
                await agent.stop()
            await genuine.close()


# == 3. Impostors: each must be refused with a reason =========================================


def _ec_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def impostors() -> list[Any]:
    """(id, expectation, server key, chain, reason substring)."""
    out: list[Any] = []
    # A registered CC signs itself a second certificate naming the CLC / another CC id.
    fake_key, fake_clc = signed_by(CC_KEY, CC_CERT, Role.CLC, CLC_ID)
    out.append(
        (
            "cc-signed-leaf-as-clc",
            CLC_EXPECT,
            fake_key,
            [fake_clc, CC_CERT, CLOUD.root],
            "not signed by our cloud CA",
        )
    )
    fake_key2, fake_cc = signed_by(CC_KEY, CC_CERT, Role.CC, "cc-00000001", "cluster1")
    out.append(
        (
            "cc-signs-itself-a-new-key",
            CC_EXPECT,
            fake_key2,
            [fake_cc, CC_CERT, CLOUD.root],
            "not signed by our cloud CA",
        )
    )
    # A rogue CA that copies the genuine CA's subject name; a leaf "issued" by that name.
    rogue_ca_key = fresh_key()
    rogue_ca = build(rogue_ca_key, rogue_ca_key, subject=CLOUD.root.subject, ca=True)
    rogue_leaf_key, rogue_leaf = signed_by(
        rogue_ca_key, rogue_ca, Role.CC, "cc-00000001", "cluster1"
    )
    assert rogue_leaf.issuer == CLOUD.root.subject
    out.append(
        (
            "same-issuer-name-held-root",
            CC_EXPECT,
            rogue_leaf_key,
            [rogue_leaf, rogue_ca],
            "not signed by our cloud CA",
        )
    )
    by_pin = replace(CC_EXPECT, root=None, pin=CLOUD_PIN)
    out.append(
        (
            "same-issuer-name-pin-genuine-root-in-chain",
            by_pin,
            rogue_leaf_key,
            [rogue_leaf, CLOUD.root, rogue_ca],
            "not signed by our cloud CA",
        )
    )
    out.append(
        (
            "pinned-root-repeated",
            by_pin,
            rogue_leaf_key,
            [rogue_leaf, CLOUD.root, CLOUD.root, CLOUD.root],
            "not signed by our cloud CA",
        )
    )
    out.append(
        (
            "rogue-root-only-pin",
            by_pin,
            rogue_leaf_key,
            [rogue_leaf, rogue_ca],
            "does not show the cloud CA we pin",
        )
    )
    # The pinned CA's public key, in a certificate the rogue signed itself (not self-signed).
    pinned_key_copy = (
        x509.CertificateBuilder()
        .subject_name(CLOUD.root.subject)
        .issuer_name(rogue_ca.subject)
        .public_key(CLOUD.root.public_key())
        .serial_number(7)
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(rogue_ca_key, hashes.SHA256())
    )
    assert certificates.cert_fingerprint(pinned_key_copy) == CLOUD_PIN
    out.append(
        (
            "pinned-key-copied-into-a-rogue-cert",
            by_pin,
            rogue_leaf_key,
            [rogue_leaf, pinned_key_copy, rogue_ca],
            "does not show the cloud CA we pin",
        )
    )
    fake_clc_by_pin = replace(CLC_EXPECT, root=None, pin=CLOUD_PIN)
    out.append(
        (
            "cc-signed-leaf-as-clc-pin",
            fake_clc_by_pin,
            fake_key,
            [fake_clc, CC_CERT, CLOUD.root],
            "not signed by our cloud CA",
        )
    )
    # The genuine CC's certificate, out of its validity (a stolen key of a retired CC).
    for label, before, after in (
        ("expired", NOW - 10 * DAY, NOW - DAY),
        ("not-yet-valid", NOW + DAY, NOW + 10 * DAY),
    ):
        k = fresh_key()
        c = certificates.issue_certificate(
            issuer_key=CLOUD.key,
            issuer_cert=CLOUD.root,
            subject_key=k.public_key(),
            role=Role.CC,
            component_id="cc-00000001",
            cluster="cluster1",
        )
        c = build(
            k,
            CLOUD.key,
            subject=c.subject,
            issuer=CLOUD.root.subject,
            uris=("urn:eucareg:cc:cluster1:cc-00000001",),
            ca=True,
            before=before,
            after=after,
        )
        out.append((label, CC_EXPECT, k, [c, CLOUD.root], "not valid now"))
    # EC keys: a rogue leaf, and a rogue EC "root" in the chain of a pinned client.
    ec_key = _ec_key()
    ec_leaf = build(
        ec_key,
        ec_key,
        subject=name("cluster cluster1 cc-00000001", "cluster"),
        uris=("urn:eucareg:cc:cluster1:cc-00000001",),
    )
    out.append(("ec-leaf-held-root", CC_EXPECT, ec_key, [ec_leaf], "not signed by our cloud CA"))
    ec_root_key = _ec_key()
    ec_root = build(ec_root_key, ec_root_key, subject=name("cloud clc-00000001", "cloud"), ca=True)
    ec_leaf2 = build(
        ec_key,
        ec_root_key,
        subject=name("cluster cluster1 cc-00000001", "cluster"),
        issuer=ec_root.subject,
        uris=("urn:eucareg:cc:cluster1:cc-00000001",),
    )
    out.append(
        (
            "ec-root-in-chain-pin",
            by_pin,
            ec_key,
            [ec_leaf2, ec_root],
            "does not show the cloud CA we pin",
        )
    )
    # An announced id that matches, with another key (a self-signed copy of the name).
    copy_key = fresh_key()
    copy = build(
        copy_key, copy_key, subject=CC_CERT.subject, uris=("urn:eucareg:cc:cluster1:cc-00000001",)
    )
    out.append(
        (
            "matching-id-other-key",
            CC_EXPECT,
            copy_key,
            [copy, CLOUD.root],
            "not signed by our cloud CA",
        )
    )
    # Registered insiders of another role posing as a registrar.
    sc_key, sc = CLOUD.issue(Role.SC, "sc-00000001", "cluster1")
    out.append(("registered-sc-as-cc", CC_EXPECT, sc_key, [sc, CLOUD.root], "not a cc"))
    walrus_key, walrus = CLOUD.issue(Role.WALRUS, "walrus-00000001")
    out.append(
        (
            "registered-walrus-as-clc",
            replace(CLC_EXPECT, component_id=None),
            walrus_key,
            [walrus, CLOUD.root],
            "not a clc",
        )
    )
    # SAN tricks on a rogue's own certificate: uppercase, unicode, extra colons, a second URI.
    for label, uris, subject in (
        ("uppercase-urn", ("URN:EUCAREG:CC:cluster1:cc-00000001",), name("x")),
        ("uppercase-role", ("urn:eucareg:CC:cluster1:cc-00000001",), name("x")),
        ("extra-colon", ("urn:eucareg:cc:cluster1:cc-00000001:x",), name("x")),
        (
            "two-uris-other-role-first",
            ("urn:eucareg:sc:cluster1:cc-00000001", "urn:eucareg:cc:cluster1:cc-00000001"),
            name("x"),
        ),
        ("percent-encoded", ("urn:eucareg:cc:cluster1:cc%2D00000001",), name("x")),
    ):
        k = fresh_key()
        c = build(k, k, subject=subject, uris=uris)
        out.append((f"san-{label}", CC_EXPECT, k, [c, CLOUD.root], "not a cc"))
    return out


IMPOSTORS = impostors()


@pytest.mark.parametrize(
    ("expect", "server_key", "chain", "reason"),
    [case[1:] for case in IMPOSTORS],
    ids=[case[0] for case in IMPOSTORS],
)
async def test_an_impostor_is_refused_with_a_reason(
    tmp_path: Path, expect: tls.Expect, server_key: Any, chain: list[x509.Certificate], reason: str
) -> None:
    async with https(tmp_path, server_key, chain) as rogue:
        said = await refused_reason(rogue.url, expect)
        assert reason in said, said
        assert rogue.requests == []


@pytest.mark.parametrize(
    ("uri", "subject", "named"),
    [
        ("urn:eucareg:cc:cluster1:cc-00000001", name("x"), (Role.CC, "cluster1", "cc-00000001")),
        ("URN:EUCAREG:cc:cluster1:cc-00000001", name("x"), None),
        ("urn:eucareg:CC:cluster1:cc-00000001", name("x"), None),
        ("urn:eucareg:cc:cluster1:cc-0000000１", name("x"), None),  # noqa: RUF001 - fullwidth
        ("urn:eucareg:cc:clüster:cc-00000001", name("x"), None),
        ("urn:eucareg:cc:cluster1:cc-00000001\n", name("x"), None),
        ("urn:eucareg:cc::cc-00000001", name("x"), None),
        ("urn:eucareg:cc:-:cc-00000001", name("x"), (Role.CC, None, "cc-00000001")),
        (
            "urn:eucareg:nc:cluster1:cc-00000001",
            name("cluster cluster1 cc-00000001", "cluster"),
            (Role.NC, "cluster1", "cc-00000001"),
        ),
        (
            "urn:eucareg:cc:a:b:c",
            name("cluster cluster1 cc-00000001", "cluster"),
            (Role.CC, "cluster1", "cc-00000001"),
        ),
    ],
)
def test_cert_identity_reads_only_what_the_certificate_says(
    uri: str, subject: x509.Name, named: tuple | None
) -> None:
    """Parsing holds: crafted SANs name nobody or exactly what they say; a malformed eucareg
    URI falls back to the subject (documented for old certificates). Never an exception.
    (The SAN is written as raw DER, so that non-ASCII bytes reach the parser.)"""
    k = fresh_key()
    cert = build(k, k, subject=subject, raw_san=tlv(0x30, tlv(0x86, uri.encode())))
    got = names.cert_identity(cert)
    assert got == (names.CertIdentity(*named) if named else None)


async def test_a_server_with_no_certificate_or_an_old_protocol_is_refused(tmp_path: Path) -> None:
    """Holds: anonymous ciphers (no certificate at all) and TLS 1.0 / 1.1 never get a
    handshake, so nothing is sent."""
    anon = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    anon.maximum_version = ssl.TLSVersion.TLSv1_2
    anon.set_ciphers("aNULL:@SECLEVEL=0")
    async with https(tmp_path / "anon", CC_KEY, [CC_CERT], context=anon) as rogue:
        with pytest.raises(aiohttp.ClientError):
            await fetch(rogue.url, replace(CC_EXPECT, root=None, component_id=None))  # unpinned
        assert rogue.requests == []
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = version
            old.maximum_version = version
        old.set_ciphers("ALL:@SECLEVEL=0")
        tls.write_chain(tmp_path / "old.pem", [CC_CERT, CLOUD.root])
        cred.write_atomic(tmp_path / "old-key.pem", keypairs.key_pem(CC_KEY))
        old.load_cert_chain(tmp_path / "old.pem", tmp_path / "old-key.pem")
        async with https(tmp_path / f"old{version}", CC_KEY, [CC_CERT], context=old) as rogue:
            with pytest.raises(aiohttp.ClientError):
                await fetch(rogue.url, CC_EXPECT)
            assert rogue.requests == []


async def test_concurrent_handshakes_each_get_their_own_verdict(tmp_path: Path) -> None:
    """Holds: one cached context, many handshakes at once; the rogue's all fail, the genuine
    CC's all succeed."""
    rogue_key = fresh_key()
    rogue_cert = build(
        rogue_key, rogue_key, subject=CC_CERT.subject, uris=("urn:eucareg:cc:cluster1:cc-00000001",)
    )
    async with (
        https(tmp_path / "g", CC_KEY, [CC_CERT, CLOUD.root], status=200, body={"ok": 1}) as good,
        https(
            tmp_path / "r", rogue_key, [rogue_cert, CLOUD.root], status=200, body={"ok": 1}
        ) as bad,
    ):
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(fetch(u, CC_EXPECT, session) for _ in range(15) for u in (good.url, bad.url)),
                return_exceptions=True,
            )
        goods, bads = results[0::2], results[1::2]
        assert all(r == {"ok": 1} for r in goods), goods
        assert all(isinstance(r, aiohttp.ClientConnectorCertificateError) for r in bads), bads
        assert bad.requests == []


async def test_expectations_never_share_a_context_or_a_pooled_connection(tmp_path: Path) -> None:
    """Holds: a connection opened under trust on first use is not reused once the component
    holds its pin (aiohttp pools by SSL context, and each expectation has its own)."""
    rogue_key = fresh_key()
    rogue_cert = build(
        rogue_key, rogue_key, subject=CC_CERT.subject, uris=("urn:eucareg:cc:cluster1:cc-00000001",)
    )
    unpinned = replace(CC_EXPECT, root=None)
    assert tls.client_context(unpinned) is not tls.client_context(CC_EXPECT)
    assert tls.client_context(CC_EXPECT) is tls.client_context(replace(CC_EXPECT))
    other_root = replace(CC_EXPECT, root=make_cloud().root)
    assert tls.client_context(other_root) is not tls.client_context(CC_EXPECT)
    async with https(tmp_path, rogue_key, [rogue_cert], status=200, body={"ok": 1}) as rogue:
        async with aiohttp.ClientSession() as session:
            assert await fetch(rogue.url, unpinned, session) == {"ok": 1}  # TOFU: believed
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await fetch(rogue.url, CC_EXPECT, session)  # pinned now: a new handshake
        assert len(rogue.requests) == 1


async def test_sni_for_an_unregistered_cc_gets_the_clc_certificate_and_is_refused(
    clc_agent: Agent,
) -> None:
    """Holds: the real agent's SNI callback with a name it has no certificate for (its CC is
    not registered) keeps the CLC certificate; a node expecting a CC refuses it."""
    assert clc_agent.service is not None
    root = certificates.load_cert(clc_agent.config.key_dir / cred.CLOUD_CERT)
    url = f"https://127.0.0.1:{clc_agent.service.port}/v1/health"
    expect = tls.Expect(Role.CC, "cluster1", root=root)
    for sni in ("cc.eucareg.invalid", "clc.eucareg.invalid", "bogus.example"):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
                async with session.get(
                    url, ssl=tls.client_context(expect), server_hostname=sni
                ) as response:
                    await response.read()
        assert "not a cc" in str(caught.value.certificate_error)


# == 4. The pin once registered: does it stick? ================================================


def node_credentials(
    key_dir: Path, node_key: keypairs.PrivateKey, cloud_cert_bytes: bytes | None
) -> tuple[Any, Any]:
    """A registered NC's files from CLOUD and CC_CERT; cloud-cert.pem as given."""
    node = certificates.issue_certificate(
        issuer_key=CC_KEY,
        issuer_cert=CC_CERT,
        subject_key=node_key.public_key(),
        role=Role.NC,
        component_id="nc-00000000beef",
        cluster="cluster1",
    )
    key_dir.mkdir(parents=True, exist_ok=True)
    if cloud_cert_bytes is None:
        cloud_cert_bytes = certificates.cert_pem(CLOUD.root).encode()
    cred.write_atomic(key_dir / "cloud-cert.pem", cloud_cert_bytes)
    cred.write_atomic(key_dir / "cluster-cert.pem", certificates.cert_pem(CC_CERT).encode())
    cred.write_atomic(key_dir / "node-cert.pem", certificates.cert_pem(node).encode())
    cred.write_atomic(key_dir / "node-pk.pem", keypairs.key_pem(node_key))
    return node, CC_CERT


def rogue_cc_cert() -> tuple[Any, x509.Certificate]:
    k = fresh_key()
    return k, build(
        k,
        k,
        subject=name("cluster cluster1 cc-00000000bad1", "cluster"),
        uris=("urn:eucareg:cc:cluster1:cc-00000000bad1",),
        ca=True,
    )


async def _registered_node_meets_rogue(
    tmp_path: Path, cloud_cert_bytes: bytes | None, caplog: pytest.LogCaptureFixture
) -> tuple[bool, Rogue]:
    caplog.set_level(logging.INFO, logger="eucareg")
    rogue_key, rogue_cert = rogue_cc_cert()
    async with https(tmp_path / "rogue", rogue_key, [rogue_cert]) as rogue:
        seed_identity(tmp_path / "state", Role.NC, "nc-00000000beef", key(7))
        cfg = make_config(tmp_path, {"nc": {"cluster": "cluster1"}}, fallback_registrar=rogue.url)
        node_credentials(cfg.key_dir, key(7), cloud_cert_bytes)
        agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
        await agent.start()
        try:
            nc = agent.runtime(Role.NC)
            assert nc is not None and nc.registered

            # A rogue is asked within a few retries, if at all (retry delays here are <= 0.1 s).
            with contextlib.suppress(AssertionError):
                await eventually(lambda: bool(rogue.requests), timeout=2)
            await asyncio.sleep(0.3)
            kept = (cfg.key_dir / "node-cert.pem").exists() and (
                cfg.key_dir / "node-pk.pem"
            ).exists()
        finally:
            await agent.stop()
        return kept, rogue


async def test_a_registered_node_refuses_a_rogue_cc_and_keeps_its_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Holds (control): with its cloud-cert.pem intact, the pin sticks."""
    kept, rogue = await _registered_node_meets_rogue(tmp_path, None, caplog)
    assert kept and rogue.requests == []
    assert any("is not signed by our cloud CA" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "damage",
    [
        b"",  # truncated to nothing (a full disk, an interrupted copy by another tool)
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",  # cut short
        CLOUD.root.public_bytes(serialization.Encoding.DER),  # the right CA, but in DER
    ],
    ids=["empty", "truncated-pem", "der-encoded"],
)
async def test_a_registered_node_with_an_unreadable_cloud_cert_stays_pinned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    """HOLE. HeldRoot/load_root turns an unreadable cloud-cert.pem into "no pin" (a log line),
    while the NC is still registered (key presence only checks that the file exists, and a
    node's issuer is cluster-cert.pem). expect() then builds an unpinned Expect: trust on first
    use for a registered component. A rogue CC answering 410 makes it delete its certificate
    and key copy; one handing out a bundle replaces them."""
    kept, rogue = await _registered_node_meets_rogue(tmp_path, damage, caplog)
    assert rogue.requests == [], "a registered node talked to a rogue CC it could not verify"
    assert kept, "a registered node deleted its credentials on a rogue's 410"


async def test_a_registered_walrus_with_an_unreadable_cloud_cert_keeps_its_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HOLE. For a Walrus (CC, SC) an unreadable cloud-cert.pem makes key presence say "not
    registered", and with no token it collects again by trust on first use: a rogue CLC's
    bundle overwrites the genuine certificate, and the rogue's CA becomes the sticky pin."""
    caplog.set_level(logging.INFO, logger="eucareg")
    genuine, rogue_cloud = FakeCloud(), FakeCloud(key=key(9))
    rogue = FakeRegistrar(bundle_reply(rogue_cloud, Role.WALRUS), rogue_cloud)
    url = await rogue.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url)
    held = genuine.bundle(Role.WALRUS, key(1).public_key(), "walrus-00000000aaaa")
    cred.write_credentials(cfg.key_dir, Role.WALRUS, cred.verify_bundle(held, Role.WALRUS, key(1)))
    own = (cfg.key_dir / "walrus-cert.pem").read_bytes()
    (cfg.key_dir / "cloud-cert.pem").write_bytes(b"")  # damaged by someone else's tool
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        with contextlib.suppress(AssertionError):
            await eventually(lambda: bool(rogue.requests), timeout=2)
        await asyncio.sleep(0.3)
    finally:
        await agent.stop()
        await rogue.close()
    assert (cfg.key_dir / "walrus-cert.pem").read_bytes() == own, "a rogue CLC replaced them"
    assert rogue.requests == []


async def test_trust_on_first_use_pins_the_rogue_as_documented(tmp_path: Path) -> None:
    """DOCUMENTED LIMIT (security.md, "Does not stop: trust on first use"): with no token,
    no ca_fingerprint and no cloud-cert.pem, the first CLC to answer wins, and the pin then
    sticks to it; the genuine CLC is refused afterwards, even with a token for the genuine
    cloud once the component holds the rogue's credentials (registered)."""
    genuine, rogue_cloud = FakeCloud(), FakeCloud(key=key(9))
    rogue = FakeRegistrar(bundle_reply(rogue_cloud, Role.WALRUS), rogue_cloud)
    url = await rogue.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url)
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None
        await eventually(lambda: walrus.registered)
        held = certificates.load_cert(cfg.key_dir / "cloud-cert.pem")
        assert certificates.cert_fingerprint(held) == rogue_cloud.fingerprint
        expect = walrus.expect(Endpoint("127.0.0.1", 1, "test-cloud"))
        assert expect.root == held  # stuck to the rogue
        with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
            tls.check_registrar([genuine.cert], expect, datetime.datetime.now(datetime.UTC))
    finally:
        await agent.stop()
        await rogue.close()


@pytest.mark.parametrize("with_token", [False, True])
async def test_a_stale_cloud_cert_refuses_the_new_cloud_until_a_token_says_otherwise(
    tmp_path: Path, with_token: bool
) -> None:
    """Holds (fails closed, as security.md item 3 says): an unregistered Walrus holding an
    old cloud's cloud-cert.pem pins it and refuses the new CLC with a reason; a token for the
    new cloud makes it follow the token's pin instead. (That the token's pin then fails
    against the genuine CLC is hole 1, tested above.)"""
    old, new = FakeCloud(key=key(9)), FakeCloud()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    extra = {"token": f"eucareg1.{'a' * 12}.{'A' * 43}.{new.fingerprint[7:]}"} if with_token else {}
    cfg = make_config(tmp_path, {"walrus": extra})
    cfg.key_dir.mkdir(parents=True, exist_ok=True)
    cred.write_atomic(cfg.key_dir / "cloud-cert.pem", certificates.cert_pem(old.cert).encode())
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None and not walrus.registered
        expect = walrus.expect(Endpoint("10.0.2.66", 8780, "test-cloud", new.fingerprint))
        if with_token:
            assert expect.root is None and expect.pin == new.fingerprint
        else:
            assert expect.root == old.cert
            with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
                tls.check_registrar([new.cert], expect, datetime.datetime.now(datetime.UTC))
    finally:
        await agent.stop()


async def test_a_registered_component_still_asks_the_clc_that_certified_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOLE (lock-out). security.md item 3: once registered, the held cloud-cert.pem is the
    pin. But collect_loop passes the token's (or ca_fingerprint's) pin to candidates(), which
    drops every CLC not announcing that key: a registered Walrus whose token (or config pin)
    names another CA never asks the CLC that certified it, so it never learns it was revoked
    there, and expect() (held root) refuses the only CLC it does ask. (The CLCs are heard at
    10.0.2.x; no connection is made: candidates are recorded, and none is returned.)"""
    held_ca, other = FakeCloud(), FakeCloud(key=key(9))
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    token = f"eucareg1.{'a' * 12}.{'A' * 43}.{other.fingerprint.removeprefix('sha256:')}"
    cfg = make_config(tmp_path, {"walrus": {"token": token}})
    held = held_ca.bundle(Role.WALRUS, key(1).public_key(), "walrus-00000000aaaa")
    cred.write_credentials(cfg.key_dir, Role.WALRUS, cred.verify_bundle(held, Role.WALRUS, key(1)))
    offered: list[list[str]] = []
    real = Registrars.candidates

    def recording(self: Registrars, *args: Any, **kwargs: Any) -> list[Endpoint]:
        offered.append([ep.fingerprint for ep in real(self, *args, **kwargs)])
        return []

    monkeypatch.setattr(Registrars, "candidates", recording)
    mdns = FakeMdns()
    agent = Agent(cfg, backend=mdns, timing=TIMING)
    await agent.start()
    try:
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None and walrus.registered
        mdns.hear(clc_sighting("cloud-clc-00000000c10d", held_ca.fingerprint, "10.0.2.66"))
        mdns.hear(clc_sighting("cloud-clc-00000000beef", other.fingerprint, "10.0.2.67"))
        await eventually(lambda: any(offered_ for offered_ in offered), timeout=5)
        assert any(held_ca.fingerprint in fps for fps in offered), (
            f"the CLC that certified us was never a candidate: {offered[-1]}"
        )
    finally:
        await agent.stop()


# == 5. The registrar's side: client certificates ==============================================


def _client_files(tmp: Path, k: Any, chain: list[x509.Certificate]) -> tls.ClientCert:
    tmp.mkdir(parents=True, exist_ok=True)
    tls.write_chain(tmp / "client.pem", chain)
    cred.write_atomic(tmp / "client-key.pem", keypairs.key_pem(k))
    return tls.ClientCert(
        tmp / "client.pem", tmp / "client-key.pem", format(chain[0].serial_number, "x")
    )


@contextlib.asynccontextmanager
async def who_server(tmp: Path) -> AsyncIterator[str]:
    """A CC registrar of CLOUD that says whom peer_identity finds."""
    await asyncio.to_thread(tmp.mkdir, parents=True, exist_ok=True)
    tls.write_chain(tmp / "server.pem", [CC_CERT, CLOUD.root])
    cred.write_atomic(tmp / "server-key.pem", keypairs.key_pem(CC_KEY))

    async def who(request: web.Request) -> web.Response:
        assert request.transport is not None
        peer = tls.peer_identity(request.transport.get_extra_info("ssl_object"))
        return web.json_response({"peer": str(peer.named) if peer else None})

    app = web.Application()
    app.router.add_get("/", who)
    runner = web.AppRunner(app)
    await runner.setup()
    context = tls.server_context(tmp / "server.pem", tmp / "server-key.pem", client_ca=CLOUD.root)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def ask_who(url: str, client: tls.ClientCert) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=tls.client_context(CC_EXPECT, client)) as response,
    ):
        return await response.json()


async def test_the_cloud_ca_itself_as_a_client_certificate_names_nobody(tmp_path: Path) -> None:
    """Holds: the CLC's own certificate (the CA) is a chain of one: peer_identity says None."""
    async with who_server(tmp_path / "srv") as url:
        assert await ask_who(url, _client_files(tmp_path / "c", CLOUD.key, [CLOUD.root])) == {
            "peer": None
        }
        # A registered CC's own cluster certificate names the CC: fine, it is signed by the CA.
        assert await ask_who(url, _client_files(tmp_path / "d", CC_KEY, [CC_CERT])) == {
            "peer": "cc cc-00000001 of cluster cluster1"
        }


async def test_a_node_of_another_clusters_cc_is_not_certified_for_this_cluster(
    tmp_path: Path,
) -> None:
    """Holds: a node certificate issued by cluster2's CC, announced to cluster1's CC: naming
    cluster2 it is not this CC's business; naming cluster1 (cluster2's CC lying) it is not
    certified, and mode local refuses it; nothing is stored either way."""
    peer = {"remote": "10.77.0.2"}
    async with (
        served(
            tmp_path / "cc", CC_SETTINGS, middlewares=(from_lan(peer),), tls_dir=tmp_path / "tls"
        ) as cc,
        aiohttp.ClientSession() as session,
    ):
        cc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        cloud = cc.cloud
        cc2_key = fresh_key()
        cc2 = certificates.issue_certificate(
            issuer_key=cloud.key,
            issuer_cert=cloud.issuer.cert,
            subject_key=cc2_key.public_key(),
            role=Role.CC,
            component_id="cc-0000000000c2",
            cluster="cluster2",
        )
        endpoint = Endpoint("127.0.0.1", cc.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=cloud.issuer.cert)
        for cluster in ("cluster2", "cluster1"):
            node = ann(Role.NC, cluster)
            peer["remote"] = str(node.address)
            cert = certificates.issue_certificate(
                issuer_key=cc2_key,
                issuer_cert=cc2,
                subject_key=key_of(node).public_key(),
                role=Role.NC,
                component_id=node.component_id,
                cluster=cluster,
            )
            client = _client_files(tmp_path / cluster, key_of(node), [cert, cc2])
            status, answer = await agent_collect._signed_post(
                session,
                endpoint,
                "/v1/announce",
                key_of(node),
                {"txt": dict(sighting(node).txt)},
                expect,
                client,
            )
            assert status < 500, answer
            assert answer.get("status") in ("ignored", "refused"), answer
            assert cc.registrar.record(node.component_id) is None


async def test_a_crafted_client_certificate_gets_a_refusal_not_a_500(tmp_path: Path) -> None:
    """HOLE (insider). peer_identity calls cert_identity on an OpenSSL-verified chain; a
    registered CC can sign a node certificate whose SAN holds an ediPartyName. OpenSSL verifies
    it; cert_identity raises UnsupportedGeneralNameType; the announce handler answers 500
    (the issue wants 0 responses of 5xx)."""
    peer = {"remote": "10.77.0.2"}
    async with (
        served(
            tmp_path / "cc", CC_SETTINGS, middlewares=(from_lan(peer),), tls_dir=tmp_path / "tls"
        ) as cc,
        aiohttp.ClientSession() as session,
    ):
        cloud = cc.cloud
        cc1_key = fresh_key()
        cc1 = certificates.issue_certificate(
            issuer_key=cloud.key,
            issuer_cert=cloud.issuer.cert,
            subject_key=cc1_key.public_key(),
            role=Role.CC,
            component_id="cc-0000000000c1",
            cluster="cluster1",
        )
        node = ann(Role.NC, "cluster1")
        peer["remote"] = str(node.address)
        uri = names.identity_uri(Role.NC, "cluster1", node.component_id)
        cert = build(
            key_of(node),
            cc1_key,
            subject=name(f"node cluster1 {node.component_id}", "node"),
            issuer=cc1.subject,
            raw_san=san_with_edi_party(uri),
        )
        client = _client_files(tmp_path / "n", key_of(node), [cert, cc1])
        endpoint = Endpoint("127.0.0.1", cc.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=cloud.issuer.cert)
        cc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        status, answer = await agent_collect._signed_post(
            session,
            endpoint,
            "/v1/announce",
            key_of(node),
            {"txt": dict(sighting(node).txt)},
            expect,
            client,
        )
        assert status < 500, answer


# == 6. The operator socket and the CLI ========================================================


async def test_the_operator_socket_is_private(clc_agent: Agent) -> None:
    """Holds: api.sock is a socket, 0600, in a 0700 state_dir owned by the agent."""
    assert clc_agent.service is not None
    path = clc_agent.service.socket_path
    info = os.lstat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(clc_agent.config.state_dir).st_mode) == 0o700
    token = (clc_agent.config.state_dir / "admin.token").read_text().strip()
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://localhost/v1/trust") as response:
            assert response.status == 401  # the socket alone is not enough
        async with session.get(
            "http://localhost/v1/trust", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200


@contextlib.asynccontextmanager
async def an_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: Path | None = None
) -> AsyncIterator[Agent]:
    loopback_only(monkeypatch)
    state = state or tmp_path / "state"
    seed_identity(state, Role.CLC, "clc-00000000c10d", key(4))
    cfg = make_config(tmp_path, {"clc": {}}, state_dir=str(state))
    agent = Agent(dataclasses.replace(cfg, api_port=0), backend=FakeMdns(), timing=TIMING)
    try:
        await agent.start()
        yield agent
    finally:
        with contextlib.suppress(Exception):
            await agent.stop()


async def test_a_stale_socket_file_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holds: a socket file left by a killed agent does not stop the next one."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(state / "api.sock"))
    stale.close()
    async with an_agent(tmp_path, monkeypatch) as agent:
        assert agent.service is not None
        assert stat.S_ISSOCK(os.lstat(agent.service.socket_path).st_mode)


async def test_a_symlink_at_the_socket_path_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holds if the target is left alone and the agent either serves a fresh socket at the
    path or refuses to start with a reason naming it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, state / "api.sock")
    try:
        async with an_agent(tmp_path, monkeypatch) as agent:
            assert agent.service is not None
            assert stat.S_ISSOCK(os.lstat(agent.service.socket_path).st_mode)
    except OSError as exc:
        assert "api.sock" in str(exc)
    assert target.read_text() == "keep me"


async def test_a_too_long_socket_path_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holds: the agent says why instead of binding a truncated path."""
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    with pytest.raises(OSError, match="too long for a Unix socket"):
        async with an_agent(tmp_path, monkeypatch, state=deep):
            pass


async def test_a_second_agent_does_not_steal_the_running_agents_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second agent started on the same state_dir (a double start by an init system, an
    operator running `eucareg agent` by hand) must not take the running agent's operator
    socket: asyncio's create_unix_server unlinks any existing socket file before binding."""
    async with an_agent(tmp_path, monkeypatch) as first:
        assert first.service is not None
        path = first.service.socket_path
        before = os.lstat(path).st_ino
        second = Agent(first.config, backend=FakeMdns(), timing=TIMING)
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(second.start(), 15)
        finally:
            with contextlib.suppress(Exception):
                await second.stop()
        assert _inode(path) == before, (
            "the running agent's operator socket was replaced (or removed)"
        )


async def test_the_cli_does_not_hand_the_admin_token_to_whoever_listens_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOLE (attacker 5, a local unprivileged user). docs/cli.md allows --api
    http(s)://127.0.0.1:PORT and says "the connection never leaves the host"; but any local
    user can listen on a loopback port above 1024 while the agent is down or restarting (the
    API port is 8780), and over https the CLI uses ssl=False. The admin token goes to them."""
    from eucareg.cli import client as cli_client

    monkeypatch.setattr(cli_client, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"mode": "local"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # an unprivileged local process could do this
    await site.start()
    port = runner.addresses[0][1]
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-admin-token\n")
    try:
        runner_cli = CliRunner(env={"EUCAREG_API": None, "EUCAREG_ADMIN_TOKEN_FILE": None})
        await asyncio.to_thread(
            runner_cli.invoke,
            cli_main,
            ["trust", "--api", f"http://127.0.0.1:{port}", "--admin-token-file", str(token_file)],
        )
    finally:
        await runner.cleanup()
    assert not any("s3cret-admin-token" in h for h in seen), "the admin token was handed over"


def _inode(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None
