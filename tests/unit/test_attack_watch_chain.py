"""Attacks on the watch's chain rule (registrar/desk.py, `_told_chain`): a watch is answered at
once when the chain above the component's certificate differs from the one this registrar
process last answered that component with. Who besides the component can make its watches
return early, spin, or grow the registrar's memory; and whether the digest separates files.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import Role, Status
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from eucareg.pki.chain import chain_digest
from eucareg.pki.handover import HANDOVER
from eucareg.registrar.desk import CredentialAnswer, CredentialRefused
from eucareg.registrar.engine import Issuer, Registrar
from tests.factories import fresh_key
from tests.unit.test_renewal import Clock, registrar_with_cc, serial_of

HELD = 1.0  # the wait of a watch that must be held to its deadline


async def held_watch(reg: Registrar, cid: str, key: keypairs.PrivateKey, have: str) -> float:
    """How long a watch with `have` took to be answered (it must come back with files)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await asyncio.wait_for(reg.credentials(cid, key.public_key(), HELD, have), 10)
    assert answer.files is not None
    return loop.time() - started


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "watch-chain")
    return Issuer(key=key, cert=ca, cloud_cert=ca)


# -- the digest ---------------------------------------------------------------------------------


def test_the_chain_digest_separates_names_from_contents() -> None:
    """Boundary shifts between a name and its content, or between two files, and digits in
    names or contents that look like length prefixes, all give different digests."""
    own = cred.LAYOUTS[Role.CC].cert
    sets = [
        {"ab": "c"},
        {"a": "bc"},
        {"a": "b", "c": ""},
        {"a": "", "bc": ""},
        {"1:a": "1:b"},
        {"1": "a1:b"},
        {"a": "1:b1:c"},
        {"a": "1", "b": "1:c"},
        {"a": "é"},  # one character, two bytes: lengths are of characters
        {"a": "Ã©"},  # the same bytes read as Latin-1: two characters
    ]
    digests = {chain_digest(files, Role.CC) for files in sets}
    assert len(digests) == len(sets)
    # The component's own certificate is not part of it, whatever it holds.
    assert chain_digest({own: "x", "a": "b"}, Role.CC) == chain_digest({"a": "b"}, Role.CC)
    # A handover appearing (or going) is a change.
    base = {cred.CLOUD_CERT: "ca", own: "mine"}
    assert chain_digest(base, Role.CC) != chain_digest({**base, HANDOVER: ""}, Role.CC)


# -- who can make a watch return early ----------------------------------------------------------


async def test_a_request_signed_by_another_key_neither_answers_nor_resets_the_watch(
    tmp_path: Path, issuer: Issuer
) -> None:
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        told = dict(reg.desk._told_chain)
        intruder = fresh_key()
        for _ in range(20):  # a flood of forged watches and fetches naming the component
            for forged_have in (have, None, "00"):
                with pytest.raises(CredentialRefused) as refused:
                    await reg.credentials(cid, intruder.public_key(), 30, forged_have)
                assert refused.value.status == 403
        assert reg.desk._told_chain == told
        assert reg.desk._watching == {}
        # The component's own watch is still held to its deadline: nothing was reset.
        assert await held_watch(reg, cid, key, have) >= HELD * 0.9


async def test_unregistered_ids_leave_nothing_behind(tmp_path: Path, issuer: Issuer) -> None:
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        await reg.credentials(cid, key.public_key(), wait=0)
        before = dict(reg.desk._told_chain)
        for n in range(300):
            with pytest.raises(CredentialRefused) as refused:
                await reg.credentials(f"cc-ffff{n:08x}", fresh_key().public_key(), 30, "1")
            assert refused.value.status == 410
        # Without `have` the request is answered "not known" after its wait (0 here).
        for n in range(50):
            answer = await reg.credentials(f"walrus-ffff{n:08x}", key.public_key(), 0)
            assert answer.status is None and answer.files is None
        assert reg.desk._told_chain == before
        assert reg.desk._watching == {}


async def test_two_concurrent_watches_of_one_component_do_not_spin(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Two watches of one component, over and over: the shared "last told" entry never makes
    one answer at once because of the other (no ping-pong between them)."""
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        for _ in range(2):
            durations = await asyncio.gather(*(held_watch(reg, cid, key, have) for _ in range(2)))
            assert min(durations) >= HELD * 0.9


async def open_watches(
    reg: Registrar, cid: str, key: keypairs.PrivateKey, have: str, count: int
) -> list[asyncio.Task[CredentialAnswer]]:
    """`count` watches of `cid`, each waiting (the desk counts them) before this returns."""
    watches = [
        asyncio.ensure_future(reg.credentials(cid, key.public_key(), 30, have))
        for _ in range(count)
    ]
    for _ in range(200):
        if reg.desk._watching.get(cid) == count:
            break
        await asyncio.sleep(0.01)
    assert reg.desk._watching.get(cid) == count
    await asyncio.sleep(0.1)  # past their first look: each waits on the change event now
    assert not any(watch.done() for watch in watches)
    return watches


async def test_a_chain_change_answers_every_open_watch_of_the_component(
    tmp_path: Path, issuer: Issuer
) -> None:
    holder = [issuer]
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        reg.desk._issuer_for = lambda _role: holder[0]
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        stale, live = await open_watches(reg, cid, key, have, 2)
        holder[0] = replace(issuer, handover="a handover\n")
        reg.desk.chain_changed()
        answer = await asyncio.wait_for(stale, 5)  # the old connection's: nobody reads it
        assert answer.files is not None and answer.files[HANDOVER]
        done, _ = await asyncio.wait({live}, timeout=5)
        try:
            assert live in done, "the live watch still holds the old chain"
        finally:
            live.cancel()


async def test_a_registrar_restart_answers_the_first_watch_once_not_every_time(
    tmp_path: Path, issuer: Issuer
) -> None:
    clock = Clock()
    async with registrar_with_cc(tmp_path, issuer, clock) as (reg, cid, key):
        have = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
    async with registrar_with_cc(tmp_path, issuer, clock, cc=(cid, key)) as (reg, _, _):
        assert await held_watch(reg, cid, key, have) < HELD * 0.5  # unknown: at once
        assert await held_watch(reg, cid, key, have) >= HELD * 0.9
        assert await held_watch(reg, cid, key, have) >= HELD * 0.9


# -- deregistration --------------------------------------------------------------------------


async def test_after_deregistration_the_old_serial_is_refused_and_the_new_one_is_held(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Deregistered, then admitted again (the window is open, it is still announced): the
    old certificate's watch is refused, and the new certificate's watch is held, not
    answered at once or refused because of what the old registration was told."""
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        old = serial_of((await reg.credentials(cid, key.public_key(), wait=0)).files)
        await reg.deregister(reg.memory.records[cid])
        await reg.idle()
        with pytest.raises(CredentialRefused) as refused:
            await reg.credentials(cid, key.public_key(), 30, old)
        assert refused.value.status == 410
        files = None
        for _ in range(100):  # its key proven again, it registers again
            files = (await reg.credentials(cid, key.public_key(), 0)).files
            if files is not None:
                break
            await reg.idle()
            await asyncio.sleep(0.02)
        new = serial_of(files)
        assert new != old
        assert await held_watch(reg, cid, key, new) >= HELD * 0.9
        with pytest.raises(CredentialRefused) as refused:
            await reg.credentials(cid, key.public_key(), 30, old)
        assert refused.value.status == 410


async def test_what_deregistered_components_were_told_does_not_pile_up(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Entries of components no longer registered (deregistered, replaced, collected) are
    dropped once they outnumber the registered ones: the desk's memory stays bounded."""
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        await reg.credentials(cid, key.public_key(), wait=0)
        assert cid in reg.desk._told_chain
        await reg.close_install_window()
        await reg.deregister(reg.memory.records[cid])
        await reg.idle()
        record = reg.memory.records.get(cid)
        assert record is None or record.status is not Status.REGISTERED  # deregistered
        # As many stale entries as a long-lived registrar could gather:
        for n in range(500):
            reg.desk._tell_chain(f"nc-{n:012x}", "0" * 64)
        assert len(reg.desk._told_chain) <= 2 * len(reg.memory.records) + 65
        assert cid not in reg.desk._told_chain  # dropped at the first pruning


# -- an answer the component never received --------------------------------------------------


async def test_a_new_chain_answered_into_a_dead_connection_is_still_given_at_once(
    tmp_path: Path, issuer: Issuer
) -> None:
    holder = [issuer]
    async with registrar_with_cc(tmp_path, issuer) as (reg, cid, key):
        reg.desk._issuer_for = lambda _role: holder[0]
        first = await reg.credentials(cid, key.public_key(), wait=0)
        assert first.files is not None
        have, held = serial_of(first.files), chain_digest(first.files, Role.CC)
        zombie = asyncio.ensure_future(reg.credentials(cid, key.public_key(), 30, have))
        for _ in range(100):
            if reg.desk._watching.get(cid) == 1:
                break
            await asyncio.sleep(0.01)
        holder[0] = replace(issuer, handover="a handover\n")
        reg.desk.chain_changed()
        lost = await asyncio.wait_for(zombie, 5)  # written to a socket nobody reads
        assert lost.files is not None and lost.files[HANDOVER]
        # The component (restarted) still holds the old chain, and says so with its watch
        # (`chain`): answered at once with the new one.
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await asyncio.wait_for(
            reg.credentials(cid, key.public_key(), HELD, have, chain=held), 10
        )
        assert answer.files is not None and answer.files[HANDOVER]
        assert loop.time() - started < HELD * 0.5
        # An agent too old to say what it holds is measured against what it was told: the
        # lost answer then counts as received, and its watch is held (protocol.md, 8.1).
        assert await held_watch(reg, cid, key, have) >= HELD * 0.5
