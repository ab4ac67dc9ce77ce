"""Certificate renewal for the same key: the pure decision, the registrar's desk (a real SQLite
file, an injected clock), concurrent and restarted renewals, watches that answer when a
certificate falls due or its chain is renewed, and the agent's in-place update of its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

from eucareg.agent import collect
from eucareg.agent.expiry import expiry_note, held_note
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.config.file import from_mapping
from eucareg.config.values import ConfigError
from eucareg.core import renewal
from eucareg.core.model import Role, Status
from eucareg.core.view import RegistrarSettings
from eucareg.pki import certificates, keypairs, names
from eucareg.pki import credentials as cred
from eucareg.registrar.engine import Issuer, Registrar, Timing
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, ann, fresh_key, sighting

CLC = RegistrarSettings(
    registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), observes_unmatched_nodes=True
)
HOUR = 3600.0
SHORT = renewal.RenewalPolicy(lifetime=HOUR)  # due with 20 minutes left


class Clock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return datetime.datetime.now(datetime.UTC).timestamp() + self.offset


@pytest.fixture(scope="module")
def cloud() -> tuple[keypairs.PrivateKey, Issuer]:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "renewal")
    return key, Issuer(key=key, cert=ca, cloud_cert=ca, policy=SHORT)


async def make(
    tmp_path: Path, issuer: Issuer | Callable[[Role], Issuer], clock: Clock
) -> Registrar:
    """A started CLC registrar on an SQLite file in `tmp_path`, its install window open;
    `issuer` may be a function of the role (a test that renews the chain swaps its answer)."""
    reg = Registrar(
        Store(sqlite_url(tmp_path / "registry.db")),
        CLC,
        hook_dir=tmp_path / "hooks",
        timing=Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5),
        issuer_for=issuer if callable(issuer) else lambda _role: issuer,
        clock=clock,
        master_key=b"test-master-key",
    )
    await reg.start()
    await reg.open_install_window(3600)
    return reg


async def registered_cc(reg: Registrar) -> tuple[str, keypairs.PrivateKey]:
    """A CC registered and holding its first certificate; its id and key."""
    cc = ann(Role.CC, "c1")
    key = KEYS[cc.fingerprint]
    reg.on_sighting(sighting(cc))
    for _ in range(50):
        await reg.idle()
        record = reg.memory.records.get(cc.component_id)
        if record is not None and record.status is Status.AWAITING_KEY:
            await reg.credentials(cc.component_id, key.public_key(), wait=0)
        if record is not None and record.status is Status.REGISTERED:
            break
        await asyncio.sleep(0.02)
    first = await reg.credentials(cc.component_id, key.public_key(), wait=0)
    assert first.files is not None
    return cc.component_id, key


class WithCC(NamedTuple):
    """A started registrar and the CC registered with it: its id and key."""

    reg: Registrar
    cid: str
    key: keypairs.PrivateKey


@contextlib.asynccontextmanager
async def registrar_with_cc(
    tmp_path: Path,
    issuer: Issuer | Callable[[Role], Issuer],
    clock: Clock | None = None,
    *,
    cc: tuple[str, keypairs.PrivateKey] | None = None,
    before: Callable[[Registrar], Awaitable[None]] | None = None,
) -> AsyncIterator[WithCC]:
    """`make()` (with `clock`, else wall time) and `registered_cc()`, the registrar closed
    when the block ends, however it ends. `cc`: a restart on the same files, with the CC an
    earlier registrar registered (none is registered now). `before` runs between the start
    and the registration."""
    reg = await make(tmp_path, issuer, clock if clock is not None else Clock())
    try:
        if before is not None:
            await before(reg)
        cid, key = cc if cc is not None else await registered_cc(reg)
        yield WithCC(reg, cid, key)
    finally:
        await reg.close()


def serial_of(files: dict[str, str] | None, role: Role = Role.CC) -> str:
    assert files is not None
    return format(certificates.load_cert_pem(files[cred.LAYOUTS[role].cert]).serial_number, "x")


# -- the pure decision -------------------------------------------------------------------------


def test_phase_follows_the_margin_and_the_end() -> None:
    v = renewal.Validity(1000.0, 1000.0 + 3 * HOUR)
    margin = SHORT.margin  # 20 minutes
    assert renewal.due_at(v, margin) == v.not_after - 1200
    assert renewal.phase(v, margin, v.not_after - 1201) is renewal.Phase.CURRENT
    assert renewal.phase(v, margin, v.not_after - 1200) is renewal.Phase.DUE
    assert renewal.phase(v, margin, v.not_after) is renewal.Phase.EXPIRED


def test_certificates_issued_together_fall_due_spread_over_a_tenth_of_the_margin() -> None:
    """A thousand nodes registered in one minute: their renewals spread over SPREAD of the
    margin (about two months by default), each fixed by its serial, never later than the
    margin says."""
    policy = renewal.DEFAULT_POLICY
    issued = 1_000_000.0
    v = renewal.Validity(issued - renewal.SKEW, issued + policy.lifetime)
    plain = renewal.due_at(v, policy.margin)
    serials = [format(n * 7919 + 13, "x") for n in range(1000)]
    dues = [renewal.due_at(v, policy.margin, serial) for serial in serials]
    assert all(plain - renewal.SPREAD * policy.margin <= due <= plain for due in dues)
    assert max(dues) - min(dues) > 0.9 * renewal.SPREAD * policy.margin
    days = {int(due // 86400) for due in dues}
    assert len(days) > 50  # not one day: about 60 of them
    # The same serial always gives the same moment (a restarted registrar agrees).
    assert renewal.due_at(v, policy.margin, serials[0]) == dues[0]
    assert renewal.phase(v, policy.margin, dues[0], serials[0]) is renewal.Phase.DUE
    assert renewal.phase(v, policy.margin, dues[0] - 1, serials[0]) is renewal.Phase.CURRENT


def test_a_short_lived_certificate_is_never_due_within_its_first_minute() -> None:
    # An hour, renewed with 59 minutes left: no room to spread (it would be due at once).
    v = renewal.Validity(5000.0 - renewal.SKEW, 5000.0 + HOUR)
    for serial in ("0", "1", "ff" * 20):
        assert renewal.due_at(v, HOUR - 60, serial) == v.not_after - (HOUR - 60)
        assert renewal.spread(v, HOUR - 60, serial) == 0.0
    # An hour with 20 minutes: spread over 2 of them, at most.
    assert 0 <= renewal.spread(v, 1200, "abc") <= 120


def test_default_policy_is_five_years_renewed_with_a_third_left() -> None:
    policy = renewal.DEFAULT_POLICY
    assert policy.lifetime == 5 * 365 * 86400
    assert policy.margin == policy.lifetime / 3
    assert policy.problem() is None


@pytest.mark.parametrize(
    ("registrar", "message"),
    [
        ({"certificate_lifetime": "59m"}, "certificate_lifetime: must be at least 1h"),
        ({"certificate_lifetime": "11000d"}, "certificate_lifetime: must be at most"),
        (
            {"certificate_lifetime": "1h", "certificate_renew_before": "3541s"},
            "must be at least 60 s shorter",
        ),
        ({"certificate_renew_before": "0"}, "certificate_renew_before: must be longer than zero"),
        ({"certificate_renew_before": "soon"}, "certificate_renew_before: expected a duration"),
        ({"certificate_lifetime": True}, "certificate_lifetime: expected a duration"),
    ],
)
def test_bad_renewal_settings_are_refused_by_name(
    registrar: dict[str, object], message: str
) -> None:
    raw = {"address": "10.0.0.1", "components": {"clc": {}}, "registrar": registrar}
    with pytest.raises(ConfigError, match=message):
        from_mapping(raw)


def test_renewal_settings_are_read() -> None:
    raw = {
        "address": "10.0.0.1",
        "components": {"clc": {}},
        "registrar": {"certificate_lifetime": "90d", "certificate_renew_before": "30d"},
    }
    policy = from_mapping(raw).certificates
    assert (policy.lifetime, policy.margin) == (90 * 86400, 30 * 86400)
    assert from_mapping({**raw, "registrar": {}}).certificates == renewal.DEFAULT_POLICY


def test_the_agent_notes_its_expiry_only_within_the_margin() -> None:
    v = renewal.Validity(0.0, 3 * HOUR)
    assert expiry_note(v, HOUR) == ""
    assert "due for renewal and expires at 1970-01-01 03:00:00Z" in expiry_note(v, 2.5 * HOUR)
    assert "EXPIRED at 1970-01-01 03:00:00Z" in expiry_note(v, 3 * HOUR)


# -- the registrar -----------------------------------------------------------------------------


async def test_a_due_certificate_is_renewed_for_the_same_key_and_the_old_stays_valid(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        first = await reg.credentials(cid, key.public_key(), wait=0)
        old = serial_of(first.files)
        # Not due yet: asked again, the same certificate (22 minutes left: before even the
        # earliest moment the spread can make it due, 20 + 2).
        clock.offset = HOUR - 1330
        assert serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files) == old
        clock.offset = HOUR - 1100  # within the 20 minutes
        renewed = await reg.credentials(cid, key.public_key(), wait=0)
        new = serial_of(renewed.files)
        assert new != old
        assert renewed.files is not None
        verified = cred.verify_bundle(renewed.files, Role.CC, key)  # same key, same chain
        cert = certificates.load_cert_pem(verified[cred.LAYOUTS[Role.CC].cert])
        assert cert.not_valid_after_utc.timestamp() == pytest.approx(clock() + HOUR, abs=5)
        # Not revoked: a component still presenting it until it collects the new one works.
        assert old not in reg.memory.revoked
        events = [e for e in reg.store.events(component_id=cid) if e.kind == "credentials"]
        assert [e.code for e in events] == ["issued", "renewed"]
        assert old in events[-1].reason and new in events[-1].reason
        record = reg.memory.records[cid]
        assert record.status is Status.REGISTERED


async def test_many_concurrent_requests_for_a_due_certificate_get_one_new_serial(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        old = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        clock.offset = HOUR - 600
        answers = await asyncio.gather(
            *(reg.credentials(cid, key.public_key(), wait=0) for _ in range(9))
        )
        serials = {serial_of(a.files) for a in answers}
        assert len(serials) == 1 and old not in serials
        codes = [e.code for e in reg.store.events(component_id=cid, kind="credentials")]
        assert codes.count("renewed") == 1


async def test_a_restarted_registrar_neither_loses_nor_repeats_a_renewal(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = HOUR - 600
        renewed = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (again, _, _):
        assert serial_of((await again.credentials(cid, key.public_key(), wait=0)).files) == renewed
        codes = [e.code for e in again.store.events(component_id=cid, kind="credentials")]
        assert codes == ["issued", "renewed"]


async def test_a_watch_answers_when_its_certificate_falls_due(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    # Due 2 s after it is issued (the certificate starts 5 minutes back: clocks differ).
    quick = replace(issuer, policy=renewal.RenewalPolicy(HOUR, HOUR - 2))
    async with registrar_with_cc(tmp_path, quick) as (reg, cid, key):
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await asyncio.wait_for(reg.credentials(cid, key.public_key(), 30, have), 20)
        took = loop.time() - started
        assert serial_of(answer.files) != have
        assert took < 10, f"the watch answered after {took:.1f} s, not when due"


async def test_a_watch_answers_when_the_chain_above_it_is_renewed(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    """A CC's (or the CA's) certificate renewed for the same key: the watching components get
    the new chain, and their own certificates verify under it unchanged."""
    key_ca, issuer = cloud
    holder = [issuer]
    async with registrar_with_cc(tmp_path, lambda _role: holder[0]) as (reg, cid, key):
        first = await reg.credentials(cid, key.public_key(), wait=0)
        have = serial_of(first.files)
        watch = asyncio.create_task(reg.credentials(cid, key.public_key(), 60, have))
        await asyncio.sleep(0.2)
        assert not watch.done()
        new_ca = certificates.renew_cloud_ca(key_ca, issuer.cloud_cert)
        holder[0] = replace(issuer, cert=new_ca, cloud_cert=new_ca)
        reg.desk.chain_changed()
        answer = await asyncio.wait_for(watch, 5)
        assert serial_of(answer.files) == have  # the same certificate ...
        assert answer.files is not None and first.files is not None
        assert answer.files[cred.CLOUD_CERT] == certificates.cert_pem(
            new_ca
        )  # ... under the new CA
        cred.verify_bundle(answer.files, Role.CC, key)


async def test_a_watch_opened_after_the_chain_changed_answers_at_once(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    """The chain renewed while the component was between two requests (no watch open to
    wake): its next watch must hand it the new chain at once, not hold it as current (CI:
    an NC missed its CC's renewal for minutes). With the chain it was given, a watch holds."""
    key_ca, issuer = cloud
    holder = [issuer]
    async with registrar_with_cc(tmp_path, lambda _role: holder[0]) as (reg, cid, key):
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        new_ca = certificates.renew_cloud_ca(key_ca, issuer.cloud_cert)
        holder[0] = replace(issuer, cert=new_ca, cloud_cert=new_ca)
        reg.desk.chain_changed()  # wakes nobody: no watch is open
        answer = await asyncio.wait_for(reg.credentials(cid, key.public_key(), 60, have), 5)
        assert answer.files is not None
        assert answer.files[cred.CLOUD_CERT] == certificates.cert_pem(new_ca)
        assert serial_of(answer.files) == have
        # Told of this chain now: the next watch is held, until the deadline it asked for.
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await asyncio.wait_for(reg.credentials(cid, key.public_key(), 1.0, have), 5)
        assert loop.time() - started >= 0.9
        assert answer.files is not None
        assert answer.files[cred.CLOUD_CERT] == certificates.cert_pem(new_ca)


async def test_after_a_registrar_restart_the_first_watch_is_answered_at_once(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    """A new registrar process does not know which chain a component holds (its CC may have
    been renewed while it was down): it answers that component's first watch at once."""
    _, issuer = cloud
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
        answer = await asyncio.wait_for(reg.credentials(cid, key.public_key(), 60, have), 5)
        assert serial_of(answer.files) == have
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(reg.credentials(cid, key.public_key(), 1.0, have), 5)
        assert loop.time() - started >= 0.9  # the second is held to its deadline


async def test_deregistering_after_a_renewal_revokes_the_current_certificate(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = HOUR - 600
        new = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        await reg.deregister(reg.memory.records[cid])
        assert new in reg.memory.revoked


# -- certificates and chains -------------------------------------------------------------------


def test_a_node_certificate_verifies_under_its_cc_s_renewed_certificate() -> None:
    ca_key, cc_key, nc_key = keypairs.generate_key(), fresh_key(), fresh_key()
    ca = certificates.create_cloud_ca(ca_key, "chain")
    cc_args = {
        "issuer_key": ca_key,
        "issuer_cert": ca,
        "subject_key": cc_key.public_key(),
        "role": Role.CC,
        "component_id": "cc-000000000001",
        "cluster": "c1",
    }
    cc_old = certificates.issue_certificate(**cc_args)  # type: ignore[arg-type]
    node = certificates.issue_certificate(
        issuer_key=cc_key,
        issuer_cert=cc_old,
        subject_key=nc_key.public_key(),
        role=Role.NC,
        component_id="nc-000000000001",
        cluster="c1",
    )
    cc_new = certificates.issue_certificate(**cc_args)  # type: ignore[arg-type]
    assert cc_new.serial_number != cc_old.serial_number
    files = {
        cred.CLOUD_CERT: certificates.cert_pem(ca),
        "cluster-cert.pem": certificates.cert_pem(cc_new),
        "node-cert.pem": certificates.cert_pem(node),
    }
    expect = names.CertIdentity(Role.NC, "c1", "nc-000000000001")
    cred.verify_bundle(files, Role.NC, nc_key, expect=expect)


def test_a_renewed_cloud_ca_keeps_key_name_and_every_certificate_it_signed() -> None:
    key = keypairs.generate_key()
    old = certificates.create_cloud_ca(key, "renew", now=1_700_000_000.0)
    new = certificates.renew_cloud_ca(key, old)
    assert new.serial_number != old.serial_number
    assert certificates.cert_fingerprint(new) == certificates.cert_fingerprint(old)  # pins hold
    assert new.subject == old.subject
    assert new.not_valid_after_utc > old.not_valid_after_utc
    leaf_key = fresh_key()
    leaf = certificates.issue_certificate(
        issuer_key=key,
        issuer_cert=old,
        subject_key=leaf_key.public_key(),
        role=Role.WALRUS,
        component_id="walrus-000000000001",
        cluster=None,
    )
    leaf.verify_directly_issued_by(new)
    with pytest.raises(keypairs.CredentialError, match="does not certify this CLC's key"):
        certificates.renew_cloud_ca(keypairs.generate_key(), old)


# -- the agent's side --------------------------------------------------------------------------


def _bundle(issuer: Issuer, key: keypairs.PrivateKey, cid: str) -> dict[str, str]:
    cert = certificates.issue_certificate(
        issuer_key=issuer.key,
        issuer_cert=issuer.cert,
        subject_key=key.public_key(),
        role=Role.WALRUS,
        component_id=cid,
        cluster=None,
    )
    return {
        cred.CLOUD_CERT: certificates.cert_pem(issuer.cloud_cert),
        "walrus-cert.pem": certificates.cert_pem(cert),
    }


def test_the_agent_replaces_renewed_files_in_place_and_only_those(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    ca_key, issuer = cloud
    key = fresh_key()
    ident = Identity("walrus-00000000000a", key, keypairs.fingerprint(key.public_key()))
    endpoint = Endpoint("10.0.0.1", 8780, "clc-000000000001")
    key_dir = tmp_path / "keys"
    first = _bundle(issuer, key, ident.component_id)
    assert collect._accept(first, Role.WALRUS, ident, endpoint, key_dir, None, None, None) is (
        collect.Outcome.WRITTEN
    )
    have = serial_of(first, Role.WALRUS)
    same = collect._accept(first, Role.WALRUS, ident, endpoint, key_dir, have, None, None)
    assert same is collect.Outcome.UNCHANGED
    inodes = {p.name: p.stat().st_ino for p in key_dir.iterdir()}
    # A renewal: the certificate only (the CA and the key copy stay the very same files).
    renewed = _bundle(issuer, key, ident.component_id)
    outcome = collect._accept(renewed, Role.WALRUS, ident, endpoint, key_dir, have, None, None)
    assert outcome is collect.Outcome.RENEWED
    after = {p.name: p.stat().st_ino for p in key_dir.iterdir()}
    assert after["walrus-cert.pem"] != inodes["walrus-cert.pem"]
    assert after[cred.CLOUD_CERT] == inodes[cred.CLOUD_CERT]
    assert after["walrus-pk.pem"] == inodes["walrus-pk.pem"]
    assert cred.credentials_present(key_dir, Role.WALRUS, key)
    # The CA renewed, our certificate not: the chain alone is replaced.
    new_ca = certificates.renew_cloud_ca(ca_key, issuer.cloud_cert)
    chain_only = {**renewed, cred.CLOUD_CERT: certificates.cert_pem(new_ca)}
    have = serial_of(renewed, Role.WALRUS)
    outcome = collect._accept(chain_only, Role.WALRUS, ident, endpoint, key_dir, have, None, None)
    assert outcome is collect.Outcome.RENEWED
    assert (key_dir / cred.CLOUD_CERT).read_text() == certificates.cert_pem(new_ca)
    assert cred.credentials_present(key_dir, Role.WALRUS, key)
    assert not [p for p in key_dir.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_the_agent_refuses_a_renewal_for_another_key_and_keeps_what_it_holds(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    key = fresh_key()
    ident = Identity("walrus-00000000000b", key, keypairs.fingerprint(key.public_key()))
    endpoint = Endpoint("10.0.0.1", 8780, "clc-000000000001")
    key_dir = tmp_path / "keys"
    first = _bundle(issuer, key, ident.component_id)
    collect._accept(first, Role.WALRUS, ident, endpoint, key_dir, None, None, None)
    held = (key_dir / "walrus-cert.pem").read_bytes()
    other = _bundle(issuer, fresh_key(), ident.component_id)
    with pytest.raises(keypairs.CredentialError, match="does not certify this component's key"):
        collect._accept(
            other, Role.WALRUS, ident, endpoint, key_dir, serial_of(first, Role.WALRUS), None, None
        )
    assert (key_dir / "walrus-cert.pem").read_bytes() == held


@pytest.mark.parametrize("shift", [-2 * HOUR, +2 * HOUR], ids=["expired", "future"])
def test_the_agent_never_replaces_working_credentials_by_ones_not_valid_now(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer], shift: float
) -> None:
    """A registrar of our own CA (misconfigured, or its clock wrong) sends a 'renewal' that
    has ended or not begun: refused, and what we hold stays."""
    _, issuer = cloud
    key = fresh_key()
    ident = Identity("walrus-00000000000c", key, keypairs.fingerprint(key.public_key()))
    endpoint = Endpoint("10.0.0.1", 8780, "clc-000000000001")
    key_dir = tmp_path / "keys"
    first = _bundle(issuer, key, ident.component_id)
    collect._accept(first, Role.WALRUS, ident, endpoint, key_dir, None, None, None)
    held = (key_dir / "walrus-cert.pem").read_bytes()
    bad = certificates.issue_certificate(
        issuer_key=issuer.key,
        issuer_cert=issuer.cert,
        subject_key=key.public_key(),
        role=Role.WALRUS,
        component_id=ident.component_id,
        cluster=None,
        now=Clock()() + shift,
        lifetime=datetime.timedelta(hours=1),
    )
    files = {**first, "walrus-cert.pem": certificates.cert_pem(bad)}
    have = serial_of(first, Role.WALRUS)
    with pytest.raises(keypairs.CredentialError, match="is not valid now"):
        collect._accept(files, Role.WALRUS, ident, endpoint, key_dir, have, None, None)
    assert (key_dir / "walrus-cert.pem").read_bytes() == held


async def test_the_agent_warns_with_the_date_of_the_certificate_it_holds(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    key = fresh_key()
    key_dir = tmp_path / "keys"
    assert await held_note(key_dir, Role.WALRUS) == ""  # nothing held: nothing to say
    cert = certificates.issue_certificate(
        issuer_key=issuer.key,
        issuer_cert=issuer.cert,
        subject_key=key.public_key(),
        role=Role.WALRUS,
        component_id="walrus-00000000000d",
        cluster=None,
        now=Clock()() - 50 * 60,  # 10 minutes (and the 5 backdated ones) of its hour left
        lifetime=datetime.timedelta(hours=1),
    )
    cred.write_atomic(key_dir / "walrus-cert.pem", certificates.cert_pem(cert).encode())
    end = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")
    assert await held_note(key_dir, Role.WALRUS) == (
        f"; our certificate is due for renewal and expires at {end}"
    )


def test_a_certificate_not_valid_yet_is_due_at_once() -> None:
    now = 1_000_000.0
    ahead = renewal.Validity(now + 2 * 86400, now + 2 * 86400 + HOUR)  # made by a fast clock
    assert renewal.phase(ahead, SHORT.margin, now) is renewal.Phase.DUE
    backdated = renewal.Validity(now - 300, now + HOUR)  # as every certificate starts
    assert renewal.phase(backdated, SHORT.margin, now) is renewal.Phase.CURRENT


async def test_a_certificate_made_while_the_clock_ran_ahead_is_replaced_when_it_is_right(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    """An NTP step forward, a certificate issued then, the clock set right: the component
    (which refuses a certificate not valid yet) gets one valid now at its next request,
    instead of one that becomes due in years."""
    _, issuer = cloud
    clock = Clock()

    async def two_days_ahead(reg: Registrar) -> None:
        clock.offset = 2 * 86400
        await reg.open_install_window(3600)  # the one opened "two days ago" has closed

    jumped = registrar_with_cc(tmp_path, issuer, clock, before=two_days_ahead)
    async with jumped as (reg, cid, key):
        ahead = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        clock.offset = 0
        answer = await reg.credentials(cid, key.public_key(), wait=0)
        assert serial_of(answer.files) != ahead
        assert answer.files is not None
        own = certificates.load_cert_pem(answer.files["cluster-cert.pem"])
        assert own.not_valid_before_utc.timestamp() <= clock()


async def test_an_unreadable_stored_certificate_is_replaced_not_served(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    _, issuer = cloud
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        stored = reg.memory.certificates[cid]
        reg.memory.certificates[cid] = replace(stored, cert_pem="-----BEGIN CERTIFICATE-----\nx")
        answer = await reg.credentials(cid, key.public_key(), wait=0)
        assert answer.files is not None
        cred.verify_bundle(answer.files, Role.CC, key)
        assert serial_of(answer.files) != stored.serial


def test_an_unchanged_bundle_is_not_checked_against_the_agent_s_clock(
    tmp_path: Path, cloud: tuple[keypairs.PrivateKey, Issuer]
) -> None:
    """What we hold already is not refused again (a wrong clock on our side must not turn an
    idle watch into a retry loop); only what would replace it must be valid now."""
    _, issuer = cloud
    key = fresh_key()
    ident = Identity("walrus-00000000000e", key, keypairs.fingerprint(key.public_key()))
    endpoint = Endpoint("10.0.0.1", 8780, "clc-000000000001")
    old = certificates.issue_certificate(
        issuer_key=issuer.key,
        issuer_cert=issuer.cert,
        subject_key=key.public_key(),
        role=Role.WALRUS,
        component_id=ident.component_id,
        cluster=None,
        now=Clock()() - 3 * HOUR,
        lifetime=datetime.timedelta(hours=1),
    )
    files = {
        cred.CLOUD_CERT: certificates.cert_pem(issuer.cloud_cert),
        "walrus-cert.pem": certificates.cert_pem(old),
    }
    key_dir = tmp_path / "keys"
    collect._accept(files, Role.WALRUS, ident, endpoint, key_dir, None, None, None)
    have = serial_of(files, Role.WALRUS)
    outcome = collect._accept(files, Role.WALRUS, ident, endpoint, key_dir, have, None, None)
    assert outcome is collect.Outcome.UNCHANGED
