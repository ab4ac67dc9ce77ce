"""The handover from one cloud CA key to the next (`eucareg ca rotate`): what a component accepts
as the old key's word, in a bundle (collect._accept) and in the TLS handshake over loopback
(tls.check_registrar), and what a registrar still accepts from components not moved yet.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from eucareg.agent import collect
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.core.model import Role
from eucareg.pki import certificates, handover, keypairs, tls
from eucareg.pki import credentials as cred
from tests.factories import fresh_key

CLC_ID = "clc-00000000000a"
DAY = 86400.0


@dataclass
class Rotated:
    old_key: keypairs.PrivateKey
    old: x509.Certificate
    new_key: keypairs.PrivateKey
    new: x509.Certificate
    cross: x509.Certificate

    @property
    def passed(self) -> handover.Handover:
        return handover.Handover(self.cross, self.old)


def rotated(overlap: float = 30 * DAY, now: float | None = None) -> Rotated:
    now = time.time() if now is None else now
    old_key, new_key = fresh_key(), fresh_key()
    old = certificates.create_cloud_ca(old_key, CLC_ID, now=now - DAY)
    new = handover.successor(new_key, old, now)
    return Rotated(old_key, old, new_key, new, handover.make_cross(old_key, old, new, now, overlap))


def forged(r: Rotated, signer: keypairs.PrivateKey) -> x509.Certificate:
    """A cross-certificate for r's new key under the right names, signed by `signer`."""
    return handover.make_cross(signer, r.old, r.new, time.time(), DAY)


R = rotated()


def issue(
    key: keypairs.PrivateKey,
    issuer: x509.Certificate,
    role: Role,
    cid: str,
    cluster: str | None = None,
) -> tuple[keypairs.PrivateKey, x509.Certificate]:
    own = fresh_key()
    cert = certificates.issue_certificate(
        issuer_key=key,
        issuer_cert=issuer,
        subject_key=own.public_key(),
        role=role,
        component_id=cid,
        cluster=cluster,
    )
    return own, cert


# -- the handover itself -----------------------------------------------------------------------


def test_a_genuine_handover_verifies_and_says_from_and_to() -> None:
    h = handover.parse(R.passed.pem())
    handover.verify(h, certificates.cert_fingerprint(R.old), R.new, time.time())
    assert h.old_fingerprint == certificates.cert_fingerprint(R.old)
    assert h.new_fingerprint == certificates.cert_fingerprint(R.new)
    assert R.new.subject == R.old.subject  # the same CLC, by name
    assert 29 * DAY < h.ends - time.time() <= 30 * DAY


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: handover.Handover(forged(R, fresh_key()), R.old), "not a CLC CA certificate"),
        (lambda: handover.Handover(R.cross, rotated().old), "hands over from CA"),
        (lambda: handover.Handover(rotated().cross, R.old), "hands over from CA|not a CLC CA"),
        (
            lambda: handover.Handover(
                handover.make_cross(R.old_key, R.old, R.new, time.time() - 700, 600), R.old
            ),
            "ended",
        ),
    ],
    ids=["forged-signature", "another-old-ca", "another-new-key", "ended"],
)
def test_a_handover_not_from_the_key_we_trust_to_this_one_is_refused(make, reason: str) -> None:
    with pytest.raises(keypairs.CredentialError, match=reason):
        handover.verify(make(), certificates.cert_fingerprint(R.old), R.new, time.time())


def test_a_handover_to_another_key_than_offered_is_refused() -> None:
    other = rotated()
    # Genuinely signed by the old key we trust, but for another new key than the bundle's.
    cross = handover.make_cross(R.old_key, R.old, other.new, time.time(), DAY)
    with pytest.raises(keypairs.CredentialError, match="not the one offered"):
        handover.verify(
            handover.Handover(cross, R.old), certificates.cert_fingerprint(R.old), R.new, 0.0
        )


def test_a_cc_certificate_is_never_a_cross_certificate() -> None:
    """Every CC's certificate is a CA signed by the cloud CA: it must not hand the CA over."""
    _, cc = issue(R.old_key, R.old, Role.CC, "cc-00000000000a", "c1")
    assert not handover.is_cross(cc)
    assert handover.is_cross(R.cross)


@pytest.mark.parametrize("data", ["", "junk", "x" * 20000])
def test_an_unreadable_handover_is_refused_by_name(data: str) -> None:
    with pytest.raises(keypairs.CredentialError, match=handover.HANDOVER):
        handover.parse(data)
    three = R.passed.pem() + certificates.cert_pem(R.new)
    with pytest.raises(keypairs.CredentialError, match="holds 3 certificates"):
        handover.parse(three)


# -- the agent moving its pin (collect._accept) ------------------------------------------------


def walrus_bundle(r: Rotated, key: keypairs.PrivateKey, signer: str = "new") -> dict[str, str]:
    ca_key, ca = (r.new_key, r.new) if signer == "new" else (r.old_key, r.old)
    cert = certificates.issue_certificate(
        issuer_key=ca_key,
        issuer_cert=ca,
        subject_key=key.public_key(),
        role=Role.WALRUS,
        component_id="walrus-00000000000a",
        cluster=None,
    )
    return {
        cred.CLOUD_CERT: certificates.cert_pem(ca),
        "walrus-cert.pem": certificates.cert_pem(cert),
    }


@pytest.fixture
def walrus(tmp_path: Path) -> tuple[Identity, Path, str]:
    """A Walrus registered under R's old CA: its identity, key_dir and certificate serial."""
    key = fresh_key()
    ident = Identity("walrus-00000000000a", key, keypairs.fingerprint(key.public_key()))
    key_dir = tmp_path / "keys"
    first = walrus_bundle(R, key, signer="old")
    collect._accept(first, Role.WALRUS, ident, ENDPOINT, key_dir, None, OLD_FP, None)
    serial = format(certificates.load_cert(key_dir / "walrus-cert.pem").serial_number, "x")
    return ident, key_dir, serial


ENDPOINT = Endpoint("10.0.0.1", 8780, CLC_ID)
OLD_FP = certificates.cert_fingerprint(R.old)


def test_an_agent_pinning_the_old_key_moves_only_through_a_valid_handover(
    walrus: tuple[Identity, Path, str],
) -> None:
    ident, key_dir, have = walrus
    held = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    bundle = walrus_bundle(R, ident.key)
    # Without a handover, the new CA is another CA: refused, nothing touched.
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, OLD_FP, None)
    # A forged one (right names, another signer), or one from another old CA: the same.
    for bad in (handover.Handover(forged(R, fresh_key()), R.old), rotated().passed):
        with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
            collect._accept(
                {**bundle, handover.HANDOVER: bad.pem()},
                Role.WALRUS,
                ident,
                ENDPOINT,
                key_dir,
                have,
                OLD_FP,
                None,
            )
    assert {p.name: p.read_bytes() for p in key_dir.iterdir()} == held
    # The genuine one: the pin moves (cloud-cert.pem is the new CA), in place.
    genuine = {**bundle, handover.HANDOVER: R.passed.pem()}
    outcome = collect._accept(genuine, Role.WALRUS, ident, ENDPOINT, key_dir, have, OLD_FP, None)
    assert outcome is collect.Outcome.RENEWED
    assert certificates.cert_fingerprint(
        certificates.load_cert(key_dir / cred.CLOUD_CERT)
    ) == certificates.cert_fingerprint(R.new)
    assert (key_dir / handover.HANDOVER).read_text() == R.passed.pem()
    assert cred.credentials_present(key_dir, Role.WALRUS, ident.key)
    # From now on, the old CA's bundles are the rogue ones (no way back).
    new_fp = certificates.cert_fingerprint(R.new)
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(
            walrus_bundle(R, ident.key, signer="old"),
            Role.WALRUS,
            ident,
            ENDPOINT,
            key_dir,
            have,
            new_fp,
            None,
        )


def test_a_joining_agent_with_an_old_pin_is_moved_by_the_handover(tmp_path: Path) -> None:
    key = fresh_key()
    ident = Identity("walrus-00000000000a", key, keypairs.fingerprint(key.public_key()))
    bundle = {**walrus_bundle(R, key), handover.HANDOVER: R.passed.pem()}
    key_dir = tmp_path / "keys"
    outcome = collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, None, OLD_FP, None)
    assert outcome is collect.Outcome.WRITTEN
    assert (key_dir / cred.CLOUD_CERT).read_text() == certificates.cert_pem(R.new)


def test_an_ended_handover_moves_nobody(walrus: tuple[Identity, Path, str]) -> None:
    ident, key_dir, have = walrus
    ended = rotated(overlap=600, now=time.time() - 700)
    old_fp = certificates.cert_fingerprint(ended.old)
    bundle = {**walrus_bundle(ended, ident.key), handover.HANDOVER: ended.passed.pem()}
    with pytest.raises(keypairs.CredentialError, match="refusing a rogue registrar"):
        collect._accept(bundle, Role.WALRUS, ident, ENDPOINT, key_dir, have, old_fp, None)


# -- the TLS handshake, over loopback ----------------------------------------------------------


async def serve(
    tmp: Path,
    key: keypairs.PrivateKey,
    chain: list[x509.Certificate],
    client_ca: x509.Certificate | None = None,
    also_trusted: x509.Certificate | None = None,
) -> AsyncIterator[str]:
    chain_file, key_file = tmp / "chain.pem", tmp / "key.pem"
    tls.write_chain(chain_file, chain)
    cred.write_atomic(key_file, keypairs.key_pem(key))

    async def who(request: web.Request) -> web.Response:
        assert request.transport is not None
        peer = tls.peer_identity(request.transport.get_extra_info("ssl_object"))
        return web.json_response({"peer": str(peer.named) if peer else None})

    app = web.Application()
    app.router.add_get("/", who)
    runner = web.AppRunner(app)
    await runner.setup()
    context = tls.server_context(chain_file, key_file, client_ca, also_trusted)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def get(url: str, expect: tls.Expect, client: tls.ClientCert | None = None) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=tls.client_context(expect, client)) as response,
    ):
        return await response.json()


def clc_expect(**kw: object) -> tls.Expect:
    return tls.Expect(Role.CLC, component_id=CLC_ID, **kw)  # type: ignore[arg-type]


async def test_the_rotated_clc_is_accepted_through_the_handover_in_its_chain(
    tmp_path: Path,
) -> None:
    async for url in serve(tmp_path, R.new_key, [R.new, R.cross, R.old]):
        for expect in (
            clc_expect(root=R.old),  # registered before the rotation
            clc_expect(pin=OLD_FP),  # joining with an old token or ca_fingerprint
            clc_expect(root=R.new),  # moved already
            clc_expect(pin=certificates.cert_fingerprint(R.new)),
        ):
            assert await get(url, expect) == {"peer": None}


async def test_without_the_handover_the_rotated_clc_is_a_stranger(tmp_path: Path) -> None:
    async for url in serve(tmp_path, R.new_key, [R.new]):
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
            await get(url, clc_expect(root=R.old))
        assert "not signed by our cloud CA" in str(caught.value.certificate_error)


@pytest.mark.parametrize(
    "cross",
    [
        lambda: forged(R, fresh_key()),  # the right names, another signer
        lambda: rotated(overlap=600, now=time.time() - 700).cross,  # an ended one
        lambda: handover.make_cross(R.old_key, R.old, rotated().new, time.time(), DAY),
    ],
    ids=["forged", "ended", "for-another-key"],
)
async def test_a_chain_with_a_bad_cross_certificate_is_refused(tmp_path: Path, cross) -> None:
    async for url in serve(tmp_path, R.new_key, [R.new, cross(), R.old]):
        for expect in (clc_expect(root=R.old), clc_expect(pin=OLD_FP)):
            with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
                await get(url, expect)
            assert "not signed by our cloud CA" in str(caught.value.certificate_error)


async def test_a_cc_certificate_cannot_hand_the_cloud_over(tmp_path: Path) -> None:
    """A registered CC (a CA signed by the pinned key) makes itself a 'CLC' certificate and
    puts its own certificate where a cross-certificate would be: refused."""
    cc_key, cc = issue(R.old_key, R.old, Role.CC, "cc-00000000000a", "c1")
    fake = certificates.create_cloud_ca_named(cc_key, R.old.subject)
    async for url in serve(tmp_path, cc_key, [fake, cc, R.old]):
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(url, clc_expect(root=R.old))


def files(tmp: Path, key: keypairs.PrivateKey, chain: list[x509.Certificate]) -> tls.ClientCert:
    tls.write_chain(tmp / "client.pem", chain)
    cred.write_atomic(tmp / "client-key.pem", keypairs.key_pem(key))
    # (client contexts are cached by this value: the serial tells two chains apart)
    serial = "-".join(format(c.serial_number, "x") for c in chain)
    return tls.ClientCert(tmp / "client.pem", tmp / "client-key.pem", serial)


async def test_a_moved_cc_serves_nodes_that_pin_the_old_key_and_both_kinds_of_node(
    tmp_path: Path,
) -> None:
    """The CC's certificate re-issued under the new key (same CC key), with the handover in its
    chain: an NC holding the old CA accepts it; the CC accepts the client certificates of
    nodes still chained to its old certificate and of those chained to its new one."""
    cc_key = fresh_key()
    old_cc = certificates.issue_certificate(
        issuer_key=R.old_key,
        issuer_cert=R.old,
        subject_key=cc_key.public_key(),
        role=Role.CC,
        component_id="cc-00000000000a",
        cluster="c1",
    )
    new_cc = certificates.issue_certificate(
        issuer_key=R.new_key,
        issuer_cert=R.new,
        subject_key=cc_key.public_key(),
        role=Role.CC,
        component_id="cc-00000000000a",
        cluster="c1",
    )
    nc_key, nc = issue(cc_key, new_cc, Role.NC, "nc-00000000000a", "c1")
    expect = tls.Expect(Role.CC, "c1", "cc-00000000000a", root=R.old)
    chain = [new_cc, R.new, R.cross, R.old]
    async for url in serve(tmp_path, cc_key, chain, client_ca=R.new, also_trusted=R.old):
        for above in (old_cc, new_cc):
            answer = await get(url, expect, files(tmp_path, nc_key, [nc, above]))
            assert answer == {"peer": "nc nc-00000000000a of cluster c1"}
        # A node of another cloud is still refused.
        stranger = rotated()
        s_key, s_cc = issue(stranger.new_key, stranger.new, Role.CC, "cc-00000000000a", "c1")
        x_key, x_nc = issue(s_key, s_cc, Role.NC, "nc-00000000000a", "c1")
        with pytest.raises(aiohttp.ClientError):
            await get(url, expect, files(tmp_path, x_key, [x_nc, s_cc]))
    # Once the handover has ended, the old CA's certificates are refused.
    async for url in serve(tmp_path, cc_key, [new_cc, R.new], client_ca=R.new):
        moved = tls.Expect(Role.CC, "c1", "cc-00000000000a", root=R.new)
        with pytest.raises(aiohttp.ClientError):
            await get(url, moved, files(tmp_path, nc_key, [nc, old_cc]))


def test_check_registrar_refuses_the_cross_certificate_once_it_ended() -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=31)
    with pytest.raises(tls.UntrustedRegistrar, match="not signed by our cloud CA"):
        tls.check_registrar([R.new, R.cross, R.old], clc_expect(root=R.old), later)
