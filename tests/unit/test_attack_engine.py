"""Adversarial tests of the registration engine (issue 6): limits at N+1, nasty inputs, races
between the operator and announcements, crashes mid-step, misbehaving hooks, timers, and
memory/store divergence.

Tests that pass document a property that held under attack. Tests marked
`xfail(strict=True, reason="BUG: ...")` demonstrate a defect: they assert the promised
behaviour and fail today. Negative checks wait for the event that proves the decision
(`Registrar.idle()`, a status, a journal row), never for a fixed time.

ATTACK_SEEDS=N runs the randomized memory/store test with N seeds (default 6; 80 were run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import UNADMITTED, Announcement, HookOutcome, HookRun, Record, Role, Status
from eucareg.core.trust import Task, announcement_proof_message, make_proof, parse_token
from eucareg.core.view import RegistrarSettings
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import certificates, keypairs
from eucareg.registrar.engine import CredentialRefused, Issuer, Registrar, Timing
from eucareg.registrar.hook_processes import group_alive
from eucareg.store.registry import Store, StoreBusy, sqlite_url
from tests.factories import KEYS, ann, fake_fingerprint, sighting

CLC = RegistrarSettings(registers=frozenset({Role.WALRUS, Role.CC, Role.SC}))
NC = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")
FAST = Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5)
SLOW_RETRY = Timing(retry_base=600, retry_max=600, hook_timeout=5)
REPO = Path(__file__).resolve().parents[2]


# -- helpers ---------------------------------------------------------------------------------


def write_hook(hook_dir: Path, name: str, body: str) -> None:
    hook_dir.mkdir(parents=True, exist_ok=True)
    path = hook_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def logging_hook(hook_dir: Path, name: str, log: Path, tail: str = "") -> None:
    line = '"$EUCAREG_ID $EUCAREG_ADDRESS $EUCAREG_FINGERPRINT rerun=$EUCAREG_RERUN"'
    write_hook(hook_dir, name, f"echo {line} >> {log}\n{tail}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def make(
    tmp_path: Path,
    settings: RegistrarSettings = NC,
    *,
    timing: Timing = FAST,
    issuer: Issuer | None = None,
    window: bool = True,
    self_registered: bool = True,
) -> Registrar:
    fatal: list[BaseException] = []
    reg = Registrar(
        Store(sqlite_url(tmp_path / "registry.db")),
        settings,
        hook_dir=tmp_path / "hooks",
        timing=timing,
        issuer_for=lambda _role: issuer,
        self_registered=lambda: self_registered,
        master_key=b"attack-master-key",
        on_fatal=fatal.append,
    )
    await reg.start()
    if window:
        await reg.open_install_window(3600)
    return reg


async def prove_all(reg: Registrar) -> None:
    """Every awaiting-key component whose key the factories made signs a request (its agent)."""
    for _ in range(4):
        await reg.idle()
        for record in list(reg.memory.records.values()):
            if record.status is Status.AWAITING_KEY and record.fingerprint in KEYS:
                key = KEYS[record.fingerprint].public_key()
                await reg.credentials(record.component_id, key, wait=0)
    await reg.idle()


async def until(
    reg: Registrar, check: Callable[[], bool], what: str, *, limit: float = 8.0
) -> None:
    """Wait for a positive condition (timers, hooks), proving keys as agents would."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await prove_all(reg)
        await asyncio.sleep(0.01)


async def poll(check: Callable[[], bool], what: str, *, limit: float = 8.0) -> None:
    """Wait for a positive condition while work is still running (a gated hook)."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def prove(reg: Registrar, component_id: str) -> None:
    """The component signs a request (without asking for a certificate)."""
    record = reg.record(component_id)
    assert record is not None and record.status is Status.AWAITING_KEY, record
    reg.key_proven(record)


def status(reg: Registrar, component_id: str) -> Status | None:
    record = reg.record(component_id)
    return None if record is None else record.status


async def assert_store_matches_memory(reg: Registrar) -> None:
    """What the registrar decides on is what a restart would load."""
    await reg.idle()
    snap = await asyncio.to_thread(reg.store.load)
    assert snap.records == reg.memory.records
    assert snap.tokens == reg.memory.tokens
    assert snap.trust == reg.memory.trust
    assert snap.certificates == reg.memory.certificates
    assert snap.revoked == reg.memory.revoked
    # The running count the flood cap reads agrees with the records.
    assert reg.memory.unadmitted == sum(r.status in UNADMITTED for r in snap.records.values())


def tokened(text: str, base: Announcement) -> Announcement:
    parsed = parse_token(text)
    stamp = int(time.time())
    stamped = replace(base, token_id=parsed.token_id, token_stamp=stamp)
    return replace(
        stamped, token_proof=make_proof(parsed.secret, announcement_proof_message(stamped, stamp))
    )


async def token(reg: Registrar, uses: int | None, role: Role = Role.NC) -> str:
    return await reg.create_token(role, None, 600, uses, "sha256:" + "c" * 64)


async def events_of(reg: Registrar, component_id: str) -> list[tuple[str, str]]:
    return [(e.kind, e.code) for e in await reg.events(component_id=component_id)]


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "attack")
    return Issuer(key=key, cert=ca, cloud_cert=ca)


# -- join tokens at N+1 ----------------------------------------------------------------------


@pytest.mark.parametrize(("uses", "racers"), [(1, 3), (2, 3), (3, 4)])
async def test_token_with_n_uses_admits_exactly_n_of_a_simultaneous_burst(
    tmp_path: Path, uses: int, racers: int
) -> None:
    reg = await make(tmp_path, window=False)
    text = await token(reg, uses)
    nodes = [tokened(text, ann(Role.NC, "c1")) for _ in range(racers)]
    for node in nodes:  # all in one loop turn: nothing can run in between
        reg.on_sighting(sighting(node))
    await prove_all(reg)
    got = sorted(str(status(reg, n.component_id)) for n in nodes)
    assert got.count("registered") == uses, got
    assert got.count("refused") == racers - uses, got
    [tok] = reg.tokens()
    assert len(tok.used_by) == uses
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_token_use_released_by_an_expired_admission_goes_to_the_refused_racer_at_once(
    tmp_path: Path,
) -> None:
    """2 uses, 3 racers; one admitted node never proves its key: when its wait expires, its
    use is released and the racer that was refused `token-used-up` is admitted by itself."""
    reg = await make(tmp_path, window=False, timing=replace(FAST, pending_timeout=0.4))
    text = await token(reg, 2)
    silent = tokened(text, ann(Role.NC, "c1", fingerprint=fake_fingerprint("never-proves")))
    good = tokened(text, ann(Role.NC, "c1"))
    late = tokened(text, ann(Role.NC, "c1"))
    for node in (silent, good, late):
        reg.on_sighting(sighting(node))
    await prove_all(reg)
    assert status(reg, silent.component_id) is Status.AWAITING_KEY
    assert status(reg, good.component_id) is Status.REGISTERED
    assert status(reg, late.component_id) is Status.REFUSED
    await until(reg, lambda: status(reg, late.component_id) is Status.REGISTERED, "late admitted")
    assert status(reg, silent.component_id) is Status.EXPIRED
    [tok] = reg.tokens()
    assert tok.used_by == {good.component_id, late.component_id}
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_revoked_token_admits_no_one_more_and_its_registrations_stay(
    tmp_path: Path,
) -> None:
    reg = await make(tmp_path, window=False)
    text = await token(reg, 5)
    first = tokened(text, ann(Role.NC, "c1"))
    reg.on_sighting(sighting(first))
    await prove_all(reg)
    assert status(reg, first.component_id) is Status.REGISTERED
    [tok] = reg.tokens()
    await reg.revoke_token(tok.token_id)
    second = tokened(text, ann(Role.NC, "c1"))
    reg.on_sighting(sighting(second))
    await prove_all(reg)
    refused = reg.record(second.component_id)
    assert refused is not None and refused.status is Status.REFUSED
    assert ("refused", "token-revoked") in await events_of(reg, second.component_id)
    assert status(reg, first.component_id) is Status.REGISTERED
    with pytest.raises(KeyError):
        await reg.revoke_token(tok.token_id)  # twice: refused, nothing written
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_failed_hook_keeps_its_token_use_and_deregistration_hands_it_on_at_once(
    tmp_path: Path,
) -> None:
    """1 use: A is admitted and its hook fails (it keeps the use while retried); B is refused
    `token-used-up`. Deregistering A gives the use back and B is admitted with no new
    announcement."""
    write_hook(tmp_path / "hooks", "node", "echo boom >&2; exit 3")
    reg = await make(tmp_path, window=False, timing=SLOW_RETRY)
    text = await token(reg, 1)
    a = tokened(text, ann(Role.NC, "c1"))
    reg.on_sighting(sighting(a))
    await prove_all(reg)
    failed = reg.record(a.component_id)
    assert failed is not None and failed.status is Status.FAILED
    assert "exit 3" in failed.reason and "boom" in failed.reason and "retry" in failed.reason
    b = tokened(text, ann(Role.NC, "c1"))
    reg.on_sighting(sighting(b))
    await prove_all(reg)
    assert status(reg, b.component_id) is Status.REFUSED
    write_hook(tmp_path / "hooks", "node", "exit 0")
    reg.on_sighting(Sighting(a.instance, Change.REMOVED))  # A goes away, then is removed
    await reg.deregister(reg.find(a.component_id, None))
    await prove_all(reg)
    assert status(reg, b.component_id) is Status.REGISTERED
    [tok] = reg.tokens()
    assert tok.used_by == {b.component_id} and tok.spent_by == {a.component_id}
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_token_use_released_by_rejecting_a_failed_component_goes_to_the_refused_racer(
    tmp_path: Path,
) -> None:
    write_hook(tmp_path / "hooks", "node", "exit 3")
    reg = await make(tmp_path, window=False, timing=SLOW_RETRY)
    text = await token(reg, 1)
    a = tokened(text, ann(Role.NC, "c1"))
    reg.on_sighting(sighting(a))
    await prove_all(reg)
    assert status(reg, a.component_id) is Status.FAILED
    b = tokened(text, ann(Role.NC, "c1"))
    reg.on_sighting(sighting(b))
    await prove_all(reg)
    assert status(reg, b.component_id) is Status.REFUSED
    write_hook(tmp_path / "hooks", "node", "exit 0")
    await reg.reject(reg.find(a.component_id, None))
    await prove_all(reg)  # every effect of the rejection has run
    [tok] = reg.tokens()
    assert a.component_id not in tok.used_by  # the use was released...
    assert status(reg, b.component_id) is Status.REGISTERED  # ...but nobody was told
    await reg.close()


# -- nasty inputs ----------------------------------------------------------------------------


async def test_a_trailing_newline_does_not_make_a_second_cc_for_a_taken_cluster(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "cluster", log)
    reg = await make(tmp_path, CLC)
    genuine = ann(Role.CC, "c1")
    reg.on_sighting(sighting(genuine))
    await prove_all(reg)
    assert status(reg, genuine.component_id) is Status.REGISTERED
    rogue = ann(Role.CC, "c1")
    seen = sighting(rogue)
    reg.on_sighting(Sighting(seen.instance, seen.change, {**seen.txt, "cluster": "c1\n"}, ()))
    await prove_all(reg)
    holders = [
        r
        for r in reg.memory.records.values()
        if r.role is Role.CC and r.cluster is not None and r.cluster.strip() == "c1"
        if r.status is Status.REGISTERED
    ]
    assert [r.component_id for r in holders] == [genuine.component_id]
    await reg.close()


@pytest.mark.parametrize(
    ("key", "value"),
    [("id", "abcdefgh\n"), ("fp", "sha256:" + "a" * 64 + "\n"), ("tok", "abcdefghijkl\n")],
)
async def test_values_with_trailing_newlines_are_rejected_at_decode(key: str, value: str) -> None:
    from eucareg.core.txt import Rejected, decode

    base = sighting(ann(Role.CC, "c1"))
    txt = {**base.txt, key: value}
    if key == "tok":
        txt.update(tts="1", tproof="A" * 43)
    assert isinstance(decode(base.instance, txt, ()), Rejected)


async def test_an_address_with_a_trailing_newline_is_rejected_at_decode() -> None:
    from eucareg.core.txt import Rejected, decode

    base = sighting(ann(Role.CC, "c1"))
    assert isinstance(decode(base.instance, {**base.txt, "addr": "10.1.2.3\n"}, ()), Rejected)


# -- races between the operator and announcements -------------------------------------------


async def test_approve_while_withdrawn_admits_from_the_record_and_expires_cleanly(
    tmp_path: Path,
) -> None:
    reg = await make(tmp_path, window=False, timing=replace(FAST, pending_timeout=0.3))
    node = ann(Role.NC, "c1", fingerprint=fake_fingerprint("approve-while-withdrawn"))
    reg.on_sighting(sighting(node))
    await reg.idle()
    reg.on_sighting(Sighting(node.instance, Change.REMOVED))
    approved = await reg.approve(reg.find(node.component_id, None))
    assert approved.approved
    await reg.idle()
    record = reg.record(node.component_id)
    assert record is not None and record.status is Status.AWAITING_KEY, record
    assert record.admitted_by == "approval"
    # It never proves its key (it is gone): the wait expires and frees the slot.
    await until(reg, lambda: status(reg, node.component_id) is Status.EXPIRED, "expiry")
    # Back on the network: a fresh sighting revives it; the approval still stands.
    reg.on_sighting(sighting(node))
    await reg.idle()
    revived = reg.record(node.component_id)
    assert revived is not None and revived.status is Status.AWAITING_KEY
    reg.key_proven(revived)
    await until(reg, lambda: status(reg, node.component_id) is Status.REGISTERED, "registered")
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_deregister_twice_concurrently_deregisters_once(tmp_path: Path) -> None:
    reg = await make(tmp_path)
    node = ann(Role.NC, "c1")
    reg.on_sighting(sighting(node))
    await prove_all(reg)
    reg.on_sighting(Sighting(node.instance, Change.REMOVED))  # else it is re-admitted at once
    record = reg.find(node.component_id, None)
    results = await asyncio.gather(
        reg.deregister(record), reg.deregister(record), return_exceptions=True
    )
    # One deregisters (and hands back its deregister hook's outcome to come), one finds
    # nothing left.
    assert sum(isinstance(r, asyncio.Future) for r in results) == 1, results
    assert sum(isinstance(r, KeyError) for r in results) == 1, results
    kinds = [k for k, _ in await events_of(reg, node.component_id)]
    assert kinds.count("deregistered") == 1
    assert reg.record(node.component_id) is None
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_reject_then_same_id_with_a_new_key_is_an_identity_conflict(
    tmp_path: Path,
) -> None:
    reg = await make(tmp_path, window=False)
    node = ann(Role.NC, "c1")
    reg.on_sighting(sighting(node))
    await reg.idle()
    await reg.reject(reg.find(node.component_id, None))
    reg.on_sighting(Sighting(node.instance, Change.REMOVED))
    again = ann(Role.NC, "c1", component_id=node.component_id)  # new key, new address
    await reg.open_install_window(60)  # even with the doors open
    reg.on_sighting(sighting(again))
    await prove_all(reg)
    record = reg.record(node.component_id)
    assert record is not None and record.status is Status.REJECTED
    assert record.fingerprint == node.fingerprint
    assert ("refused", "identity-conflict") in await events_of(reg, node.component_id)
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_same_id_two_keys_at_once_first_wins_and_the_hook_sees_only_it(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log)
    reg = await make(tmp_path)
    first = ann(Role.NC, "c1")
    second = ann(Role.NC, "c1", component_id=first.component_id, instance="other-instance")
    reg.on_sighting(sighting(first))
    reg.on_sighting(sighting(second))
    await prove_all(reg)
    # The second key also "signs a request": it is told the id belongs to another key.
    with pytest.raises(CredentialRefused) as refused:
        await reg.credentials(first.component_id, KEYS[second.fingerprint].public_key(), 0)
    assert refused.value.status == 403
    assert lines(log) == [f"{first.component_id} {first.address} {first.fingerprint} rerun=0"]
    assert reg.live[first.component_id].fingerprint == first.fingerprint
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_one_key_two_ids_never_both_registered_even_across_a_failed_hook(
    tmp_path: Path,
) -> None:
    """A failed record holds no slot (and is not 'claimed'): a second id with the same key
    may then be admitted, but the two are never registered together."""
    write_hook(tmp_path / "hooks", "node", "exit 3")
    reg = await make(tmp_path, timing=replace(FAST, retry_base=0.1, retry_max=0.1))
    a = ann(Role.NC, "c1")
    b = ann(Role.NC, "c1", fingerprint=a.fingerprint)
    reg.on_sighting(sighting(a))
    await prove_all(reg)
    assert status(reg, a.component_id) is Status.FAILED
    write_hook(tmp_path / "hooks", "node", "exit 0")
    reg.on_sighting(sighting(b))
    await prove_all(reg)
    await until(
        reg,
        lambda: status(reg, a.component_id) is not Status.FAILED,
        "a's retry",
    )
    both = {status(reg, a.component_id), status(reg, b.component_id)}
    assert both == {Status.REGISTERED, Status.REFUSED}, both
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_deregister_while_the_hook_runs_leaves_it_deregistered_and_frees_the_slot(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    log = tmp_path / "hooks.log"
    logging_hook(
        tmp_path / "hooks", "cluster", log, f"while [ ! -f {release} ]; do sleep 0.02; done"
    )
    reg = await make(tmp_path, CLC)
    first = ann(Role.CC, "c1")
    reg.on_sighting(sighting(first))
    await poll(lambda: status(reg, first.component_id) is Status.AWAITING_KEY, "admission")
    prove(reg, first.component_id)
    await poll(lambda: len(lines(log)) == 1, "the hook to start")
    assert status(reg, first.component_id) is Status.REGISTERING
    reg.on_sighting(Sighting(first.instance, Change.REMOVED))
    await reg.deregister(reg.find(first.component_id, None))
    genuine = ann(Role.CC, "c1")
    reg.on_sighting(sighting(genuine))
    await poll(lambda: status(reg, genuine.component_id) is Status.AWAITING_KEY, "admission")
    prove(reg, genuine.component_id)
    # The cluster name came free at once, and hooks are locked per component: the genuine
    # CC's hook runs while the deregistered one's still hangs.
    await poll(lambda: len(lines(log)) == 2, "the genuine CC's hook to start")
    release.touch()
    await until(reg, lambda: status(reg, genuine.component_id) is Status.REGISTERED, "genuine")
    await reg.idle()
    assert reg.record(first.component_id) is None  # the late outcome changed only the journal
    runs = await reg.hook_runs(first.component_id)
    # Its `cluster` hook, then its deregister hook, which waited for it (none installed here).
    assert [r.outcome for r in runs] == [HookOutcome.OK, HookOutcome.SKIPPED]
    assert runs[1].hook.endswith("/deregister-cluster")
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_an_outcome_of_a_run_for_a_deregistered_record_is_not_applied_to_its_successor(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log, f"while [ ! -f {release} ]; do sleep 0.02; done")
    reg = await make(tmp_path)
    old = ann(Role.NC, "c1")
    reg.on_sighting(sighting(old))
    await poll(lambda: status(reg, old.component_id) is Status.AWAITING_KEY, "admission")
    prove(reg, old.component_id)
    await poll(lambda: len(lines(log)) == 1, "the hook to start")
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    await reg.deregister(reg.find(old.component_id, None))
    # The same id comes back from another machine with another key (deregistration freed it).
    new = ann(Role.NC, "c1", component_id=old.component_id, instance="new-instance")
    reg.on_sighting(sighting(new))
    await poll(lambda: status(reg, new.component_id) is Status.AWAITING_KEY, "admission")
    prove(reg, new.component_id)
    await poll(lambda: status(reg, new.component_id) is Status.REGISTERING, "registering")
    release.touch()
    await until(reg, lambda: status(reg, new.component_id) is Status.REGISTERED, "registered")
    await reg.idle()
    # A record is registered only by a hook run with what it accepted (its key and address).
    assert f"{new.component_id} {new.address} {new.fingerprint} rerun=0" in lines(log)
    await reg.close()


async def test_a_failing_hook_frees_the_cluster_name_for_the_refused_genuine_cc_at_once(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    squatter, genuine = ann(Role.CC, "c1"), ann(Role.CC, "c1")
    write_hook(
        tmp_path / "hooks",
        "cluster",
        f'[ "$EUCAREG_ID" = "{genuine.component_id}" ] && exit 0\n'
        f"while [ ! -f {release} ]; do sleep 0.02; done\nexit 7",
    )
    reg = await make(tmp_path, CLC, timing=SLOW_RETRY)
    reg.on_sighting(sighting(squatter))
    await poll(lambda: status(reg, squatter.component_id) is Status.AWAITING_KEY, "admission")
    prove(reg, squatter.component_id)
    await poll(lambda: bool(reg.hooks._running), "the squatter's hook")
    reg.on_sighting(sighting(genuine))
    refused = reg.record(genuine.component_id)
    assert refused is not None and refused.status is Status.REFUSED
    assert "taken by" in refused.reason
    release.touch()  # the squatter's hook fails; nothing else happens on the network
    await until(reg, lambda: status(reg, genuine.component_id) is Status.REGISTERED, "genuine")
    assert status(reg, squatter.component_id) is Status.FAILED
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_hook_that_raises_inside_eucareg_fails_with_reason_and_holds_no_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = await make(tmp_path, CLC, timing=SLOW_RETRY)
    real_run = reg.hooks.run
    broken = ann(Role.CC, "c1")

    async def run(record: Record, **kwargs: object) -> HookRun:
        if record.component_id == broken.component_id:
            raise RuntimeError("disk full\nsecond line")
        return await real_run(record, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reg.hooks, "run", run)
    reg.on_sighting(sighting(broken))
    await prove_all(reg)
    record = reg.record(broken.component_id)
    assert record is not None and record.status is Status.FAILED
    assert "cannot run the hook" in record.reason and "retry" in record.reason
    genuine = ann(Role.CC, "c1")
    reg.on_sighting(sighting(genuine))
    await prove_all(reg)
    assert status(reg, genuine.component_id) is Status.REGISTERED
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_hook_ignoring_sigterm_and_hanging_times_out_dead_and_frees_the_cluster(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    body = f"trap '' TERM HUP INT\n(trap '' TERM; sleep 60) &\necho $! $$ > {pids}\nwait\nwait"
    write_hook(tmp_path / "hooks", "cluster", body)
    reg = await make(tmp_path, CLC, timing=replace(SLOW_RETRY, hook_timeout=0.4))
    stubborn = ann(Role.CC, "c1")
    started = time.monotonic()
    reg.on_sighting(sighting(stubborn))
    await until(reg, lambda: status(reg, stubborn.component_id) is Status.FAILED, "timeout")
    assert time.monotonic() - started < 4
    record = reg.record(stubborn.component_id)
    assert record is not None and "timeout" in record.reason and "retry" in record.reason
    [run] = await reg.hook_runs(stubborn.component_id)
    assert run.outcome is HookOutcome.TIMEOUT and run.pgid is not None
    assert not group_alive(run.pgid, run.proc_start)
    write_hook(tmp_path / "hooks", "cluster", "exit 0")
    genuine = ann(Role.CC, "c1")
    reg.on_sighting(sighting(genuine))
    await prove_all(reg)
    assert status(reg, genuine.component_id) is Status.REGISTERED
    await reg.close()


async def test_hook_that_forks_a_daemon_and_exits_is_done_at_once_and_close_is_prompt(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "daemon.pid"
    # The daemon keeps stdout/stderr open and stays in the hook's process group.
    write_hook(tmp_path / "hooks", "walrus", f"sleep 30 &\necho $! > {pid_file}\nexit 0")
    reg = await make(tmp_path, CLC)
    walrus = ann(Role.WALRUS)
    started = time.monotonic()
    reg.on_sighting(sighting(walrus))
    await prove_all(reg)
    assert status(reg, walrus.component_id) is Status.REGISTERED
    assert time.monotonic() - started < 3
    daemon = int(pid_file.read_text())
    try:
        t0 = time.monotonic()
        await reg.close()
        assert time.monotonic() - t0 < 3
    finally:
        os.kill(daemon, signal.SIGKILL)


async def test_hook_that_closes_stdin_and_reads_it_runs_normally(tmp_path: Path) -> None:
    write_hook(tmp_path / "hooks", "walrus", "cat >/dev/null; exec 0<&-; read x; exit 0")
    reg = await make(tmp_path, CLC)
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus))
    await prove_all(reg)
    assert status(reg, walrus.component_id) is Status.REGISTERED
    await reg.close()


async def test_hook_exiting_111_after_the_gate_is_an_ordinary_failure(tmp_path: Path) -> None:
    write_hook(tmp_path / "hooks", "walrus", "exit 111")
    reg = await make(tmp_path, CLC, timing=SLOW_RETRY)
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus))
    await prove_all(reg)
    record = reg.record(walrus.component_id)
    assert record is not None and record.status is Status.FAILED and "exit 111" in record.reason
    await reg.close()


# -- reinstall / replacement -----------------------------------------------------------------


async def test_an_unproven_newcomer_does_not_revoke_the_silent_component_it_would_replace(
    tmp_path: Path, issuer: Issuer
) -> None:
    reg = await make(tmp_path, replace(NC, replace_after=0.2), issuer=issuer)
    old = ann(Role.NC, "c1", address="10.77.200.1")
    reg.on_sighting(sighting(old))
    await prove_all(reg)
    answer = await reg.credentials(old.component_id, KEYS[old.fingerprint].public_key(), 0)
    assert answer.files is not None
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))  # powered off for maintenance
    forged = ann(Role.NC, "c1", address="10.77.200.1", fingerprint=fake_fingerprint("nokey"))
    reg.on_sighting(sighting(forged))
    await until(reg, lambda: status(reg, forged.component_id) is Status.AWAITING_KEY, "admission")
    assert status(reg, old.component_id) is Status.REGISTERED
    assert reg.memory.revoked == set()
    await reg.close()


async def test_an_old_identity_heard_again_before_the_newcomer_proves_its_key_stays(
    tmp_path: Path, issuer: Issuer
) -> None:
    """Admitted to replace a silent machine, the newcomer proves its key only after the old
    machine was heard again: the old one keeps its registration, the newcomer is refused."""
    reg = await make(tmp_path, replace(NC, replace_after=0.2), issuer=issuer)
    old = ann(Role.NC, "c1", address="10.77.202.1")
    reg.on_sighting(sighting(old))
    await prove_all(reg)
    assert status(reg, old.component_id) is Status.REGISTERED
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    newcomer = ann(Role.NC, "c1", address="10.77.202.1")
    reg.on_sighting(sighting(newcomer))

    def admitted() -> bool:
        record = reg.record(newcomer.component_id)
        return record is not None and record.status is Status.AWAITING_KEY

    deadline = time.monotonic() + 8
    while not admitted():  # positive wait (no key proofs here: prove_all would prove it)
        assert time.monotonic() < deadline, "the newcomer was never admitted"
        await asyncio.sleep(0.01)
    reg.on_sighting(sighting(old))  # the old machine was only rebooting
    prove(reg, newcomer.component_id)
    await reg.idle()
    assert status(reg, old.component_id) is Status.REGISTERED
    assert status(reg, newcomer.component_id) is Status.REFUSED
    assert reg.memory.revoked == set()
    await assert_store_matches_memory(reg)
    await reg.close()


async def test_replaced_component_coming_back_is_refused_while_the_newcomer_is_heard(
    tmp_path: Path, issuer: Issuer
) -> None:
    reg = await make(tmp_path, replace(NC, replace_after=0.2), issuer=issuer)
    old = ann(Role.NC, "c1", address="10.77.201.1")
    reg.on_sighting(sighting(old))
    await prove_all(reg)
    key = KEYS[old.fingerprint]
    answer = await reg.credentials(old.component_id, key.public_key(), 0)
    assert answer.files is not None
    serial = format(certificates.load_cert_pem(answer.files["node-cert.pem"]).serial_number, "x")
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    newcomer = ann(Role.NC, "c1", address="10.77.201.1")
    reg.on_sighting(sighting(newcomer))
    await until(reg, lambda: status(reg, newcomer.component_id) is Status.REGISTERED, "new")
    assert status(reg, old.component_id) is Status.REPLACED
    assert serial in reg.memory.revoked
    # The old machine was not reinstalled after all: it comes back and is told no.
    reg.on_sighting(sighting(old))
    await prove_all(reg)
    assert status(reg, old.component_id) is Status.REFUSED
    with pytest.raises(CredentialRefused) as gone:
        await reg.credentials(old.component_id, key.public_key(), 0, serial)
    assert gone.value.status == 410
    await assert_store_matches_memory(reg)
    await reg.close()


# -- certificates ----------------------------------------------------------------------------


async def test_a_certificate_signed_across_a_deregistration_is_not_handed_to_the_old_key(
    tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = await make(tmp_path, issuer=issuer)
    old = ann(Role.NC, "c1")
    reg.on_sighting(sighting(old))
    await prove_all(reg)
    assert status(reg, old.component_id) is Status.REGISTERED
    entered, gate = threading.Event(), threading.Event()
    real = certificates.issue_certificate

    def slow_issue(**kwargs: object) -> object:
        if not entered.is_set():
            entered.set()
            gate.wait(10)
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(certificates, "issue_certificate", slow_issue)
    old_key = KEYS[old.fingerprint].public_key()
    asking = asyncio.create_task(reg.credentials(old.component_id, old_key, 0))
    await asyncio.to_thread(entered.wait, 10)
    reg.on_sighting(Sighting(old.instance, Change.REMOVED))
    await reg.deregister(reg.find(old.component_id, None))
    new = ann(Role.NC, "c1", component_id=old.component_id, instance="new-instance")
    reg.on_sighting(sighting(new))
    await reg.idle()
    record = reg.record(new.component_id)
    assert record is not None and record.status is Status.AWAITING_KEY
    reg.key_proven(record)  # the new machine signs (without asking for a certificate yet)
    await until(reg, lambda: status(reg, new.component_id) is Status.REGISTERED, "new")
    gate.set()
    try:
        answer = await asking
    except CredentialRefused:
        return  # the promised outcome: the old key is told to ask again, and gets nothing
    assert answer.files is None, "a deregistered key was handed a certificate"
    await reg.close()


async def test_no_effect_before_durable_and_a_crash_then_loses_only_the_undecided(
    tmp_path: Path,
) -> None:
    """Writes that never reach the disk (a crash before the commit) have no effects: no hook
    ran. A registrar started on the same file (the first one never closed) decides afresh
    and registers each component exactly once."""
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log)
    first = await make(tmp_path)
    lost: list[asyncio.Future[None]] = []

    def never_durable(change: object) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lost.append(future)
        return future

    first.writer.commit = never_durable  # type: ignore[method-assign]
    nodes = [ann(Role.NC, "c1") for _ in range(3)]
    for node in nodes:
        first.proven.add((node.component_id, node.fingerprint))
        first.on_sighting(sighting(node))
    assert {status(first, n.component_id) for n in nodes} == {Status.REGISTERING}
    for _ in range(20):
        await asyncio.sleep(0)
    assert lines(log) == [] and first.hooks._running == {}
    # The crash: the first registrar is never closed; a second one opens the same file. A
    # dead process's flock is dropped by the kernel; here the first one lives on, so drop it.
    first.store.release()
    second = await make(tmp_path, window=False)
    assert all(second.record(n.component_id) is None for n in nodes)
    for node in nodes:
        second.on_sighting(sighting(node))
    await prove_all(second)
    assert {status(second, n.component_id) for n in nodes} == {Status.REGISTERED}
    assert sorted(line.split()[0] for line in lines(log)) == sorted(n.component_id for n in nodes)
    await assert_store_matches_memory(second)
    await second.close()
    for task in list(first._tasks):
        task.cancel()
    await asyncio.gather(*first._tasks, return_exceptions=True)
    await first.lag.close()
    first.admin.close()
    await first.writer.close()


# -- kill -9 and crash points (in a child process: the switch calls os._exit) ----------------

CHILD = """
import asyncio, ipaddress, json, sys
from pathlib import Path
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.core.view import RegistrarSettings
from eucareg.registrar.engine import Registrar, Timing
from eucareg.store.registry import Store, sqlite_url

async def main() -> None:
    db, hooks, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    reg = Registrar(
        Store(sqlite_url(Path(db))),
        RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1"),
        hook_dir=Path(hooks),
        timing=Timing(hook_timeout=30, retry_base=0.05, retry_max=0.2),
        issuer_for=lambda _role: None,
        self_registered=lambda: True,
        master_key=b"attack-master-key",
    )
    await reg.start()
    await reg.open_install_window(3600)
    for item in spec:
        reg.proven.add((item["id"], item["fp"]))
        reg.submit(Announcement(
            role=Role.NC, component_id=item["id"], cluster="c1",
            state=AnnouncedState.READY, address=ipaddress.ip_address(item["addr"]),
            fingerprint=item["fp"], api_port=None, eucavers="3.4", instance=item["id"],
        ))
    print("submitted", flush=True)
    await reg.idle()
    await asyncio.sleep(60)

asyncio.run(main())
"""


def start_child(
    tmp_path: Path, nodes: list[Announcement], crash_at: str | None = None
) -> subprocess.Popen[str]:
    spec = [{"id": n.component_id, "fp": n.fingerprint, "addr": str(n.address)} for n in nodes]
    env = {k: v for k, v in os.environ.items() if k != "EUCAREG_CRASH_AT"}
    if crash_at:
        env["EUCAREG_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "registry.db"),
            str(tmp_path / "hooks"),
            json.dumps(spec),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def crash_nodes(n: int) -> list[Announcement]:
    return [ann(Role.NC, "c1", fingerprint=fake_fingerprint(f"crash-{i}")) for i in range(n)]


async def restart_and_settle(tmp_path: Path, nodes: list[Announcement]) -> Registrar:
    reg = await make(tmp_path, window=False)
    for node in nodes:
        reg.proven.add((node.component_id, node.fingerprint))  # its agent signs again
        reg.on_sighting(sighting(node))
    await until(
        reg,
        lambda: all(status(reg, n.component_id) is Status.REGISTERED for n in nodes),
        "every node registered after the restart",
    )
    return reg


async def assert_registered_exactly_once(
    reg: Registrar, nodes: list[Announcement], log: Path
) -> dict[str, list[str]]:
    await reg.idle()
    assert not [r for r in reg.memory.records.values() if r.status is Status.REGISTERING]
    runs_by: dict[str, list[str]] = {}
    for line in lines(log):
        if line.startswith("nc-"):
            runs_by.setdefault(line.split()[0], []).append(line.split()[-1])
    for node in nodes:
        kinds = [k for k, _ in await events_of(reg, node.component_id)]
        assert kinds.count("registered") == 1, (node.component_id, kinds)
        runs = await reg.hook_runs(node.component_id)
        assert [r.outcome for r in runs].count(HookOutcome.OK) == 1, runs
        assert not [r for r in runs if r.outcome is HookOutcome.RUNNING], runs
        # At least once; a second run only as a marked re-run.
        started = runs_by.get(node.component_id, [])
        assert 1 <= len(started) <= 2, started
        assert started.count("rerun=0") <= 1, started
        if len(started) == 2:
            assert started[1] == "rerun=1", started
    await assert_store_matches_memory(reg)
    return runs_by


async def test_kill_9_while_hooks_run_kills_the_orphans_and_reruns_each_once_marked(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    # The first run hangs (until killed); the marked re-run succeeds at once.
    logging_hook(tmp_path / "hooks", "node", log, '[ "$EUCAREG_RERUN" = 1 ] || sleep 60')
    nodes = crash_nodes(3)
    child = start_child(tmp_path, nodes)
    try:
        await poll(lambda: len(lines(log)) == 3, "three hooks running", limit=20)
        # Journal rows are durable before the gate opens, so all three are on disk now.
        child.kill()
        child.wait(10)
    finally:
        child.kill()
    seed = Store(sqlite_url(tmp_path / "registry.db"))
    running = [r for r in seed.hook_runs() if r.outcome is HookOutcome.RUNNING]
    seed.close()
    assert len(running) == 3
    assert all(r.pgid is not None and group_alive(r.pgid, r.proc_start) for r in running)
    reg = await restart_and_settle(tmp_path, nodes)
    assert all(not group_alive(r.pgid, r.proc_start) for r in running if r.pgid is not None)
    runs_by = await assert_registered_exactly_once(reg, nodes, log)
    assert all(v == ["rerun=0", "rerun=1"] for v in runs_by.values()), runs_by
    for node in nodes:
        assert ("hook", "hook-interrupted") in await events_of(reg, node.component_id)
    await reg.close()


@pytest.mark.parametrize("point", ["before-hook", "after-hook", "after-commit", "after-hook:2"])
async def test_crash_point_then_restart_registers_every_node_exactly_once(
    tmp_path: Path, point: str
) -> None:
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log)
    nodes = crash_nodes(3)
    child = start_child(tmp_path, nodes, crash_at=point)
    try:
        assert child.wait(30) == 86, "the crash point was not reached"
    finally:
        child.kill()
    reg = await restart_and_settle(tmp_path, nodes)
    await assert_registered_exactly_once(reg, nodes, log)
    await reg.close()


async def test_a_hook_that_never_passed_its_gate_runs_once_at_restart_marked(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log)
    nodes = crash_nodes(1)
    child = start_child(tmp_path, nodes, crash_at="before-hook")
    try:
        assert child.wait(30) == 86
    finally:
        child.kill()
    assert lines(log) == []  # the gate read EOF: nothing ran
    reg = await restart_and_settle(tmp_path, nodes)
    await reg.idle()
    # The restart cannot tell a closed gate from a run that happened: a marked re-run
    # (docs/registration.md), and exactly one run.
    assert [line.split()[-1] for line in lines(log)] == ["rerun=1"]
    codes = [e.code for e in await reg.events() if e.component_id == nodes[0].component_id]
    assert "hook-interrupted" in codes
    await reg.close()


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.15, 0.3])
async def test_kill_9_at_an_arbitrary_moment_converges(tmp_path: Path, delay: float) -> None:
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log, "sleep 0.1")
    nodes = crash_nodes(4)
    child = start_child(tmp_path, nodes)
    try:
        assert child.stdout is not None
        await asyncio.to_thread(child.stdout.readline)  # started; hooks may be running
        await asyncio.sleep(delay)  # the moment of the crash, not a negative check
        child.kill()
        child.wait(10)
    finally:
        child.kill()
    reg = await restart_and_settle(tmp_path, nodes)
    await assert_registered_exactly_once(reg, nodes, log)
    await reg.close()


async def test_stop_kills_the_running_hook_group_and_the_next_start_reruns_it_marked(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    pid_file = tmp_path / "child.pid"
    logging_hook(
        tmp_path / "hooks",
        "node",
        log,
        f'[ "$EUCAREG_RERUN" = 1 ] && exit 0\n(trap "" TERM; sleep 60) &\necho $! > {pid_file}'
        "\ntrap '' TERM\nwait",
    )
    reg = await make(tmp_path)
    node = ann(Role.NC, "c1")
    reg.on_sighting(sighting(node))
    await poll(lambda: status(reg, node.component_id) is Status.AWAITING_KEY, "admission")
    prove(reg, node.component_id)
    await poll(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the hook")
    child = int(pid_file.read_text())
    t0 = time.monotonic()
    await reg.close()  # SIGTERM of the agent
    assert time.monotonic() - t0 < 4
    assert not _alive(child)
    reg.store.close()
    again = await restart_and_settle(tmp_path, [node])
    assert [line.split()[-1] for line in lines(log)] == ["rerun=0", "rerun=1"]
    assert ("hook", "hook-interrupted") in await events_of(again, node.component_id)
    await again.close()


async def test_crash_after_a_hook_that_left_a_daemon_kills_the_daemon_at_restart(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    pid_file = tmp_path / "daemon.pid"
    logging_hook(
        tmp_path / "hooks",
        "node",
        log,
        f'[ "$EUCAREG_RERUN" = 1 ] || {{ sleep 60 & echo $! > {pid_file}; }}\nexit 0',
    )
    nodes = crash_nodes(1)
    child = start_child(tmp_path, nodes, crash_at="after-hook")
    try:
        assert child.wait(30) == 86
    finally:
        child.kill()
    daemon = int(pid_file.read_text())
    assert _alive(daemon)
    reg = await restart_and_settle(tmp_path, nodes)
    try:
        assert not _alive(daemon)
        await assert_registered_exactly_once(reg, nodes, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)
    await reg.close()


async def test_a_second_registrar_on_a_database_in_use_does_not_kill_the_live_ones_hooks(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    log = tmp_path / "hooks.log"
    logging_hook(tmp_path / "hooks", "node", log, f"while [ ! -f {release} ]; do sleep 0.02; done")
    first = await make(tmp_path)
    node = ann(Role.NC, "c1")
    first.on_sighting(sighting(node))
    await poll(lambda: status(first, node.component_id) is Status.AWAITING_KEY, "admission")
    prove(first, node.component_id)
    await poll(lambda: len(lines(log)) == 1, "the hook")
    second: Registrar | None = None
    try:
        with pytest.raises(StoreBusy, match="in use by another registrar"):
            second = await make(tmp_path, window=False)
        release.touch()
        await first.idle()
        [run, *_] = await first.hook_runs(node.component_id)
        assert run.outcome is HookOutcome.OK, run  # the live hook was not killed
    finally:
        release.touch()
        if second is not None:
            await second.close()
        await first.close()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie awaiting its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# -- timers ----------------------------------------------------------------------------------


async def test_a_stale_expiry_timer_does_not_expire_a_wait_that_was_extended(
    tmp_path: Path,
) -> None:
    reg = await make(tmp_path, CLC, timing=replace(FAST, pending_timeout=0.5))
    sc = ann(Role.SC, "c1")
    reg.on_sighting(sighting(sc))
    await reg.idle()
    first = reg.record(sc.component_id)
    assert first is not None and first.status is Status.PENDING and first.expires_at
    await asyncio.sleep(0.3)  # the moment of the second sighting, not a negative check
    real_apply = reg.store.apply

    def slow_apply(changes: list[object]) -> None:
        time.sleep(0.5)  # a slow disk under synchronous=FULL (writer thread)
        real_apply(changes)  # type: ignore[arg-type]

    reg.store.apply = slow_apply  # type: ignore[method-assign,assignment]
    moved = replace(sc, address=ann(Role.SC, "c1").address)  # DHCP gave it a new address
    reg.on_sighting(sighting(moved, Change.UPDATED))
    extended = reg.record(sc.component_id)
    assert extended is not None and extended.expires_at is not None
    assert extended.expires_at > first.expires_at + 0.2
    await poll(lambda: status(reg, sc.component_id) is Status.EXPIRED, "expiry", limit=5)
    gone = reg.record(sc.component_id)
    assert gone is not None
    assert gone.updated_at >= extended.expires_at - 0.05, "expired before its deadline"
    reg.store.apply = real_apply  # type: ignore[method-assign]
    await reg.close()


async def test_approval_racing_the_expiry_of_a_pending_component_ends_admitted(
    tmp_path: Path,
) -> None:
    """The operator approves as the wait runs out: whichever fires first, the approval wins
    (an expired record is re-decided afresh by the approval)."""
    reg = await make(tmp_path, window=False, timing=replace(FAST, pending_timeout=0.25))
    node = ann(Role.NC, "c1", fingerprint=fake_fingerprint("race-expiry"))
    reg.on_sighting(sighting(node))
    await reg.idle()
    pending = reg.record(node.component_id)
    assert pending is not None and pending.expires_at is not None
    await asyncio.sleep(max(0.0, pending.expires_at - time.time() - 0.005))
    await reg.approve(reg.find(node.component_id, None))
    await poll(lambda: status(reg, node.component_id) is Status.AWAITING_KEY, "admission")
    record = reg.record(node.component_id)
    assert record is not None and record.approved and record.expires_at is not None
    assert record.expires_at > time.time()
    await assert_store_matches_memory(reg)
    await reg.close()


# -- memory vs store, under a random mix of everything ----------------------------------------


def check_invariants(reg: Registrar) -> None:
    records = list(reg.memory.records.values())
    slot = [
        r
        for r in records
        if r.status in {Status.AWAITING_KEY, Status.REGISTERING, Status.REGISTERED}
    ]
    addresses = [(r.role, r.address) for r in slot]
    assert len(addresses) == len(set(addresses)), slot
    claimed = [r.fingerprint for r in slot]
    assert len(claimed) == len(set(claimed)), slot
    holds = {Status.AWAITING_KEY, Status.REGISTERING, Status.REGISTERED, Status.FAILED}
    for tok in reg.memory.tokens.values():
        holders = {
            r.component_id
            for r in records
            if r.status in holds and r.admitted_by == f"token:{tok.token_id}"
        }
        assert tok.used_by == holders, (tok, holders)
        if tok.uses is not None:
            assert len(tok.used_by) <= tok.uses


@pytest.mark.parametrize("seed", range(int(os.environ.get("ATTACK_SEEDS", "6"))))
async def test_random_operations_keep_memory_equal_to_the_store_and_invariants(
    tmp_path: Path, seed: int
) -> None:
    import random

    rng = random.Random(seed)
    flag = tmp_path / "fail"
    write_hook(tmp_path / "hooks", "node", f"[ -f {flag} ] && exit 3\nexit 0")
    reg = await make(
        tmp_path,
        replace(NC, replace_after=0.05),
        window=False,
        timing=Timing(pending_timeout=0.3, retry_base=0.05, retry_max=0.1, hook_timeout=5),
    )
    text = await token(reg, 2)
    shared_key = ann(Role.NC, "c1").fingerprint
    pool: list[Announcement] = []
    for i in range(8):
        base = ann(
            Role.NC,
            "c1",
            address=f"10.77.250.{1 + i % 4}",
            fingerprint=shared_key if i in (0, 5) else None,
        )
        pool.append(tokened(text, base) if i % 3 == 0 else base)
    for _ in range(40):
        op = rng.randrange(11)
        node = rng.choice(pool)
        records = list(reg.memory.records.values())
        target = rng.choice(records) if records else None
        try:
            if op <= 2:
                reg.on_sighting(sighting(node))
            elif op == 3:
                reg.on_sighting(Sighting(node.instance, Change.REMOVED))
            elif op == 4 and target is not None:
                await reg.approve(target)
            elif op == 5 and target is not None:
                await reg.reject(target)
            elif op == 6 and target is not None:
                await reg.deregister(target)
            elif op == 7:
                await reg.set_locked(frozenset({Task.CC}), rng.random() < 0.5)
            elif op == 8:
                if reg.trust.install_open(time.time()):
                    await reg.close_install_window()
                else:
                    await reg.open_install_window(60)
            elif op == 9:
                if flag.exists():
                    flag.unlink()
                else:
                    flag.touch()
            elif op == 10:
                await prove_all(reg)
        except (ValueError, KeyError):
            pass  # the operator was told no; nothing may have changed
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice([0.0, 0.02, 0.1]))
        await reg.idle()
        check_invariants(reg)
    await assert_store_matches_memory(reg)
    before = dict(reg.memory.records)
    tokens_before = dict(reg.memory.tokens)
    await reg.close()
    reg.store.close()
    fresh = Store(sqlite_url(tmp_path / "registry.db"))
    snap = fresh.load()
    fresh.close()
    assert snap.records == before
    assert snap.tokens == tokens_before
    assert snap.running_hooks == []
