"""Facts that reach the registrar over HTTP: a component announcing itself over HTTP is heard
for three report intervals, like a live mDNS announcement, so an SC waiting on its CC moves
when the CC's report comes in, and waits again when the reports stop. Real store, real timers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from eucareg.core.model import AnnouncedState, Announcement, Role, Status
from eucareg.core.trust import Mode
from eucareg.mdns.types import Change
from eucareg.registrar.engine import Registrar, Timing
from tests.factories import ann, sighting
from tests.unit.test_registrar import make_registrar, settle
from tests.unit.test_registrar_slots import CLC, wait_for_status

FAST = Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5, report_interval=0.2)


def over_http(a: Announcement) -> Announcement:
    return replace(a, source="fallback", instance=f"fallback:{a.address}")


async def registered_cc(reg: Registrar, cluster: str = "c1") -> Announcement:
    """A CC registered over HTTP that now says so ("registered as c1"), as its agent does."""
    cc = over_http(ann(Role.CC, cluster, api_port=8780))
    await reg.fallback(cc)
    await wait_for_status(reg, cc.component_id, Status.REGISTERED)
    report = replace(cc, state=AnnouncedState.REGISTERED)
    await reg.fallback(report)
    return report


async def wait_until_not_live(reg: Registrar, component_id: str, within: float) -> float:
    began = time.monotonic()
    while component_id in reg.live:
        assert time.monotonic() - began < within, f"{component_id} is still heard"
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def test_an_sc_waits_over_http_for_its_cc_and_registers_when_the_cc_reports(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    await reg.set_mode(Mode.ANY)
    sc = over_http(ann(Role.SC, "c1"))
    _, record = await reg.fallback(sc)
    assert record is not None and record.status is Status.PENDING
    assert record.waiting_for == "cluster c1"
    assert sc.component_id in reg.live  # heard, so it is decided again when c1 moves
    await registered_cc(reg)
    await wait_for_status(reg, sc.component_id, Status.REGISTERED)
    await reg.close()


async def test_a_report_stays_live_for_three_intervals_and_then_the_cluster_waits_again(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    await reg.set_mode(Mode.ANY)
    cc = await registered_cc(reg)
    assert "c1" in reg.view().live_registered_clusters
    # Renewed within the lease: still heard after more than one lease in all.
    for _ in range(4):
        await asyncio.sleep(FAST.report_interval)
        await reg.fallback(cc)
        assert cc.component_id in reg.live
    # Not renewed: it goes after three intervals, not before one.
    gone_after = await wait_until_not_live(reg, cc.component_id, within=5)
    assert gone_after >= FAST.report_interval, gone_after
    assert "c1" not in reg.view().live_registered_clusters
    # The record stays registered; a new SC of c1 waits for the CC to be heard again.
    assert reg.record(cc.component_id).status is Status.REGISTERED  # type: ignore[union-attr]
    sc = over_http(ann(Role.SC, "c1"))
    _, record = await reg.fallback(sc)
    assert record is not None and record.status is Status.PENDING
    await reg.fallback(cc)
    await wait_for_status(reg, sc.component_id, Status.REGISTERED)
    await reg.close()


async def test_an_http_lease_outlives_the_withdrawal_of_the_same_component_on_mdns(
    tmp_path: Path,
) -> None:
    """A CC heard both ways: its mDNS goodbye does not silence what it reports over HTTP, and a
    rogue announcing an instance named like anything cannot end the lease either."""
    reg = await make_registrar(tmp_path, CLC, timing=replace(FAST, report_interval=30))
    await reg.set_mode(Mode.ANY)
    cc = await registered_cc(reg)
    mdns = replace(cc, source="mdns", instance="cluster-x")
    reg.on_sighting(sighting(mdns, instance="cluster-x"))
    reg.on_sighting(sighting(mdns, Change.REMOVED, instance="cluster-x"))
    for name in (f"http:{cc.component_id}", cc.component_id, f"fallback:{cc.address}"):
        reg.on_sighting(sighting(mdns, Change.REMOVED, instance=name))
    await settle(reg)
    assert cc.component_id in reg.live
    assert "c1" in reg.view().live_registered_clusters
    await reg.close()


async def test_nothing_is_leased_for_a_request_that_left_no_record(tmp_path: Path) -> None:
    """Outside mode any an unauthenticated HTTP announcement is refused and leaves nothing,
    not even a live entry or a timer (a flood of ids would grow them)."""
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    for n in range(50):
        walrus = over_http(ann(Role.WALRUS, component_id=f"walrus-{n:012x}"))
        decision, record = await reg.fallback(walrus)
        assert (decision.code, record) == ("fallback-not-allowed", None)
    assert not reg.live and not reg.presence.leased
    await reg.close()
