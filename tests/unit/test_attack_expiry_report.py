"""Attacks on the once-only expiry report (registrar/renewal.py, `ExpiryReport._report` and
`_stored`): an `expiring`/`expired` event is written once per certificate, also across
restarts, found again among the component's newest credential events by the serial it names.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import Event, event_for
from eucareg.core.transitions import Transition, Write
from eucareg.pki import certificates, keypairs
from eucareg.registrar.engine import Issuer, Registrar
from eucareg.registrar.renewal import RECENT, _serial_of
from tests.unit.test_renewal import HOUR, SHORT, Clock, registrar_with_cc

OVERDUE = HOUR - 300  # due for 15 minutes: reported `expiring`


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "expiry-attack")
    return Issuer(key=key, cert=ca, cloud_cert=ca, policy=SHORT)


def reports(reg: Registrar, cid: str) -> list[Event]:
    return [
        e
        for e in reg.store.events(component_id=cid, kind="credentials")
        if e.code in ("expiring", "expired")
    ]


async def tick(reg: Registrar) -> None:
    reg.expiry._tick()
    await reg.idle()


async def write_event(reg: Registrar, cid: str, code: str, reason: str) -> None:
    record = reg.memory.records[cid]
    event = event_for(record, reg.clock(), "credentials", code, reason)
    await reg.step(Transition(Write(events=(event,))))


def test_the_serial_is_read_as_a_whole_word() -> None:
    assert _serial_of("certificate abc is due for renewal") == "abc"
    assert _serial_of("certificate abcd expired at x") == "abcd"
    assert _serial_of("certificate") == ""
    assert _serial_of("Eucalyptus key files sent: certificate abc") == ""


async def test_a_report_of_a_serial_that_is_a_prefix_does_not_hide_this_one(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        serial = reg.memory.certificates[cid].serial
        # Earlier reports naming a prefix, an extension and the serial in another code.
        await write_event(reg, cid, "expiring", f"certificate {serial[:-1]} is due ...")
        await write_event(reg, cid, "expiring", f"certificate {serial}0 is due ...")
        await write_event(reg, cid, "expired", f"certificate {serial} expired at ...")
    clock.offset = OVERDUE
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
        await tick(reg)
        mine = [e for e in reports(reg, cid) if e.code == "expiring" and _serial_of(e.reason)]
        assert [_serial_of(e.reason) for e in mine][-1] == serial
        assert sum(_serial_of(e.reason) == serial for e in mine) == 1


async def test_quick_ticks_write_one_report(tmp_path: Path, issuer: Issuer) -> None:
    """Ticks following each other before the first report is written (its look-up in the
    store is pending): one event, not one per tick."""
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, _):
        clock.offset = OVERDUE
        for _ in range(5):
            reg.expiry._tick()  # no idle between: the spawned reports race
        await reg.idle()
        assert [e.code for e in reports(reg, cid)] == ["expiring"]


async def test_a_stop_while_the_report_is_pending_reports_it_once_after_the_restart(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = OVERDUE
        reg.expiry._tick()  # spawned, not awaited: the stop comes first
    assert len(reports(reg, cid)) <= 1  # written or not; never twice
    for _ in range(2):
        async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
            await tick(reg)
            await tick(reg)
            assert [e.code for e in reports(reg, cid)] == ["expiring"]


async def test_events_of_other_kinds_and_components_do_not_push_the_report_out(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = OVERDUE
        await tick(reg)
        record = reg.memory.records[cid]
        noise = tuple(
            event_for(record, reg.clock(), "registration", "noise", f"event {n}")
            for n in range(3 * RECENT)
        )
        await reg.step(Transition(Write(events=noise)))
        other = replace(record, component_id="cc-ffff00000001")
        chatter = tuple(
            event_for(other, reg.clock(), "credentials", "expiring", f"certificate x{n}")
            for n in range(2 * RECENT)
        )
        await reg.step(Transition(Write(events=chatter)))
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
        await tick(reg)
        assert [e.code for e in reports(reg, cid)] == ["expiring"]


async def test_more_than_recent_credential_events_after_a_report_repeat_it_after_a_restart(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The documented bound of the look-up: the report must be among the component's newest
    RECENT credential events. Nothing the registrar writes gets there for a certificate that
    is not renewed (a request would renew it), so this needs events written by hand; then a
    restarted registrar reports it once more, and only once."""
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        clock.offset = OVERDUE
        await tick(reg)
        for n in range(RECENT):
            await write_event(reg, cid, "euca-keys-sent", f"Eucalyptus key files sent: {n}")
    for _ in range(2):
        async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
            await tick(reg)
            assert [e.code for e in reports(reg, cid)] == ["expiring", "expiring"]


async def test_a_new_certificate_after_re_registration_is_reported_on_its_own(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Deregistered and registered again: a new serial, whose lapse is news, however the
    old one's was reported."""
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        old = reg.memory.certificates[cid].serial
        clock.offset = OVERDUE
        await tick(reg)
        await reg.deregister(reg.memory.records[cid])
        await reg.idle()
        for _ in range(100):
            if (await reg.credentials(cid, key.public_key(), 0)).files is not None:
                break
            await reg.idle()
        new = reg.memory.certificates[cid].serial
        assert new != old
        clock.offset = OVERDUE * 2 + 1  # the new one, issued at OVERDUE, overdue too
        await tick(reg)
        await tick(reg)
        named = [(e.code, _serial_of(e.reason)) for e in reports(reg, cid)]
        assert named == [("expiring", old), ("expiring", new)]
