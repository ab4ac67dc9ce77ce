"""The registrar with a real store: shared join tokens under a burst, slots freed by failures and
by the operator, and reinstalled machines. Negative checks wait for the deciding event."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import Announcement, Role, Status
from eucareg.core.trust import Mode, announcement_proof_message, make_proof, parse_token
from eucareg.core.view import RegistrarSettings
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import certificates, keypairs
from eucareg.registrar.engine import CredentialRefused, Issuer, Registrar, Timing
from tests.factories import KEYS, ann, sighting
from tests.unit.test_registrar import NC_SETTINGS, make_registrar, settle, write_hook

CLC = RegistrarSettings(registers=frozenset({Role.WALRUS, Role.CC, Role.SC}))


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "test")
    return Issuer(key=key, cert=ca, cloud_cert=ca)


def tokened(text: str, base: Announcement) -> Announcement:
    parsed = parse_token(text)
    stamp = int(time.time())
    stamped = replace(base, token_id=parsed.token_id, token_stamp=stamp)
    proof = make_proof(parsed.secret, announcement_proof_message(stamped, stamp))
    return replace(stamped, token_proof=proof)


async def wait_for_status(reg: Registrar, component_id: str, status: Status) -> None:
    deadline = time.monotonic() + 10
    while (rec := reg.record(component_id)) is None or rec.status is not status:
        assert time.monotonic() < deadline, f"{component_id} is {rec and rec.status}"
        await settle(reg)
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("uses", [1, 3])
async def test_a_token_shared_by_ten_nodes_at_once_admits_exactly_its_uses(
    tmp_path: Path, issuer: Issuer, uses: int
) -> None:
    reg = await make_registrar(
        tmp_path, NC_SETTINGS, me=[True], install_window=False, issuer=issuer
    )
    text = await reg.create_token(Role.NC, None, 600, uses, "sha256:" + "c" * 64)
    nodes = [tokened(text, ann(Role.NC, "c1")) for _ in range(10)]
    for node in nodes:
        reg.on_sighting(sighting(node))
    await settle(reg)
    records = reg.store.records()
    statuses = sorted(r.status.value for r in records.values())
    assert statuses.count("registered") == uses, statuses
    assert statuses.count("refused") == 10 - uses, statuses
    refusals = [e for e in reg.store.events(kind="refused") if e.code == "token-used-up"]
    assert len(refusals) == 10 - uses
    await reg.close()
    # What memory held is what the store holds: a restarted registrar sees the same uses.
    again = await make_registrar(tmp_path, NC_SETTINGS, me=[True], install_window=False)
    [token] = again.tokens()
    assert len(token.used_by) == uses
    assert token.used_by == {
        r.component_id for r in records.values() if r.status.value == "registered"
    }
    await again.close()


async def test_a_failing_cluster_hook_holds_no_slot_against_the_genuine_cc(tmp_path: Path) -> None:
    """A value exec refuses (a NUL byte) reaches the hook: the attempt fails with its reason
    and a retry, and the cluster name stays free for the genuine CC."""
    write_hook(tmp_path / "hooks", "cluster", "exit 0")
    reg = await make_registrar(tmp_path, CLC, timing=Timing(retry_base=60, hook_timeout=5))
    broken = ann(Role.CC, "c1")
    reg.submit(broken)
    record = reg.record(broken.component_id)
    assert record is not None
    # Poison the accepted record the hook is run from (what a corrupt store row would do).
    reg.memory.records[broken.component_id] = replace(record, cluster="c1\x00evil")
    await settle(reg)
    failed = reg.record(broken.component_id)
    assert failed is not None and failed.status is Status.FAILED
    assert "cannot run" in failed.reason and "retry" in failed.reason
    genuine = ann(Role.CC, "c1")
    reg.submit(genuine)
    await wait_for_status(reg, genuine.component_id, Status.REGISTERED)
    await reg.close()


async def test_deregistering_the_holder_of_an_address_admits_the_waiting_newcomer(
    tmp_path: Path,
) -> None:
    """A transition that frees a slot decides again for those it blocked, with no other
    trigger (here: the operator deregisters the old node, which went silent but not for
    `replace_after` yet)."""
    reg = await make_registrar(tmp_path, NC_SETTINGS, me=[True])
    old = ann(Role.NC, "c1", address="10.77.9.9")
    reg.on_sighting(sighting(old))
    await settle(reg)
    assert reg.record(old.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    newcomer = ann(Role.NC, "c1", address="10.77.9.9")
    reg.on_sighting(sighting(newcomer))
    await settle(reg)
    refused = reg.record(newcomer.component_id)
    assert refused is not None and refused.status is Status.REFUSED
    assert "already registered" in refused.reason
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    await settle(reg)
    held = reg.record(newcomer.component_id)
    assert held is not None and held.status is Status.PENDING, held
    assert held.waiting_for == f"{old.component_id} to stay silent"
    await reg.deregister(reg.find(old.component_id, None))
    await wait_for_status(reg, newcomer.component_id, Status.REGISTERED)
    await reg.close()


async def test_a_reinstalled_node_replaces_its_silent_old_identity(
    tmp_path: Path, issuer: Issuer
) -> None:
    settings = replace(NC_SETTINGS, replace_after=0.3)
    reg = await make_registrar(tmp_path, settings, me=[True], issuer=issuer)
    old = ann(Role.NC, "c1", address="10.77.8.8")
    reg.on_sighting(sighting(old))
    await settle(reg)
    key = KEYS[old.fingerprint]
    answer = await reg.credentials(old.component_id, key.public_key(), wait=0)
    assert answer.files is not None
    serial = format(certificates.load_cert_pem(answer.files["node-cert.pem"]).serial_number, "x")
    # The machine goes away (goodbye), is wiped and comes back with a new identity.
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    newcomer = ann(Role.NC, "c1", address="10.77.8.8")
    reg.on_sighting(sighting(newcomer))
    await settle(reg)
    waiting = reg.record(newcomer.component_id)
    assert waiting is not None and waiting.status is Status.PENDING
    assert waiting.waiting_for == f"{old.component_id} to stay silent"
    await wait_for_status(reg, newcomer.component_id, Status.REGISTERED)
    replaced = reg.record(old.component_id)
    assert replaced is not None and replaced.status is Status.REPLACED
    assert newcomer.component_id in replaced.reason
    assert reg.record(newcomer.component_id).replaces == old.component_id  # type: ignore[union-attr]
    with pytest.raises(CredentialRefused) as revoked:
        await reg.credentials(old.component_id, key.public_key(), 0, serial)
    assert revoked.value.status == 410
    await reg.close()


async def test_a_component_known_only_by_its_long_poll_is_replaced_once_the_poll_ends(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The old identity's agent held a credential long-poll open and no announcement (it
    stopped right after its goodbyes, or registers over HTTP). While the poll is open the
    component is online and keeps its address; when the poll ends, the newcomer it blocked
    is decided again, and replaces it once it has stayed silent for replace_after."""
    settings = replace(NC_SETTINGS, replace_after=0.3)
    reg = await make_registrar(tmp_path, settings, me=[True], issuer=issuer)
    old = ann(Role.NC, "c1", address="10.77.9.9")
    reg.on_sighting(sighting(old))
    await settle(reg)
    key = KEYS[old.fingerprint]
    answer = await reg.credentials(old.component_id, key.public_key(), wait=0)
    assert answer.files is not None
    serial = format(certificates.load_cert_pem(answer.files["node-cert.pem"]).serial_number, "x")
    watch = asyncio.create_task(reg.credentials(old.component_id, key.public_key(), 30, serial))
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    newcomer = ann(Role.NC, "c1", address="10.77.9.9")
    reg.on_sighting(sighting(newcomer))
    await settle(reg)
    waiting = reg.record(newcomer.component_id)
    assert waiting is not None and waiting.status is not Status.REGISTERED
    assert old.component_id in reg.online_ids  # the open poll
    # Let the re-decision armed by the withdrawal pass while the poll still holds the old
    # identity online (the moment of the hang-up, not a negative check).
    await asyncio.sleep(settings.replace_after * 3)
    assert reg.record(newcomer.component_id).status is not Status.REGISTERED  # type: ignore[union-attr]
    watch.cancel()  # the old agent's connection goes away
    with pytest.raises(asyncio.CancelledError):
        await watch
    await wait_for_status(reg, newcomer.component_id, Status.REGISTERED)
    replaced = reg.record(old.component_id)
    assert replaced is not None and replaced.status is Status.REPLACED
    await reg.close()


async def test_a_flood_of_unauthenticated_http_announcements_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    """Mode local: 300 signed HTTP announcements with fresh ids and keys, no token. Each is
    refused; no record is stored and nothing per id stays in memory."""
    reg = await make_registrar(tmp_path, CLC)
    walrus = ann(Role.WALRUS)
    for n in range(300):
        flood = replace(walrus, component_id=f"walrus-flood{n:06d}", source="fallback")
        decision, record = await reg.fallback(flood)
        assert (decision.code, record) == ("fallback-not-allowed", None)
    assert reg.records() == {} and reg.store.records() == {}
    assert not reg.proven and not reg.presence.last_seen
    assert reg.memory.unadmitted == 0
    await reg.close()


async def test_an_http_announcement_after_an_mdns_one_does_not_strand_the_component(
    tmp_path: Path,
) -> None:
    """Heard over mDNS first (admitted, awaiting its key), then announcing over HTTP as an
    agent with fallback_registrar does: the signed announcement proves the key, and the
    component registers instead of waiting for a proof that was already counted."""
    reg = await make_registrar(tmp_path, CLC)
    await reg.set_mode(Mode.ANY)
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus))
    await reg.idle()
    assert reg.record(walrus.component_id).status is Status.AWAITING_KEY  # type: ignore[union-attr]
    await reg.fallback(replace(walrus, source="fallback"))
    await wait_for_status(reg, walrus.component_id, Status.REGISTERED)
    await reg.close()
