"""Manual registration (`eucareg register ROLE ADDRESS`): the design's checks apply, the hook
runs at once, and the component that later announces itself at that role and address (with
the given key, if any) takes the registration over without a second hook. Real store, real
hooks, mDNS and HTTP announcements, a restart in between."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

from eucareg.core.model import AnnouncedState, Role, Status
from eucareg.core.trust import Mode
from eucareg.registrar.engine import Issuer, Registrar
from tests.factories import KEYS, ann, sighting
from tests.unit.test_registrar import (
    CLC_SETTINGS,
    counting_hooks,
    make_registrar,
    settle,
    write_hook,
)
from tests.unit.test_registrar_slots import issuer, wait_for_status

__all__ = ["issuer"]  # the fixture, shared

ADDRESS = ipaddress.ip_address("10.77.9.9")


def hook_lines(tmp_path: Path) -> list[str]:
    log = tmp_path / "hooks.log"
    return log.read_text().splitlines() if log.exists() else []


async def manual(
    reg: Registrar, role: Role, cluster: str | None = None, fingerprint: str | None = None
) -> str:
    decision, record = await reg.admin.register(role, ADDRESS, cluster, fingerprint)
    assert record is not None, decision
    await wait_for_status(reg, record.component_id, Status.REGISTERED)
    return record.component_id


async def test_a_manual_registration_runs_the_hook_once_and_is_taken_over(
    tmp_path: Path, issuer: Issuer
) -> None:
    counting_hooks(tmp_path / "hooks", tmp_path / "hooks.log")
    # No install window, mode local: nothing but the operator's registration admits it.
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False, issuer=issuer)
    placeholder = await manual(reg, Role.CC, "c9")
    assert reg.record(placeholder).claimable  # type: ignore[union-attr]
    assert hook_lines(tmp_path) == [f"cluster {placeholder} {ADDRESS}"]
    # The same checks as any CC: the name is taken now, and nothing is stored for the refusal.
    decision, record = await reg.admin.register(
        Role.CC, ipaddress.ip_address("10.77.9.10"), "c9", None
    )
    assert (decision.code, record) == ("cluster-name-taken", None)
    cc = ann(Role.CC, "c9", address=str(ADDRESS))
    reg.on_sighting(sighting(cc))
    await settle(reg)
    adopted = reg.record(cc.component_id)
    assert adopted is not None and adopted.status is Status.REGISTERED
    assert adopted.admitted_by == "manual" and not adopted.claimable
    assert reg.record(placeholder) is None
    assert hook_lines(tmp_path) == [f"cluster {placeholder} {ADDRESS}"]  # no second hook
    # It collects its credentials with its own key.
    answer = await reg.credentials(cc.component_id, KEYS[cc.fingerprint].public_key(), wait=5)
    assert answer.files is not None
    kinds = [e.kind for e in reg.store.events(component_id=placeholder)]
    assert kinds[-1] == "adopted-by"
    await reg.close()


async def test_with_a_fingerprint_only_that_key_takes_it_over(tmp_path: Path) -> None:
    write_hook(tmp_path / "hooks", "walrus", "exit 0")
    reg = await make_registrar(tmp_path, CLC_SETTINGS)  # an install window is open, even
    genuine = ann(Role.WALRUS, address=str(ADDRESS))
    placeholder = await manual(reg, Role.WALRUS, fingerprint=genuine.fingerprint)
    impostor = ann(Role.WALRUS, address=str(ADDRESS))
    reg.on_sighting(sighting(impostor))
    await settle(reg)
    refused = reg.record(impostor.component_id)
    assert refused is not None and refused.status is Status.REFUSED
    assert "for another key" in refused.reason
    assert reg.record(placeholder) is not None
    reg.on_sighting(sighting(genuine))
    await settle(reg)
    assert reg.record(genuine.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    assert reg.record(placeholder) is None
    await reg.close()


async def test_an_sc_needs_its_cluster_now_and_a_manual_nc_its_own_cc(tmp_path: Path) -> None:
    reg = await make_registrar(tmp_path, CLC_SETTINGS)
    decision, record = await reg.admin.register(Role.SC, ADDRESS, "c9", None)
    assert (decision.code, record) == ("waiting-for-cluster", None)
    assert "waiting for cluster c9's CC" in decision.reason
    assert reg.records() == {}
    await reg.close()


async def test_a_taken_address_or_key_is_refused(tmp_path: Path) -> None:
    write_hook(tmp_path / "hooks", "walrus", "exit 0")
    write_hook(tmp_path / "hooks", "cluster", "exit 0")
    reg = await make_registrar(tmp_path, CLC_SETTINGS)
    walrus = ann(Role.WALRUS, address=str(ADDRESS))
    reg.on_sighting(sighting(walrus))
    await settle(reg)
    await wait_for_status(reg, walrus.component_id, Status.REGISTERED)
    decision, record = await reg.admin.register(Role.WALRUS, ADDRESS, None, None)
    assert record is None and decision.code == "in-use"
    other = ipaddress.ip_address("10.77.9.20")
    decision, record = await reg.admin.register(Role.CC, other, "c1", walrus.fingerprint)
    assert record is None and decision.code == "in-use" and "key sha256:" in decision.reason
    await reg.close()


async def test_taken_over_over_http_in_mode_local_and_after_a_restart(tmp_path: Path) -> None:
    """The remote CC of the design's case 6 ("CC2+SC2 will be registered manually"): it
    announces over HTTP without a token, in mode local, after the registrar restarted."""
    write_hook(tmp_path / "hooks", "cluster", "exit 0")
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    placeholder = await manual(reg, Role.CC, "c9")
    await reg.close()
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    assert reg.trust.mode is Mode.LOCAL
    assert reg.record(placeholder).claimable  # type: ignore[union-attr]
    cc = replace(ann(Role.CC, "c9", address=str(ADDRESS)), source="fallback")
    decision, record = await reg.fallback(cc)
    assert decision.code == "adopted", decision
    assert record is not None and record.status is Status.REGISTERED
    # Its reports now say "registered as c9": an SC of c9 may register (with a window).
    await reg.fallback(replace(cc, state=AnnouncedState.REGISTERED))
    assert "c9" in reg.view().live_registered_clusters
    await reg.close()


async def test_a_component_waits_while_the_operators_hook_is_still_failing(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "ok"
    write_hook(tmp_path / "hooks", "cluster", f"test -e {flag}")
    reg = await make_registrar(tmp_path, CLC_SETTINGS, install_window=False)
    _, record = await reg.admin.register(Role.CC, ADDRESS, "c9", None)
    assert record is not None
    placeholder = record.component_id
    await wait_for_status(reg, placeholder, Status.FAILED)
    cc = ann(Role.CC, "c9", address=str(ADDRESS))
    reg.on_sighting(sighting(cc))
    await settle(reg)
    waiting = reg.record(cc.component_id)
    assert waiting is not None and waiting.status is Status.PENDING
    assert waiting.waiting_for == f"{placeholder} to be registered"
    flag.touch()  # the operator fixes the hook; the retry succeeds, then the CC takes over
    await wait_for_status(reg, cc.component_id, Status.REGISTERED)
    assert reg.record(placeholder) is None
    await reg.close()
