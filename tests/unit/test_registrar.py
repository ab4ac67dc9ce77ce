"""The registrar with a real SQLite file and real hook scripts, fed sightings directly.

Orderings, races, restarts and retries are exercised here without the network; the
integration tests repeat the important ones over real multicast.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from eucareg.core.model import (
    AnnouncedState,
    Announcement,
    HookOutcome,
    HookRun,
    Record,
    Role,
    Status,
)
from eucareg.core.transitions import Write
from eucareg.core.trust import Task
from eucareg.core.view import RegistrarSettings
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from eucareg.registrar.batch import Batching
from eucareg.registrar.engine import CredentialRefused, Issuer, Registrar, Timing
from eucareg.registrar.hook_processes import proc_start_time
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, ann, record_from, sighting

CLC_SETTINGS = RegistrarSettings(
    registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), observes_unmatched_nodes=True
)


def write_hook(hook_dir: Path, name: str, body: str) -> None:
    hook_dir.mkdir(parents=True, exist_ok=True)
    path = hook_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def counting_hooks(hook_dir: Path, log: Path) -> None:
    for name in ("walrus", "cluster", "storage", "node"):
        write_hook(hook_dir, name, f'echo "{name} $EUCAREG_ID $EUCAREG_ADDRESS" >> {log}')


def hook_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def make_registrar(
    tmp_path: Path,
    settings: RegistrarSettings = CLC_SETTINGS,
    *,
    timing: Timing | None = None,
    me: list[bool] | None = None,
    issuer: Issuer | None = None,
    install_window: bool = True,
    batching: Batching | None = None,
) -> Registrar:
    store = Store(sqlite_url(tmp_path / "registry.db"))
    flag = me if me is not None else [False]
    registrar = Registrar(
        store,
        settings,
        hook_dir=tmp_path / "hooks",
        timing=timing or Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5),
        issuer_for=lambda _role: issuer,
        self_registered=lambda: flag[0],
        master_key=b"test-master-key",
        batching=batching,
    )
    await registrar.start()
    if install_window:
        # These tests are about ordering, not trust: the operator opened an install window.
        await registrar.open_install_window(3600)
    return registrar


async def settle(registrar: Registrar) -> None:
    """Run all scheduled work, and let every accepted component prove its key as its agent
    would (a signed credential request)."""
    for _ in range(4):
        await registrar.idle()
        await asyncio.sleep(0)
        for record in registrar.store.records().values():
            if record.status is Status.AWAITING_KEY and record.fingerprint in KEYS:
                key = KEYS[record.fingerprint].public_key()
                await registrar.credentials(record.component_id, key, wait=0)


def registered_cc(cc: Announcement) -> Announcement:
    return replace(cc, state=AnnouncedState.REGISTERED, api_port=8780)


async def test_same_component_seen_many_times_at_once_registers_once(tmp_path: Path) -> None:
    """L1 and L2: two interfaces, an Avahi rename and repeats, all at the same moment."""
    log = tmp_path / "hooks.log"
    counting_hooks(tmp_path / "hooks", log)
    reg = await make_registrar(tmp_path)
    walrus = ann(Role.WALRUS)
    for name in (walrus.instance, walrus.instance + " #2", "walrus on eth1", walrus.instance):
        reg.on_sighting(sighting(walrus, instance=name))
    await settle(reg)
    assert hook_lines(log) == [f"walrus {walrus.component_id} {walrus.address}"]
    record = reg.store.get(walrus.component_id)
    assert record is not None and record.status is Status.REGISTERED
    kinds = [e.kind for e in reg.store.events(component_id=walrus.component_id)]
    assert kinds == ["awaiting-key", "registering", "registered"]
    # The instance name never becomes identity.
    assert "#2" not in record.component_id


async def test_two_walruses_racing_leave_exactly_one_registered(tmp_path: Path) -> None:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    reg = await make_registrar(tmp_path)
    first, second = ann(Role.WALRUS), ann(Role.WALRUS)
    reg.on_sighting(sighting(first))
    reg.on_sighting(sighting(second))
    await settle(reg)
    statuses = sorted(r.status.value for r in reg.store.records().values())
    assert statuses == ["refused", "registered"]
    refused = next(r for r in reg.store.records().values() if r.status is Status.REFUSED)
    assert "already has a Walrus" in refused.reason
    assert len(hook_lines(tmp_path / "hooks.log")) == 1


@pytest.mark.parametrize("seed", range(12))
async def test_any_arrival_order_converges_to_every_component_registered_once(
    tmp_path: Path, seed: int
) -> None:
    """CLC view of topology 4 (two clusters), in shuffled order with duplicates."""
    log = tmp_path / "hooks.log"
    counting_hooks(tmp_path / "hooks", log)
    reg = await make_registrar(tmp_path)
    walrus = ann(Role.WALRUS)
    cc1, cc2 = ann(Role.CC, "c1"), ann(Role.CC, "c2")
    sc1, sc2 = ann(Role.SC, "c1"), ann(Role.SC, "c2")
    rng = random.Random(seed)
    arrivals = [walrus, cc1, cc2, sc1, sc2, sc1, cc1]
    rng.shuffle(arrivals)
    for item in arrivals:
        reg.on_sighting(sighting(item))
        if rng.random() < 0.5:
            await settle(reg)
    await settle(reg)
    # A CC announces "registered" once it holds its credentials, in either order.
    for cc in rng.sample([cc1, cc2], 2):
        reg.on_sighting(sighting(registered_cc(cc), Change.UPDATED))
    await settle(reg)
    records = reg.store.records()
    assert {r.status for r in records.values()} == {Status.REGISTERED}
    assert len(records) == 5
    assert sorted(hook_lines(log)) == sorted(
        f"{a.role.hook_name} {a.component_id} {a.address}" for a in (walrus, cc1, cc2, sc1, sc2)
    )


async def test_sc_before_its_cc_is_pending_then_registers_when_cc_announces(
    tmp_path: Path,
) -> None:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    reg = await make_registrar(tmp_path)
    sc, cc = ann(Role.SC, "c1"), ann(Role.CC, "c1")
    reg.on_sighting(sighting(sc))
    await settle(reg)
    pending = reg.store.get(sc.component_id)
    assert pending is not None and pending.status is Status.PENDING
    assert pending.waiting_for == "cluster c1"
    reg.on_sighting(sighting(cc))
    await settle(reg)
    assert reg.store.get(sc.component_id).status is Status.PENDING  # type: ignore[union-attr]
    reg.on_sighting(sighting(registered_cc(cc), Change.UPDATED))
    await settle(reg)
    assert reg.store.get(sc.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    kinds = [e.kind for e in reg.store.events(component_id=sc.component_id)]
    assert kinds == ["pending", "awaiting-key", "registering", "registered"]


async def test_a_cc_announcing_registered_that_we_did_not_register_frees_no_sc(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    sc = ann(Role.SC, "c1")
    rogue = registered_cc(ann(Role.CC, "c1"))
    reg.on_sighting(sighting(sc))
    await settle(reg)
    # The rogue is not in our records as registered, so its claim does not count.
    reg.live[rogue.component_id] = rogue
    reg.on_sighting(sighting(sc, Change.UPDATED))
    await settle(reg)
    assert reg.store.get(sc.component_id).status is Status.PENDING  # type: ignore[union-attr]


async def test_nodes_wait_for_their_cc_and_register_when_it_is(tmp_path: Path) -> None:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    me = [False]
    reg = await make_registrar(
        tmp_path, RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1"), me=me
    )
    nodes = [ann(Role.NC, "c1") for _ in range(3)]
    foreign = ann(Role.NC, "c2")
    for node in [*nodes, foreign]:
        reg.on_sighting(sighting(node))
    await settle(reg)
    assert {r.status for r in reg.store.records().values()} == {Status.PENDING}
    assert foreign.component_id not in reg.store.records()
    me[0] = True
    reg.self_registration_changed()
    await settle(reg)
    assert {r.status for r in reg.store.records().values()} == {Status.REGISTERED}
    assert len(hook_lines(tmp_path / "hooks.log")) == 3


async def test_failed_hook_is_visible_and_retried_with_backoff_until_it_works(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "fail-count"
    # Fails twice, then succeeds: a site script that hits a transient error.
    write_hook(
        tmp_path / "hooks",
        "walrus",
        f"n=$(cat {marker} 2>/dev/null || echo 0); echo $((n+1)) > {marker}\n"
        f'[ "$n" -ge 2 ] || {{ echo "euca_conf: connection refused" >&2; exit 3; }}',
    )
    reg = await make_registrar(tmp_path)
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus))
    await settle(reg)
    failed = reg.store.get(walrus.component_id)
    assert failed is not None and failed.status is Status.FAILED
    assert "exit 3" in failed.reason and "connection refused" in failed.reason
    for _ in range(100):
        await asyncio.sleep(0.05)
        await settle(reg)
        record = reg.store.get(walrus.component_id)
        if record is not None and record.status is Status.REGISTERED:
            break
    runs = reg.store.hook_runs(walrus.component_id)
    assert [r.outcome for r in runs] == ["failed", "failed", "ok"]
    assert [r.exit_code for r in runs] == [3, 3, 0]
    assert reg.store.get(walrus.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    await reg.close()


async def test_hanging_hook_times_out_and_is_recorded(tmp_path: Path) -> None:
    write_hook(tmp_path / "hooks", "walrus", "sleep 30")
    reg = await make_registrar(tmp_path, timing=Timing(hook_timeout=0.3, retry_base=60))
    walrus = ann(Role.WALRUS)
    reg.on_sighting(sighting(walrus))
    await settle(reg)
    record = reg.store.get(walrus.component_id)
    assert record is not None and record.status is Status.FAILED
    assert reg.store.hook_runs()[0].outcome == "timeout"
    await reg.close()


async def test_missing_hook_is_skipped_and_registration_completes(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path)
    cc = ann(Role.CC, "c1")
    reg.on_sighting(sighting(cc))
    await settle(reg)
    assert reg.store.get(cc.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    assert reg.store.hook_runs()[0].outcome == "skipped"


async def test_restarted_registrar_neither_registers_again_nor_reruns_hooks(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    counting_hooks(tmp_path / "hooks", log)
    first = await make_registrar(tmp_path)
    parts = [ann(Role.WALRUS), ann(Role.CC, "c1"), ann(Role.SC, "c9")]
    for part in parts:
        first.on_sighting(sighting(part))
    await settle(first)
    events_before = len(first.store.events())
    await first.close()
    first.store.close()

    # No new install window: the one opened before the restart is still recorded as open.
    second = await make_registrar(tmp_path, install_window=False)
    assert second.trust.install_open(time.time())
    await second.start()
    for part in parts:
        second.on_sighting(sighting(part))
    await settle(second)
    assert len(hook_lines(log)) == 2  # walrus and cc; the SC still waits for c9
    assert len(second.store.events()) == events_before
    assert second.store.get(parts[2].component_id).status is Status.PENDING  # type: ignore[union-attr]


async def test_a_decided_hook_that_never_started_runs_once_on_resume_unmarked(
    tmp_path: Path,
) -> None:
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "walrus", f'echo "$EUCAREG_ID rerun=$EUCAREG_RERUN" >> {log}')
    walrus = ann(Role.WALRUS)
    # We died after committing "registering" and before the hook was journaled.
    seed = Store(sqlite_url(tmp_path / "registry.db"))
    seed.apply([Write(records=(replace(_record(walrus), status=Status.REGISTERING),))])
    seed.close()
    reg = await make_registrar(tmp_path)
    await settle(reg)
    assert reg.store.get(walrus.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    assert hook_lines(log) == [f"{walrus.component_id} rerun=0"]


async def test_a_re_run_that_a_second_crash_kept_from_starting_is_still_marked(
    tmp_path: Path,
) -> None:
    """Crash 1 interrupted the hook; the restart recorded that and owed a marked re-run, but
    crash 2 came before the re-run was journaled. The run made after crash 2 is that re-run."""
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "walrus", f'echo "$EUCAREG_ID rerun=$EUCAREG_RERUN" >> {log}')
    walrus = ann(Role.WALRUS)
    first = HookRun(
        run_id="interrupted-run",
        component_id=walrus.component_id,
        hook=str(tmp_path / "hooks" / "walrus"),
        started_at=time.time() - 5,
        outcome=HookOutcome.INTERRUPTED,
        duration=1.0,
    )
    seed = Store(sqlite_url(tmp_path / "registry.db"))
    seed.apply(
        [Write(records=(replace(_record(walrus), status=Status.REGISTERING),), hook_runs=(first,))]
    )
    seed.close()
    reg = await make_registrar(tmp_path)
    await settle(reg)
    assert reg.store.get(walrus.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    assert hook_lines(log) == [f"{walrus.component_id} rerun=1"]


def spawn_orphan() -> subprocess.Popen[bytes]:
    """A stand-in for a hook left running by a registrar that died: a session of its own."""
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


async def test_an_interrupted_hook_is_killed_and_run_again_once_marked(tmp_path: Path) -> None:
    """A hook journaled as running whose registrar died: its process group (still alive,
    in a session of its own) is killed, and the hook is run once more with EUCAREG_RERUN=1."""
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "walrus", f'echo "$EUCAREG_ID rerun=$EUCAREG_RERUN" >> {log}')
    walrus = ann(Role.WALRUS)
    orphan = spawn_orphan()
    try:
        run = HookRun(
            run_id="dead-registrar-run",
            component_id=walrus.component_id,
            hook=str(tmp_path / "hooks" / "walrus"),
            started_at=time.time() - 5,
            outcome=HookOutcome.RUNNING,
            pgid=orphan.pid,
            proc_start=proc_start_time(orphan.pid),
        )
        record = replace(_record(walrus), status=Status.REGISTERING)
        seed = Store(sqlite_url(tmp_path / "registry.db"))
        seed.apply([Write(records=(record,), hook_runs=(run,))])
        seed.close()
        reg = await make_registrar(tmp_path)
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        await settle(reg)
    finally:
        orphan.kill()
        orphan.wait()
    assert reg.store.get(walrus.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    assert hook_lines(log) == [f"{walrus.component_id} rerun=1"]
    runs = {r.run_id: r for r in reg.store.hook_runs(walrus.component_id)}
    assert runs["dead-registrar-run"].outcome is HookOutcome.INTERRUPTED
    assert [r.rerun for r in runs.values() if r.run_id != "dead-registrar-run"] == [True]
    codes = [e.code for e in reg.store.events(component_id=walrus.component_id)]
    assert "hook-interrupted" in codes


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("fe80::1", "link-local"),
        ("169.254.7.7", "link-local"),
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
    ],
)
async def test_unusable_addresses_are_rejected_visibly_and_never_registered(
    tmp_path: Path, address: str, why: str
) -> None:
    reg = await make_registrar(tmp_path)
    walrus = ann(Role.WALRUS)
    bad = sighting(walrus)
    bad = Sighting(bad.instance, bad.change, txt={**bad.txt, "addr": address})
    reg.on_sighting(bad)
    reg.on_sighting(bad)  # a repeat does not repeat the event
    await settle(reg)
    assert reg.store.records() == {}
    events = [e for e in reg.store.events() if e.kind != "trust"]
    assert len(events) == 1
    assert events[0].kind == "rejected" and why in events[0].reason


async def test_pending_wait_expires_visibly_and_a_fresh_sighting_restarts_it(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, timing=Timing(pending_timeout=0.2))
    sc = ann(Role.SC, "c1")
    reg.on_sighting(sighting(sc))
    await settle(reg)
    await asyncio.sleep(0.35)
    record = reg.store.get(sc.component_id)
    assert record is not None and record.status is Status.EXPIRED
    assert "cluster c1" in record.reason
    reg.on_sighting(sighting(sc, Change.UPDATED))  # same announcement again: stays expired
    await settle(reg)
    assert reg.store.get(sc.component_id).status is Status.EXPIRED  # type: ignore[union-attr]
    reg.on_sighting(Sighting(sc.instance, Change.REMOVED))
    reg.on_sighting(sighting(sc))  # it went away and came back
    await settle(reg)
    assert reg.store.get(sc.component_id).status is Status.PENDING  # type: ignore[union-attr]
    kinds = [e.kind for e in reg.store.events(component_id=sc.component_id)]
    assert kinds == ["pending", "expired", "pending"]
    await reg.close()


async def test_unmatched_node_is_visible_and_cleared_when_its_cluster_registers(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    stray = ann(Role.NC, "c7")
    reg.on_sighting(sighting(stray))
    await settle(reg)
    record = reg.store.get(stray.component_id)
    assert record is not None and record.status is Status.UNMATCHED
    reg.on_sighting(sighting(ann(Role.CC, "c7")))
    await settle(reg)
    assert reg.store.get(stray.component_id) is None
    assert [e.kind for e in reg.store.events(component_id=stray.component_id)] == [
        "unmatched",
        "matched",
    ]


def _record(a: Announcement) -> Record:
    return record_from(a, first_seen=1.0, updated_at=1.0)


@pytest.fixture(scope="module")
def cloud_issuer() -> Issuer:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "test")
    return Issuer(key=key, cert=ca, cloud_cert=ca)


async def test_credentials_only_for_the_registered_key_and_long_poll_wakes(
    tmp_path: Path, cloud_issuer: Issuer
) -> None:
    reg = await make_registrar(tmp_path, issuer=cloud_issuer)
    key = keypairs.generate_key()
    cc = ann(Role.CC, "c1", fingerprint=keypairs.fingerprint(key.public_key()))
    # Before anything is known: no credentials, no error.
    early = await reg.credentials(cc.component_id, key.public_key(), wait=0)
    assert early.files is None and early.status is None
    # A waiting collector is answered as soon as the registration completes.
    waiter = asyncio.create_task(reg.credentials(cc.component_id, key.public_key(), wait=5))
    await asyncio.sleep(0.05)
    reg.on_sighting(sighting(cc))
    answer = await asyncio.wait_for(waiter, 5)
    assert answer.status is Status.REGISTERED and answer.files is not None
    written = cred.verify_bundle(answer.files, Role.CC, key)
    cred.write_credentials(tmp_path / "keys", Role.CC, written)
    assert cred.credentials_present(tmp_path / "keys", Role.CC, key)
    # Same certificate on a second request: issuing is idempotent.
    again = await reg.credentials(cc.component_id, key.public_key(), wait=0)
    assert again.files == answer.files
    # Another key asking for this component's credentials is refused.
    with pytest.raises(CredentialRefused) as refused:
        await reg.credentials(cc.component_id, keypairs.generate_key().public_key(), wait=0)
    assert refused.value.status == 403


# -- trust at the registrar ----------------------------------------------------------------------

NC_SETTINGS = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="c1")


async def test_default_is_approval_and_reject_keeps_a_component_out(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path, NC_SETTINGS, me=[True], install_window=False)
    good, bad = ann(Role.NC, "c1"), ann(Role.NC, "c1")
    for item in (good, bad):
        reg.on_sighting(sighting(item))
    await settle(reg)
    assert {r.waiting_for for r in reg.store.records().values()} == {"operator approval"}
    await reg.approve(reg.find(good.component_id, None))
    await reg.reject(reg.find(None, bad.fingerprint))
    await settle(reg)
    reg.on_sighting(sighting(bad, Change.UPDATED))
    await settle(reg)
    assert reg.store.get(good.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    assert reg.store.get(bad.component_id).status is Status.REJECTED  # type: ignore[union-attr]
    assert reg.store.get(good.component_id).admitted_by == "approval"  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        reg.find("nc-nobody00000", None)


async def test_lock_refuses_at_once_persists_and_unlock_lets_waiting_ones_in(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, NC_SETTINGS, me=[True])
    await reg.set_locked(frozenset({Task.CC}), True)
    nc = ann(Role.NC, "c1")
    reg.on_sighting(sighting(nc))
    await settle(reg)
    record = reg.store.get(nc.component_id)
    assert record is not None and record.status is Status.REFUSED and "locked" in record.reason
    await reg.close()
    reg.store.close()
    again = await make_registrar(tmp_path, NC_SETTINGS, me=[True], install_window=False)
    assert again.trust.locked == frozenset({Task.CC})
    again.on_sighting(sighting(nc))
    await again.set_locked(frozenset({Task.CC}), False)
    await settle(again)
    assert again.store.get(nc.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    codes = [e.code for e in again.store.events(kind="trust")]
    assert codes == ["install-window-open", "locked", "unlocked"]


async def test_install_window_closes_by_itself_with_an_event(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path, NC_SETTINGS, me=[True], install_window=False)
    await reg.open_install_window(0.2)
    await asyncio.sleep(0.4)
    assert reg.trust.install_until is None
    codes = [e.code for e in reg.store.events(kind="trust")]
    assert codes == ["install-window-open", "install-window-closed"]
    nc = ann(Role.NC, "c1")
    reg.on_sighting(sighting(nc))
    await settle(reg)
    assert reg.store.get(nc.component_id).status is Status.PENDING  # type: ignore[union-attr]


async def test_token_admission_use_and_deregistration_revokes(
    tmp_path: Path, cloud_issuer: Issuer
) -> None:
    from eucareg.core.trust import announcement_proof_message, make_proof, parse_token

    reg = await make_registrar(
        tmp_path, NC_SETTINGS, me=[True], install_window=False, issuer=cloud_issuer
    )
    text = await reg.create_token(Role.NC, None, 600, 1, "sha256:" + "c" * 64)
    parsed = parse_token(text)
    key = keypairs.generate_key()
    base = ann(Role.NC, "c1", fingerprint=keypairs.fingerprint(key.public_key()))
    stamp = int(time.time())
    with_token = replace(base, token_id=parsed.token_id, token_stamp=stamp)
    nc = replace(
        with_token,
        token_proof=make_proof(parsed.secret, announcement_proof_message(with_token, stamp)),
    )
    reg.submit(nc)
    await settle(reg)
    assert reg.store.get(nc.component_id).status is Status.AWAITING_KEY  # type: ignore[union-attr]
    answer = await reg.credentials(nc.component_id, key.public_key(), wait=5)
    assert answer.files is not None
    record = reg.store.get(nc.component_id)
    assert record is not None and record.admitted_by == f"token:{parsed.token_id}"
    serial = format(certificates.load_cert_pem(answer.files["node-cert.pem"]).serial_number, "x")
    watcher = asyncio.create_task(reg.credentials(nc.component_id, key.public_key(), 5, serial))
    await asyncio.sleep(0.05)
    await reg.deregister(record)
    with pytest.raises(CredentialRefused) as gone:
        await asyncio.wait_for(watcher, 5)
    assert gone.value.status == 410
    await settle(reg)
    # Back as a newcomer: its one-use token no longer admits it.
    again = reg.store.get(nc.component_id)
    assert again is not None and again.status is Status.REFUSED
    assert "deregistered" in again.reason


async def test_an_impostor_of_a_registered_cc_hides_nothing_and_is_logged(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path)
    cc = ann(Role.CC, "c1")
    reg.on_sighting(sighting(cc))
    await settle(reg)
    reg.on_sighting(sighting(registered_cc(cc), Change.UPDATED))
    # Same id, another key and address, as "registered": a spoof of the real CC.
    impostor = replace(registered_cc(cc), fingerprint=ann(Role.CC, "c1").fingerprint, instance="x")
    impostor = replace(impostor, address=ann(Role.CC, "c1").address)
    reg.on_sighting(sighting(impostor))
    sc = ann(Role.SC, "c1")
    reg.on_sighting(sighting(sc))
    await settle(reg)
    assert reg.store.get(sc.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    conflicts = [e for e in reg.store.events(kind="refused") if e.code == "identity-conflict"]
    assert [e.address for e in conflicts] == [str(impostor.address)]
    assert reg.store.get(cc.component_id).fingerprint == cc.fingerprint  # type: ignore[union-attr]


async def test_a_second_clc_is_an_event_and_a_warning_never_a_record(tmp_path: Path) -> None:
    """The design assumes one CLC per LAN: another one heard is reported once, and shown as a
    warning while it is heard, on the CLC's registrar; it is never stored or registered."""
    settings = replace(CLC_SETTINGS, own_clc="clc-0000000000c1")
    registrar = await make_registrar(tmp_path, settings)
    try:
        other = ann(Role.CLC)
        own = ann(Role.CLC, component_id="clc-0000000000c1")
        for a in (own, other, other):
            registrar.on_sighting(sighting(a))
        await registrar.idle()
        events = await registrar.events(kind="refused")
        assert [(e.component_id, e.code) for e in events] == [(other.component_id, "second-clc")]
        assert registrar.record(other.component_id) is None
        [warning] = registrar.warnings()
        assert warning.startswith(f"another CLC announces itself: {other.component_id} at ")
        registrar.on_sighting(sighting(other, Change.REMOVED))
        assert registrar.warnings() == []
    finally:
        await registrar.close()


async def test_hook_runs_of_one_component_never_overlap_across_a_lock_hand_over(
    tmp_path: Path,
) -> None:
    """One run at a time per component. A run that ends hands the component's lock to the
    one waiting; a third arriving in that moment must queue behind it, not take a fresh
    lock (the lock used to be dropped when merely unlocked, before the waiter woke)."""
    reg = await make_registrar(tmp_path)
    inside: list[int] = []
    worst = 0

    async def hook_work(component_id: str, *, rerun: bool) -> None:
        nonlocal worst
        inside.append(1)
        worst = max(worst, len(inside))
        for _ in range(3):
            await asyncio.sleep(0)
        inside.pop()

    reg.registering._run = hook_work  # type: ignore[method-assign]
    first = asyncio.create_task(reg.registering.run("nc-1", rerun=False))
    second = asyncio.create_task(reg.registering.run("nc-1", rerun=False))
    await first
    third = asyncio.create_task(reg.registering.run("nc-1", rerun=False))
    await asyncio.gather(second, third)
    assert worst == 1
    assert reg.registering._locks == {} and reg.registering._users == {}
    await reg.close()
