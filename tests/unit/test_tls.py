"""The TLS check a component makes of its registrar, over real TLS on loopback: the pinned CA,
the role, cluster and id named, chains through a cluster CA refused, trust on first use."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs, names, tls
from eucareg.pki import credentials as cred
from tests.factories import fresh_key


@dataclass
class Cloud:
    key: keypairs.PrivateKey
    root: x509.Certificate

    def issue(self, role: Role, cid: str, cluster: str | None = None) -> tuple:
        return signed_by(self.key, self.root, role, cid, cluster)


def signed_by(
    issuer_key: keypairs.PrivateKey,
    issuer: x509.Certificate,
    role: Role,
    cid: str,
    cluster: str | None = None,
) -> tuple[keypairs.PrivateKey, x509.Certificate]:
    """A fresh key and a certificate for it, naming (role, cluster, cid), signed by `issuer`."""
    key = fresh_key()
    cert = certificates.issue_certificate(
        issuer_key=issuer_key,
        issuer_cert=issuer,
        subject_key=key.public_key(),
        role=role,
        component_id=cid,
        cluster=cluster,
    )
    return key, cert


def make_cloud(name: str = "clc-00000001") -> Cloud:
    key = fresh_key()
    return Cloud(key, certificates.create_cloud_ca(key, name))


CLOUD = make_cloud()
CC_KEY, CC_CERT = CLOUD.issue(Role.CC, "cc-00000001", "cluster1")


async def serve(
    tmp: Path, key: keypairs.PrivateKey, chain: list[x509.Certificate]
) -> AsyncIterator:
    chain_file, key_file = tmp / "chain.pem", tmp / "key.pem"
    tls.write_chain(chain_file, chain)
    cred.write_atomic(key_file, keypairs.key_pem(key))

    async def hello(_: web.Request) -> web.Response:
        return web.json_response({"hello": 1})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(chain_file, key_file))
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@pytest.fixture
async def cc_url(tmp_path: Path) -> AsyncIterator[str]:
    async for url in serve(tmp_path, CC_KEY, [CC_CERT, CLOUD.root]):
        yield url


async def get(url: str, expect: tls.Expect) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=tls.client_context(expect)) as response,
    ):
        return await response.json()


CC_EXPECT = tls.Expect(Role.CC, "cluster1", "cc-00000001", root=CLOUD.root)


async def test_the_genuine_cc_is_accepted_by_held_root_and_by_pin(cc_url: str) -> None:
    assert await get(cc_url, CC_EXPECT) == {"hello": 1}
    by_pin = replace(CC_EXPECT, root=None, pin=certificates.cert_fingerprint(CLOUD.root))
    assert await get(cc_url, by_pin) == {"hello": 1}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"root": make_cloud().root}, "not signed by our cloud CA"),
        ({"root": None, "pin": "sha256:" + "0" * 64}, "does not show the cloud CA we pin"),
        ({"cluster": "cluster2"}, "names cc cc-00000001 of cluster cluster1"),
        ({"component_id": "cc-99999999"}, "but cc-99999999 announced"),
        ({"role": Role.CLC, "cluster": None}, "not a clc"),
    ],
)
async def test_a_registrar_we_do_not_expect_fails_the_handshake(
    cc_url: str, change: dict, reason: str
) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
        await get(cc_url, replace(CC_EXPECT, **change))
    assert reason in str(caught.value.certificate_error)


async def test_a_cc_of_another_cluster_cannot_vouch_for_a_registrar(tmp_path: Path) -> None:
    """Every CC's certificate is a CA: a registered CC of cluster2 signs itself a certificate
    naming the CC of cluster1. The chain verifies in OpenSSL's eyes; ours refuses it."""
    rogue_key, rogue_cc = CLOUD.issue(Role.CC, "cc-00000002", "cluster2")
    fake_key, fake = signed_by(rogue_key, rogue_cc, Role.CC, "cc-00000001", "cluster1")
    async for url in serve(tmp_path, fake_key, [fake, rogue_cc, CLOUD.root]):
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
            await get(url, CC_EXPECT)
        assert "not signed by our cloud CA" in str(caught.value.certificate_error)


async def test_unpinned_first_contact_checks_the_role_only(cc_url: str) -> None:
    unpinned = tls.Expect(Role.CC, "cluster1")
    assert await get(cc_url, unpinned) == {"hello": 1}
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get(cc_url, tls.Expect(Role.CLC))


async def test_a_plain_http_server_is_not_a_registrar() -> None:
    async def hello(_: web.Request) -> web.Response:
        return web.json_response({"status": "revoked"}, status=410)

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/"
        with pytest.raises(aiohttp.ClientSSLError):
            await get(url, CC_EXPECT)
    finally:
        await runner.cleanup()


def test_check_registrar_refuses_expired_and_empty() -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=6 * 365)
    with pytest.raises(tls.UntrustedRegistrar, match="not valid now"):
        tls.check_registrar([CC_CERT], CC_EXPECT, later)
    with pytest.raises(tls.UntrustedRegistrar, match="no certificate"):
        tls.check_registrar([], CC_EXPECT, later)


def test_cert_identity_reads_san_and_old_subjects() -> None:
    assert names.cert_identity(CC_CERT) == names.CertIdentity(Role.CC, "cluster1", "cc-00000001")
    # The cloud CA certifies the CLC's own key and names it: the CLC serves TLS with it.
    assert names.cert_identity(CLOUD.root) == names.CertIdentity(Role.CLC, None, "clc-00000001")


def test_load_root(tmp_path: Path) -> None:
    assert tls.load_root(tmp_path / "none.pem") is None
    (tmp_path / "junk.pem").write_text("junk")
    assert tls.load_root(tmp_path / "junk.pem") is None
    tls.write_chain(tmp_path / "cc.pem", [CC_CERT])
    assert tls.load_root(tmp_path / "cc.pem") is None  # not self-signed
    tls.write_chain(tmp_path / "root.pem", [CLOUD.root])
    loaded = tls.load_root(tmp_path / "root.pem")
    assert loaded is not None and loaded.serial_number == CLOUD.root.serial_number


def test_client_context_never_falls_back_to_openssl_defaults() -> None:
    ctx = tls.client_context(CC_EXPECT)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert getattr(ctx, tls.ATTRIBUTE) is CC_EXPECT


# -- client certificates ------------------------------------------------------------------------


async def whoami(tmp: Path, client: tls.ClientCert | None) -> dict:
    """Ask a CC registrar (which accepts client certificates of CLOUD) who we proved to be."""
    chain_file, key_file = tmp / "server.pem", tmp / "server-key.pem"
    tls.write_chain(chain_file, [CC_CERT, CLOUD.root])
    cred.write_atomic(key_file, keypairs.key_pem(CC_KEY))

    async def who(request: web.Request) -> web.Response:
        assert request.transport is not None
        peer = tls.peer_identity(request.transport.get_extra_info("ssl_object"))
        return web.json_response({"peer": str(peer.named) if peer else None})

    app = web.Application()
    app.router.add_get("/", who)
    runner = web.AppRunner(app)
    await runner.setup()
    context = tls.server_context(chain_file, key_file, client_ca=CLOUD.root)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=tls.client_context(CC_EXPECT, client)) as response,
        ):
            return await response.json()
    finally:
        await runner.cleanup()


def client_files(
    tmp: Path, key: keypairs.PrivateKey, chain: list[x509.Certificate]
) -> tls.ClientCert:
    tls.write_chain(tmp / "client.pem", chain)
    cred.write_atomic(tmp / "client-key.pem", keypairs.key_pem(key))
    return tls.ClientCert(
        tmp / "client.pem", tmp / "client-key.pem", format(chain[0].serial_number, "x")
    )


def node_of(cc_key: keypairs.PrivateKey, cc_cert: x509.Certificate, cluster: str) -> tuple:
    return signed_by(cc_key, cc_cert, Role.NC, "nc-000000000001", cluster)


async def test_a_registered_node_proves_itself_with_its_certificate(tmp_path: Path) -> None:
    key, cert = node_of(CC_KEY, CC_CERT, "cluster1")
    answer = await whoami(tmp_path, client_files(tmp_path, key, [cert, CC_CERT]))
    assert answer == {"peer": "nc nc-000000000001 of cluster cluster1"}
    walrus_key, walrus = CLOUD.issue(Role.WALRUS, "walrus-00000001")
    answer = await whoami(tmp_path, client_files(tmp_path, walrus_key, [walrus]))
    assert answer == {"peer": "walrus walrus-00000001"}
    assert await whoami(tmp_path, None) == {"peer": None}


async def test_a_cc_cannot_vouch_for_nodes_of_another_cluster(tmp_path: Path) -> None:
    other_key, other_cc = CLOUD.issue(Role.CC, "cc-00000002", "cluster2")
    key, cert = node_of(other_key, other_cc, "cluster1")  # cluster2's CC names a cluster1 NC
    answer = await whoami(tmp_path, client_files(tmp_path, key, [cert, other_cc]))
    assert answer == {"peer": None}
    # Nor for anything but nodes: a "walrus" signed by a CC names nobody.
    fake_key, fake = signed_by(CC_KEY, CC_CERT, Role.WALRUS, "walrus-00000009")
    assert await whoami(tmp_path, client_files(tmp_path, fake_key, [fake, CC_CERT])) == {
        "peer": None
    }


async def test_a_client_certificate_of_another_cloud_fails_the_handshake(tmp_path: Path) -> None:
    stranger = make_cloud()
    key, cert = stranger.issue(Role.WALRUS, "walrus-00000003")
    with pytest.raises(aiohttp.ClientError):
        await whoami(tmp_path, client_files(tmp_path, key, [cert]))


async def test_small_read_buffers_still_carry_a_full_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent shrinks asyncio's TLS read buffer (a thousand long-polls held 250 MiB of
    them); a body of the API's largest size still arrives whole, both ways."""
    import asyncio.sslproto

    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", 256 * 1024)
    tls.shrink_read_buffers()
    assert asyncio.sslproto.SSLProtocol.max_size == tls.TLS_READ_BUFFER

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    chain_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    tls.write_chain(chain_file, [CC_CERT, CLOUD.root])
    cred.write_atomic(key_file, keypairs.key_pem(CC_KEY))
    app = web.Application(client_max_size=128 * 1024)
    app.router.add_post("/", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(chain_file, key_file))
    await site.start()
    body = bytes(range(256)) * 256  # 64 KiB
    try:
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, ssl=tls.client_context(CC_EXPECT)) as response,
        ):
            assert await response.read() == body
    finally:
        await runner.cleanup()
