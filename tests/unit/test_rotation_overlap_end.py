"""The end of a CA handover in a running CLC: during the overlap its TLS server accepts client
certificates of the old CA (components not moved yet); once the overlap ends it refuses them
without a restart, and serves its chain without the cross-certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from eucareg.agent.host import Agent
from eucareg.agent.rotation import MIN_OVERLAP, rotate
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred
from tests.unit.test_agent_fakes import FakeMdns, key, make_config, seed_identity
from tests.unit.test_attack_tls import TIMING, loopback_only
from tests.unit.test_rotation_handover import issue

CLC_ID = "clc-00000000c10d"
LEFT = 6.0  # seconds of overlap left when the agent starts


async def handshake(url: str, expect: tls.Expect, client: tls.ClientCert) -> int:
    """The status of one request with `client`'s certificate on a fresh connection."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, ssl=tls.client_context(expect, client)) as response,
    ):
        return response.status


def client_files(tmp: Path, own: keypairs.PrivateKey, cert: x509.Certificate) -> tls.ClientCert:
    name = format(cert.serial_number, "x")  # client contexts are cached by this value
    tls.write_chain(tmp / f"{name}.pem", [cert])
    cred.write_atomic(tmp / f"{name}-key.pem", keypairs.key_pem(own))
    return tls.ClientCert(tmp / f"{name}.pem", tmp / f"{name}-key.pem", name)


async def test_old_ca_client_certificates_are_refused_once_the_overlap_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loopback_only(monkeypatch)
    state = tmp_path / "state"
    seed_identity(state, Role.CLC, CLC_ID, key(4))
    cfg = dataclasses.replace(make_config(tmp_path, {"clc": {}}), api_port=0)
    first = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await first.start()
    await first.stop()
    old_cert = certificates.load_cert(cfg.key_dir / cred.CLOUD_CERT)
    old_key = key(4)
    # A rotation made (MIN_OVERLAP - LEFT) seconds ago: LEFT seconds of its overlap remain.
    made = time.time() - (MIN_OVERLAP - LEFT)
    rotated = await asyncio.to_thread(rotate, state, cfg.key_dir, MIN_OVERLAP, made)
    new_cert = certificates.load_cert(cfg.key_dir / cred.CLOUD_CERT)
    assert (
        certificates.cert_fingerprint(new_cert)
        == rotated.new_fingerprint
        != rotated.old_fingerprint
    )
    # A Walrus still holding a certificate of the old CA.
    own, walrus = issue(old_key, old_cert, Role.WALRUS, "walrus-00000000000a")
    client = client_files(tmp_path, own, walrus)

    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        assert agent.service is not None
        url = f"https://127.0.0.1:{agent.service.port}/v1/health"
        expect = tls.Expect(Role.CLC, component_id=CLC_ID, root=new_cert)
        assert time.time() < rotated.overlap_ends - 1, "the test machine is too slow"
        assert await handshake(url, expect, client) == 200  # during the overlap
        # After it: refused, by the same running agent, within a few seconds of the end.
        deadline = rotated.overlap_ends + 15
        while True:
            try:
                await handshake(url, expect, client)
            except aiohttp.ClientError:
                break
            assert time.time() < deadline, "an old-CA certificate is still accepted"
            await asyncio.sleep(0.2)
        assert time.time() >= rotated.overlap_ends  # not before the end
        # A component of the new CA is still served, and the chain no longer holds the cross.
        own_new, walrus_new = issue(
            keypairs.load_key(state / "identity" / "clc.key.pem"),
            new_cert,
            Role.WALRUS,
            "walrus-00000000000b",
        )
        assert await handshake(url, expect, client_files(tmp_path, own_new, walrus_new)) == 200
        chain = (cfg.state_dir / "tls" / "clc.pem").read_text()
        assert chain.count("BEGIN CERTIFICATE") == 1
    finally:
        await agent.stop()
