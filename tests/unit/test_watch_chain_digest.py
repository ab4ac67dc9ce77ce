"""The chain digest a component sends with its watch (`chain`, pki/chain.py): an agent
collecting over real TLS from a real registrar keeps the digest of the chain it accepted,
sends it back, gets a changed chain at once even when the answer that carried it was lost,
and watches without it when an older registrar refuses the field.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from eucareg.agent import collect
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs, names, tls
from eucareg.pki.chain import chain_digest
from eucareg.pki.handover import HANDOVER
from tests.factories import ann
from tests.unit.test_agent_fakes import FakeCloud, FakeRegistrar, bundle_reply, json_reply
from tests.unit.test_api_harness import CLC_SETTINGS, CLOUD_CLC_ID, key_of, served


async def test_the_agent_sends_the_chain_it_holds_and_hears_of_a_change_it_missed(
    tmp_path: Path,
) -> None:
    key_dir = tmp_path / "keys"
    async with served(tmp_path / "clc", CLC_SETTINGS, tls_dir=tmp_path / "tls") as clc:
        clc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        await clc.registrar.open_install_window(600)
        walrus = ann(Role.WALRUS)
        clc.announce(walrus)
        await clc.record_status(walrus.component_id, "awaiting-key")
        identity = Identity(walrus.component_id, key_of(walrus), walrus.fingerprint)
        endpoint = Endpoint("127.0.0.1", clc.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=clc.cloud.issuer.cert)
        named = names.CertIdentity(Role.WALRUS, None, walrus.component_id)
        held = collect.HeldChain()

        async def ask(wait: float, have: str | None) -> collect.Outcome:
            return await collect.collect_credentials(
                session, identity, Role.WALRUS, endpoint, key_dir, wait=wait, have=have,
                expect=expect, named=named, chain=held,
            )  # fmt: skip

        async with aiohttp.ClientSession() as session:
            assert await ask(10, None) is collect.Outcome.WRITTEN
            given = await clc.registrar.credentials(
                walrus.component_id, key_of(walrus).public_key(), 0
            )
            assert given.files is not None
            assert held.digest == chain_digest(given.files, Role.WALRUS)
            serial = format(certificates.load_cert(key_dir / "walrus-cert.pem").serial_number, "x")
            # The chain changes and the answer carrying it is lost (a watch nobody reads).
            issuer = clc.cloud.issuer
            clc.registrar.desk._issuer_for = lambda _role: replace(issuer, handover="x\n")
            lost = await clc.registrar.credentials(
                walrus.component_id, key_of(walrus).public_key(), 0, serial
            )
            assert lost.files is not None and HANDOVER in lost.files
            # Our watch says what we hold: answered at once with the new chain (not held
            # for its 30 s), which verifies, is kept, and becomes what we hold.
            loop = asyncio.get_running_loop()
            started = loop.time()
            outcome = await ask(30, serial)
            assert loop.time() - started < 10
            # (a handover that is not a real one is ignored by the agent: nothing to write)
            assert outcome in (collect.Outcome.UNCHANGED, collect.Outcome.RENEWED)
            assert held.digest == chain_digest(lost.files, Role.WALRUS)
            assert held.sent


async def test_an_older_registrar_refusing_the_field_is_watched_without_it(
    tmp_path: Path,
) -> None:
    cloud = FakeCloud()
    registrar = FakeRegistrar(cloud=cloud)
    url = await registrar.start()
    try:
        port = int(url.rsplit(":", 1)[1])
        key = keypairs.generate_key()
        identity = Identity("walrus-0000000000c4", key, keypairs.fingerprint(key.public_key()))
        endpoint = Endpoint("127.0.0.1", port, "")  # dialled, not heard
        expect = tls.Expect(Role.CLC, pin=cloud.fingerprint)
        held = collect.HeldChain()
        unknown: dict[str, Any] = {
            "error": "body: unknown field 'chain'; this object takes component_id, have, euca",
            "code": "unknown-field",
        }
        registrar.script = [
            bundle_reply(cloud, Role.WALRUS),  # the first collection
            json_reply(unknown, status=400),  # a watch with `chain`: refused by name
            bundle_reply(cloud, Role.WALRUS, watch=0),  # the same watch, without it
            bundle_reply(cloud, Role.WALRUS, watch=0),  # the next watch
        ]

        async def ask(have: str | None) -> collect.Outcome:
            return await collect.collect_credentials(
                session, identity, Role.WALRUS, endpoint, tmp_path / "keys", wait=1,
                have=have, expect=expect, chain=held,
            )  # fmt: skip

        async with aiohttp.ClientSession() as session:
            assert await ask(None) is collect.Outcome.WRITTEN
            assert held.digest is not None
            serial = format(
                certificates.load_cert(tmp_path / "keys" / "walrus-cert.pem").serial_number, "x"
            )
            assert await ask(serial) in (collect.Outcome.UNCHANGED, collect.Outcome.RENEWED)
            assert not held.sent
            await ask(serial)
        sent = [("chain" in body) for body in registrar.requests]
        assert sent == [False, True, False, False]
    finally:
        await registrar.close()
