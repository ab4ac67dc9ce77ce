"""Attack review of issue 9 (a cloud past the LAN): facts over HTTP (leases, `?wait=`), the
agent's reports through its fallback registrar, `eucareg join`, and manual registration with
its take-over (ADOPT).

Tests marked `xfail(strict=True, reason="DEFECT: ...")` assert the promised behaviour and fail
today: the fix flips them. The others pin an attack that held. Real registrars on SQLite files,
real hooks, real TLS on 127.0.0.1; negative checks wait for the event that decides them
(`Registrar.idle()`, a status, an answer), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eucareg.agent import collect as agent_collect
from eucareg.agent.host import Agent
from eucareg.agent.locate import Endpoint
from eucareg.agent.timing import AgentTiming
from eucareg.api.limits import LIMITER
from eucareg.core.model import AnnouncedState, Announcement, Role, Status
from eucareg.core.trust import Mode
from eucareg.core.view import RegistrarSettings
from eucareg.mdns.types import Change
from eucareg.pki import tls
from eucareg.registrar.engine import Registrar, Timing
from eucareg.registrar.presence import Online
from tests.factories import ann, fake_fingerprint, sighting
from tests.unit.test_agent_fakes import (
    FakeCloud,
    FakeMdns,
    FakeRegistrar,
    bundle_reply,
    json_reply,
    key,
    make_config,
    seed_identity,
)
from tests.unit.test_agent_fakes import eventually as agent_eventually
from tests.unit.test_api_components import certificate, collect, fallback, from_lan, txt_of
from tests.unit.test_api_harness import (
    CC_SETTINGS,
    CLC_SETTINGS,
    CLOUD_CLC_ID,
    Harness,
    eventually,
    key_of,
    served,
)
from tests.unit.test_cli_join import token_for
from tests.unit.test_cli_operator import run
from tests.unit.test_registrar import make_registrar, settle, write_hook

CLC = RegistrarSettings(registers=frozenset({Role.WALRUS, Role.CC, Role.SC}))
FAST = Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5)
ADDRESS = ipaddress.ip_address("10.77.9.9")


def over_http(a: Announcement) -> Announcement:
    """`a` as a signed POST /v1/announce makes it (the signature is checked by the API)."""
    return replace(a, source="fallback", instance=f"fallback:{a.address}")


def status(reg: Registrar, component_id: str) -> Status | None:
    record = reg.record(component_id)
    return record.status if record is not None else None


async def until(reg: Registrar, component_id: str, *wanted: Status, limit: float = 3.0) -> Status:
    """Wait (proving keys as agents do) until the record is in one of `wanted`."""
    deadline = time.monotonic() + limit
    while (now := status(reg, component_id)) not in wanted:
        assert time.monotonic() < deadline, f"{component_id} is {now}, not {wanted}"
        await settle(reg)
        await asyncio.sleep(0.01)
    assert now is not None
    return now


async def poll(condition: Callable[[], bool], what: str, limit: float = 3.0) -> None:
    """Wait for something that must happen, without waiting for running hooks."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def registered(reg: Registrar, a: Announcement) -> Announcement:
    """`a` heard on mDNS (an install window is open) and registered."""
    reg.on_sighting(sighting(a))
    await until(reg, a.component_id, Status.REGISTERED)
    return a


async def placeholder(
    reg: Registrar,
    role: Role,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = ADDRESS,
    cluster: str | None = None,
    fingerprint: str | None = None,
) -> str:
    """`eucareg register ROLE ADDRESS`: the operator's record, once it is registered."""
    decision, record = await reg.admin.register(role, address, cluster, fingerprint)
    assert record is not None, decision
    await reg.idle()
    return record.component_id


# =============================================================================================
# Facts over HTTP: who may make a cluster "live registered"
# =============================================================================================


@pytest.mark.parametrize("how", ["walrus-over-http", "other-cc-over-http", "copy-on-mdns"])
async def test_only_the_registered_cc_of_a_cluster_makes_that_cluster_live(
    tmp_path: Path, how: str
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    walrus = await registered(reg, ann(Role.WALRUS))
    cc = await registered(reg, ann(Role.CC, "c1", api_port=8780))
    if how == "walrus-over-http":
        # Signed by the Walrus's own key, no token, mode local (the default).
        claim = over_http(replace(walrus, role=Role.CC, cluster="x", api_port=8780))
        await reg.fallback(replace(claim, state=AnnouncedState.REGISTERED))
    elif how == "other-cc-over-http":
        await reg.fallback(over_http(replace(cc, cluster="x", state=AnnouncedState.REGISTERED)))
    else:
        # Any host on the LAN: the Walrus's id and fingerprint are in its own announcement.
        copy = ann(
            Role.CC,
            "x",
            component_id=walrus.component_id,
            fingerprint=walrus.fingerprint,
            state=AnnouncedState.REGISTERED,
            api_port=8780,
        )
        reg.on_sighting(sighting(copy, instance="cluster-x"))
    sc = ann(Role.SC, "x")
    reg.on_sighting(sighting(sc))
    await settle(reg)
    assert status(reg, sc.component_id) is Status.PENDING  # waiting for cluster x
    assert "x" not in reg.view().live_registered_clusters
    await reg.close()


@pytest.mark.parametrize("cc_is", ["pending", "refused", "another-key", "deregistered"])
async def test_an_http_report_of_a_cc_that_is_not_registered_makes_no_cluster_live(
    tmp_path: Path, cc_is: str
) -> None:
    """Mode any: anyone may announce over HTTP. A CC that says "registered as c1" counts only
    when it is the CC the CLC registered, with that key."""
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    await reg.set_mode(Mode.ANY)
    cc = over_http(ann(Role.CC, "c1", api_port=8780))
    report = replace(cc, state=AnnouncedState.REGISTERED)
    if cc_is == "refused":
        await reg.open_install_window(600)
        holder = await registered(reg, ann(Role.CC, "c1"))
        reg.on_sighting(sighting(holder, Change.REMOVED))
        await reg.close_install_window()
        _, record = await reg.fallback(report)  # cluster name taken
        assert record is not None and record.status is Status.REFUSED
        # The genuine CC of c1 is registered, but not heard: c1 is not live.
        assert holder.component_id not in reg.live
    elif cc_is == "another-key":
        await reg.open_install_window(600)
        genuine = await registered(reg, ann(Role.CC, "c1"))
        reg.on_sighting(sighting(genuine, Change.REMOVED))
        await reg.close_install_window()
        # The genuine CC's id, signed by the attacker's own key (the API checks the signature
        # against the announced key, so the attacker announces its own).
        report = over_http(replace(report, component_id=genuine.component_id))
        decision, _ = await reg.fallback(report)
        assert decision.code == "identity-conflict"
    elif cc_is == "deregistered":
        await reg.open_install_window(600)
        await reg.fallback(cc)
        await until(reg, cc.component_id, Status.REGISTERED)
        await reg.fallback(report)
        assert "c1" in reg.view().live_registered_clusters
        await reg.close_install_window()
        await reg.deregister(reg.record(cc.component_id))  # type: ignore[arg-type]
        await reg.fallback(report)  # its agent has not noticed yet
        assert status(reg, cc.component_id) is Status.PENDING
    else:
        _, record = await reg.fallback(report)
        assert record is not None and record.status is Status.PENDING
    # No window for the SC either: what it waits for says whether c1 counts as live (it
    # would wait for "operator approval" then).
    sc = over_http(ann(Role.SC, "c1"))
    await reg.fallback(sc)
    await reg.idle()
    record = reg.record(sc.component_id)
    assert record is not None and record.status is Status.PENDING
    assert record.waiting_for == "cluster c1"
    assert "c1" not in reg.view().live_registered_clusters
    await reg.close()


async def test_leases_are_bounded_by_the_records_an_unauthenticated_flood_may_leave(
    tmp_path: Path,
) -> None:
    """Mode any, max_unadmitted 5: a hundred ids announced over HTTP leave five records, and
    only those are heard (a live entry and one lease timer each)."""
    settings = replace(CLC, max_unadmitted=5)
    reg = await make_registrar(tmp_path, settings, timing=FAST, install_window=False)
    await reg.set_mode(Mode.ANY)
    for n in range(100):
        walrus = over_http(
            ann(Role.WALRUS, component_id=f"walrus-{n:012x}", fingerprint=fake_fingerprint(str(n)))
        )
        await reg.fallback(walrus)
    assert len(reg.records()) == 5
    assert len(reg.presence.leased) == 5 and len(reg.live) == 5
    assert len(reg.presence.proven) <= 5
    leases = [k for k in reg.timers._handles if k[1].value == "lease-end"]
    assert len(leases) == 5
    await reg.close()
    assert not reg.timers._handles  # nothing outlives close


async def test_a_lease_does_not_survive_a_restart_and_the_next_report_renews_it(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    await reg.set_mode(Mode.ANY)
    cc = over_http(ann(Role.CC, "c1", api_port=8780))
    await reg.fallback(cc)
    await until(reg, cc.component_id, Status.REGISTERED)
    report = replace(cc, state=AnnouncedState.REGISTERED)
    await reg.fallback(report)
    assert "c1" in reg.view().live_registered_clusters
    await reg.close()
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    assert "c1" not in reg.view().live_registered_clusters  # not heard since the restart
    sc = ann(Role.SC, "c1")
    reg.on_sighting(sighting(sc))
    await settle(reg)
    assert status(reg, sc.component_id) is Status.PENDING
    await reg.fallback(report)
    await until(reg, sc.component_id, Status.REGISTERED)
    await reg.close()


async def test_a_lease_ending_after_its_cc_was_deregistered_leaves_nothing(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=replace(FAST, report_interval=0.05))
    await reg.set_mode(Mode.ANY)
    cc = over_http(ann(Role.CC, "c1", api_port=8780))
    await reg.fallback(cc)
    await until(reg, cc.component_id, Status.REGISTERED)
    await reg.fallback(replace(cc, state=AnnouncedState.REGISTERED))
    await reg.close_install_window()
    await reg.deregister(reg.record(cc.component_id))  # type: ignore[arg-type]
    assert "c1" not in reg.view().live_registered_clusters  # at once, not at the lease's end
    # Still heard until its lease ends, it is a newcomer again (as on mDNS): pending.
    assert status(reg, cc.component_id) in (None, Status.PENDING)
    deadline = time.monotonic() + 3
    while reg.presence.leased:  # the lease still ends, by itself
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await reg.idle()
    assert not reg.live and status(reg, cc.component_id) in (None, Status.PENDING)
    await reg.close()


# =============================================================================================
# Manual registration (`eucareg register`) and its take-over (ADOPT)
# =============================================================================================


async def test_an_operators_registration_is_not_taken_over_without_proof_of_the_key(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    genuine = ann(Role.WALRUS, address=str(ADDRESS))
    await placeholder(reg, Role.WALRUS, fingerprint=genuine.fingerprint)
    # A forged announcement: the genuine key's public fingerprint, an id of the attacker's
    # choosing, the placeholder's address (its A record forged as well; docs/security.md:
    # "the key-possession gate covers that").
    forged = ann(Role.WALRUS, address=str(ADDRESS), fingerprint=genuine.fingerprint)
    reg.on_sighting(sighting(forged))
    await reg.idle()  # no signed request from anyone
    assert status(reg, forged.component_id) is not Status.REGISTERED
    await reg.close()


async def test_a_key_registered_under_one_id_cannot_adopt_an_operators_registration(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    walrus = await registered(reg, ann(Role.WALRUS))
    await placeholder(reg, Role.CC, cluster="c9")
    # Signed by the Walrus's key (it holds it), over HTTP, mode local: ADOPT needs no mode.
    cc = over_http(ann(Role.CC, "c9", address=str(ADDRESS), fingerprint=walrus.fingerprint))
    await reg.fallback(cc)
    await reg.idle()
    holders = [
        r.component_id
        for r in reg.records().values()
        if r.fingerprint == walrus.fingerprint and r.status is Status.REGISTERED
    ]
    assert holders == [walrus.component_id]
    await reg.close()


@pytest.mark.parametrize("after", ["another-keyless-placeholder", "a-restart"])
async def test_a_failed_operators_registration_is_retried_as_the_operators(
    tmp_path: Path, after: str
) -> None:
    flag = tmp_path / "failed-once"
    # The cluster hook fails the first time only (a transient euca_conf failure).
    write_hook(tmp_path / "hooks", "cluster", f"test -e {flag} || {{ touch {flag}; exit 1; }}")
    timing = replace(FAST, retry_base=0.3, retry_max=0.3)
    reg = await make_registrar(tmp_path, CLC, timing=timing, install_window=False)
    if after == "another-keyless-placeholder":
        await placeholder(reg, Role.WALRUS, address=ipaddress.ip_address("10.77.9.10"))
    _, record = await reg.admin.register(Role.CC, ADDRESS, "c9", None)
    assert record is not None
    cc_id = record.component_id
    await until(reg, cc_id, Status.FAILED)
    if after == "a-restart":
        await reg.close()
        reg = await make_registrar(tmp_path, CLC, timing=timing, install_window=False)
    outcome = await until(
        reg, cc_id, Status.REGISTERED, Status.REFUSED, Status.AWAITING_KEY, Status.EXPIRED
    )
    assert outcome is Status.REGISTERED, reg.record(cc_id).reason  # type: ignore[union-attr]
    await reg.close()


async def test_a_component_heard_before_the_operator_registers_its_address_takes_it_over(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    walrus = ann(Role.WALRUS, address=str(ADDRESS))
    reg.on_sighting(sighting(walrus))
    await reg.idle()
    assert status(reg, walrus.component_id) is Status.PENDING  # waiting for approval
    # The operator registers the machine it is looking at (`eucareg register walrus ADDR`).
    placeholder_id = await placeholder(reg, Role.WALRUS)
    assert status(reg, placeholder_id) is Status.REGISTERED
    await reg.idle()
    # Decided again at once: it takes the registration over once it proves its key.
    assert status(reg, walrus.component_id) is Status.AWAITING_KEY
    await settle(reg)
    assert status(reg, walrus.component_id) is Status.REGISTERED
    assert reg.record(placeholder_id) is None
    await reg.close()


async def test_three_components_announcing_at_once_adopt_one_registration_once(
    tmp_path: Path,
) -> None:
    """N+1: three machines claim the same keyless placeholder in the same instant, over mDNS
    and over HTTP; exactly one takes it over, the hook ran once, the others are refused."""
    log = tmp_path / "hooks.log"
    write_hook(tmp_path / "hooks", "walrus", f'echo "$EUCAREG_ID" >> {log}')
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    await reg.set_mode(Mode.ANY)
    placeholder_id = await placeholder(reg, Role.WALRUS)
    racers = [ann(Role.WALRUS, address=str(ADDRESS)) for _ in range(3)]
    reg.on_sighting(sighting(racers[0]))
    reg.on_sighting(sighting(racers[1]))
    await asyncio.gather(reg.fallback(over_http(racers[2])), reg.fallback(over_http(racers[0])))
    await reg.idle()
    adopted = [r for r in racers if status(reg, r.component_id) is Status.REGISTERED]
    # The first to prove its key wins (here the first HTTP request: a signed request proves
    # it); one that only announced on mDNS waits for a proof that now gets it refused.
    assert [r.component_id for r in adopted] == [racers[2].component_id]
    assert reg.record(placeholder_id) is None
    others = {status(reg, r.component_id) for r in racers[:2]}
    assert others <= {Status.REFUSED, Status.AWAITING_KEY, None}, others
    assert log.read_text().split() == [placeholder_id]
    await reg.close()


@pytest.mark.parametrize("differs", ["key", "cluster", "role"])
async def test_a_registration_with_a_key_or_cluster_is_taken_by_nobody_else(
    tmp_path: Path, differs: str
) -> None:
    """With --fingerprint (or for a cluster), another key, another cluster or another role at
    the same address takes nothing, over mDNS or HTTP, with an install window open even."""
    reg = await make_registrar(tmp_path, CLC, timing=FAST)
    await reg.set_mode(Mode.ANY)
    genuine = ann(Role.CC, "c9", address=str(ADDRESS))
    placeholder_id = await placeholder(reg, Role.CC, cluster="c9", fingerprint=genuine.fingerprint)
    rogue = {
        "key": ann(Role.CC, "c9", address=str(ADDRESS)),
        "cluster": ann(Role.CC, "c8", address=str(ADDRESS), fingerprint=genuine.fingerprint),
        "role": ann(Role.WALRUS, address=str(ADDRESS), fingerprint=genuine.fingerprint),
    }[differs]
    reg.on_sighting(sighting(rogue))
    await reg.fallback(over_http(rogue))
    await settle(reg)
    assert reg.record(placeholder_id) is not None
    assert status(reg, placeholder_id) is Status.REGISTERED
    assert status(reg, rogue.component_id) is not Status.REGISTERED
    reg.on_sighting(sighting(genuine))
    await settle(reg)  # it proves its key, as its agent does with its first request
    assert status(reg, genuine.component_id) is Status.REGISTERED
    assert reg.record(placeholder_id) is None
    await reg.close()


async def test_a_component_waits_while_the_operators_registration_is_running_not_before(
    tmp_path: Path,
) -> None:
    """While the operator's hook runs (REGISTERING) the component waits; a component that
    adopts gets nothing issued until it signs for its own key (credentials)."""
    gate = tmp_path / "go"
    write_hook(
        tmp_path / "hooks",
        "walrus",
        f"i=0; while [ ! -e {gate} ] && [ $i -lt 300 ]; do sleep 0.01; i=$((i+1)); done",
    )
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    _, record = await reg.admin.register(Role.WALRUS, ADDRESS, None, None)
    assert record is not None
    await poll(lambda: status(reg, record.component_id) is Status.REGISTERING, "its hook")
    walrus = ann(Role.WALRUS, address=str(ADDRESS))
    reg.on_sighting(sighting(walrus))
    await reg.writer.flush()
    waiting = reg.record(walrus.component_id)
    assert waiting is not None and waiting.status is Status.PENDING
    assert waiting.waiting_for == f"{record.component_id} to be registered"
    gate.touch()
    await until(reg, walrus.component_id, Status.REGISTERED)
    assert reg.record(record.component_id) is None
    await reg.close()


async def test_deregistering_or_rejecting_a_placeholder(tmp_path: Path) -> None:
    """The operator changes their mind: reject is refused for a registered placeholder (409
    path: ValueError), deregister frees the address at once for the component there, which
    then meets the trust settings like any newcomer."""
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    placeholder_id = await placeholder(reg, Role.WALRUS)
    record = reg.record(placeholder_id)
    assert record is not None
    with pytest.raises(ValueError, match="deregister it instead"):
        await reg.reject(record)
    with pytest.raises(ValueError, match="already registered"):
        await reg.approve(record)
    walrus = ann(Role.WALRUS, address=str(ADDRESS), fingerprint=fake_fingerprint("w"))
    await reg.deregister(record)
    reg.on_sighting(sighting(walrus))
    await reg.idle()
    assert reg.record(placeholder_id) is None
    after = reg.record(walrus.component_id)
    assert after is not None and after.status is Status.PENDING
    assert after.waiting_for == "operator approval"
    await reg.close()


# =============================================================================================
# The API: POST /v1/announce?wait=, POST /v1/register
# =============================================================================================


@pytest.fixture
async def lan(tmp_path: Path) -> AsyncIterator[tuple[Harness, dict[str, str]]]:
    """A CLC whose /v1/announce requests come from `peer["remote"]`; mode any."""
    peer = {"remote": "10.77.0.2"}
    async with served(tmp_path, CLC_SETTINGS, middlewares=(from_lan(peer),)) as harness:
        assert (await harness.post("/v1/trust/mode", {"mode": "any"}))[0] == 200
        yield harness, peer


async def announce(
    h: Harness, peer: dict[str, str], a: Announcement, wait: float | None = None
) -> tuple[int, Any]:
    peer["remote"] = str(a.address)
    status_, answer = await fallback(h, a, query=f"?wait={wait:g}" if wait is not None else "")
    return int(status_), answer


async def cc_reports(h: Harness, peer: dict[str, str], cluster: str) -> None:
    """A CC of `cluster` joins over HTTP (a window is open) and reports itself registered."""
    cc = ann(Role.CC, cluster, api_port=8780)
    assert (await announce(h, peer, cc))[0] == 200
    await h.record_status(cc.component_id, "registered")
    assert (await announce(h, peer, replace(cc, state=AnnouncedState.REGISTERED)))[0] == 200


async def test_an_announcement_waiting_for_its_outcome_hears_it_despite_a_credential_request(
    lan: tuple[Harness, dict[str, str]],
) -> None:
    clc, peer = lan
    assert (await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"}))[0] == 200
    sc = ann(Role.SC, "c1")
    assert (await announce(clc, peer, sc))[1]["status"] == "pending"
    waiting = asyncio.ensure_future(announce(clc, peer, sc, wait=20))
    await eventually(lambda: sc.component_id in clc.registrar._changed, "the held announcement")
    # Its agent's credential request (or `eucareg join` racing the agent): answered at once.
    assert (await collect(clc, sc))[0] == 202
    await cc_reports(clc, peer, "c1")
    await clc.record_status(sc.component_id, "registered")
    done, _ = await asyncio.wait({waiting}, timeout=2)  # the change came: answered by now
    waiting.cancel()
    assert done, "the held announcement was not answered when its record changed"
    status_, answer = waiting.result()
    assert status_ == 200 and answer["status"] != "pending", answer


async def test_an_announcement_that_waited_leaves_no_waiter_behind(
    lan: tuple[Harness, dict[str, str]],
) -> None:
    clc, peer = lan
    walruses = [ann(Role.WALRUS) for _ in range(3)]
    for walrus in walruses:
        status_, answer = await announce(clc, peer, walrus, wait=0.2)
        assert (status_, answer["status"]) == (200, "pending")  # its wait ran out
    assert not clc.registrar._changed


async def test_sixty_held_announcements_all_hear_the_change_at_once(
    lan: tuple[Harness, dict[str, str]],
) -> None:
    """?wait= from 60 requests on one pending SC (loopback: no rate limit): one change
    answers them all, promptly, with the new status. (60: the test client opens at most 100
    connections, and the CC's own requests need some.)"""
    clc, peer = lan
    sc = ann(Role.SC, "c1")
    assert (await announce(clc, peer, sc))[0] == 200
    waiting = [asyncio.ensure_future(announce(clc, peer, sc, wait=20)) for _ in range(60)]
    await eventually(lambda: sc.component_id in clc.registrar._changed, "the held requests")
    began = time.monotonic()
    assert (await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"}))[0] == 200
    await cc_reports(clc, peer, "c1")
    answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert time.monotonic() - began < 5
    assert {a["status"] for _, a in answers} <= {"awaiting-key", "registering", "registered"}
    assert {s for s, _ in answers} == {200}


async def test_a_wait_on_a_refused_id_is_answered_at_once_and_leaves_nothing(
    lan: tuple[Harness, dict[str, str]],
) -> None:
    clc, peer = lan
    assert (await clc.post("/v1/trust/lock", {"tasks": "clc"}))[0] == 200
    walrus = ann(Role.WALRUS)
    began = time.monotonic()
    status_, answer = await announce(clc, peer, walrus, wait=25)
    assert time.monotonic() - began < 2
    assert (status_, answer["status"]) == (200, "refused")
    assert "waiting_for" not in answer and not clc.registrar._changed


async def test_a_wait_on_a_record_deleted_meanwhile_is_answered_at_once_as_decided_again(
    lan: tuple[Harness, dict[str, str]],
) -> None:
    """The operator deregisters a pending SC while its announcement is held: the caller is
    answered at once, with what the registrar now makes of it (still heard under its lease,
    it is a newcomer again: pending)."""
    clc, peer = lan
    sc = ann(Role.SC, "c1")
    assert (await announce(clc, peer, sc))[0] == 200
    waiting = asyncio.ensure_future(announce(clc, peer, sc, wait=20))
    await eventually(lambda: sc.component_id in clc.registrar._changed, "the held announcement")
    first = clc.registrar.record(sc.component_id)
    assert (await clc.post("/v1/deregister", {"component_id": sc.component_id}))[0] == 200
    status_, answer = await asyncio.wait_for(waiting, 5)
    now = clc.registrar.record(sc.component_id)
    assert now is not None and now != first and now.status is Status.PENDING
    assert (status_, answer["status"], answer["reason"]) == (200, "pending", now.reason)


async def test_a_wait_whose_caller_hangs_up_ends_and_the_registrar_still_answers(
    lan: tuple[Harness, dict[str, str]],
) -> None:
    clc, peer = lan
    runner = clc.client.server.runner
    assert runner is not None and runner.server is not None
    server = runner.server
    server.handler_cancellation = False  # as the agent serves it
    sc = ann(Role.SC, "c1")
    assert (await announce(clc, peer, sc))[0] == 200
    held = [asyncio.ensure_future(announce(clc, peer, sc, wait=25)) for _ in range(20)]
    await eventually(lambda: sc.component_id in clc.registrar._changed, "the held requests")
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    # The handlers notice within their hang-up checks; none is left holding a slot.
    app = clc.client.app
    assert app is not None
    limiter = app[LIMITER]
    await eventually(lambda: limiter.in_flight == 0, "the held handlers to end", timeout=5)
    status_, answer = await announce(clc, peer, sc)
    assert (status_, answer["status"]) == (200, "pending")


async def test_three_identical_manual_registrations_at_once_make_one(
    clc: Harness, tmp_path: Path
) -> None:
    bodies = [{"role": "walrus", "address": "10.77.9.9"}] * 3
    answers = await asyncio.gather(*(clc.post("/v1/register", b) for b in bodies))
    codes = sorted(s for s, _ in answers)
    assert codes == [200, 409, 409], answers
    assert {a["code"] for s, a in answers if s == 409} == {"in-use"}
    # The same address written another way is the same address.
    first = await clc.post("/v1/register", {"role": "cc", "address": "fd00::9", "cluster": "a"})
    assert first[0] == 200, first
    again = await clc.post(
        "/v1/register", {"role": "cc", "address": "FD00:0:0::0009", "cluster": "b"}
    )
    assert (again[0], again[1]["code"]) == (409, "in-use"), again


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "224.0.0.251",
        "255.255.255.255",
        "169.254.1.1",
        "fe80::1",
        "fe80::1%eth0",
        "::ffff:10.77.9.9",
        "192.0.2.1",
        "ff02::fb",
        "010.077.009.009",
        "10.77.9.9\n",
        " 10.77.9.9",
        "10.77.9.9/32",
        "\u0661\u0660.77.9.9",  # Arabic-Indic digits
    ],
)
async def test_a_manual_registration_takes_only_a_routable_unicast_address(
    clc: Harness, address: str
) -> None:
    status_, answer = await clc.post("/v1/register", {"role": "walrus", "address": address})
    assert status_ == 400, answer
    assert clc.registrar.records() == {}


async def test_manual_registrations_a_registrar_does_not_make_are_refused(
    clc: Harness, tmp_path: Path
) -> None:
    cases = [
        ({"role": "nc", "address": "10.77.9.9", "cluster": "c1"}, 400, "not-mine"),
        ({"role": "clc", "address": "10.77.9.9"}, 400, None),
        ({"role": "walrus", "address": "10.77.9.9", "cluster": "c1"}, 400, "invalid-field"),
        ({"role": "cc", "address": "10.77.9.9"}, 400, "missing-field"),
        ({"role": "cc", "address": "10.77.9.9", "cluster": "c1\n"}, 400, None),
        ({"role": "cc", "address": "10.77.9.9", "cluster": "-c1"}, 400, None),
        ({"role": "cc", "address": "10.77.9.9", "cluster": "c" * 65}, 400, None),
        ({"role": "sc", "address": "10.77.9.9", "cluster": "c1"}, 409, "waiting-for-cluster"),
        ({"role": "walrus", "address": "10.77.9.9", "fingerprint": "sha256:AB"}, 400, None),
    ]
    for body, want, code in cases:
        status_, answer = await clc.post("/v1/register", body)
        assert status_ == want, (body, answer)
        if code is not None:
            assert answer["code"] == code, (body, answer)
    assert clc.registrar.records() == {}
    status_, _ = await clc.admin(
        "POST", "/v1/register", {"role": "walrus", "address": "10.77.9.9"}, token=None
    )
    assert status_ in (401, 403)
    async with served(tmp_path / "cc", CC_SETTINGS) as cc:
        status_, answer = await cc.post(
            "/v1/register", {"role": "nc", "address": "10.77.9.9", "cluster": "cluster2"}
        )
        assert (status_, answer["code"]) == (400, "not-mine")
        status_, answer = await cc.post(
            "/v1/register", {"role": "nc", "address": "10.77.9.9", "cluster": "cluster1"}
        )
        assert status_ == 200, answer  # this CC holds its credentials (the harness says so)


async def test_a_component_over_http_is_told_to_wait_for_a_running_manual_registration(
    tmp_path: Path,
) -> None:
    peer = {"remote": "10.77.0.2"}
    async with served(tmp_path, CLC_SETTINGS, middlewares=(from_lan(peer),)) as clc:
        write_hook(clc.registrar.hook_dir, "walrus", "exit 1")  # retried, with backoff
        status_, answer = await clc.post("/v1/register", {"role": "walrus", "address": "10.77.9.9"})
        assert status_ == 200, answer
        placeholder_id = answer["component"]["component_id"]
        await clc.record_status(placeholder_id, "failed")
        walrus = ann(Role.WALRUS, address="10.77.9.9")
        status_, answer = await announce(clc, peer, walrus)
        assert (status_, answer["status"]) == (200, "pending"), answer
        assert answer["waiting_for"] == f"{placeholder_id} to be registered"


async def test_leases_ending_in_the_middle_of_reports_leave_a_consistent_registrar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease of 6 ms: leases end between, and while, 200 concurrent reports of a CC that
    flips between "registered" and "ready" and an SC decided meanwhile; afterwards nothing is
    left heard, nothing failed, and the records are what they were."""
    reg = await make_registrar(tmp_path, CLC, timing=replace(FAST, report_interval=0.002))
    await reg.set_mode(Mode.ANY)
    cc = over_http(ann(Role.CC, "c1", api_port=8780))
    await reg.fallback(cc)
    await until(reg, cc.component_id, Status.REGISTERED)
    sc = ann(Role.SC, "c1")
    reports = [
        reg.fallback(replace(cc, state=AnnouncedState.REGISTERED if n % 2 else cc.state))
        for n in range(200)
    ]
    reg.on_sighting(sighting(sc))
    await asyncio.gather(*reports)
    await until(reg, sc.component_id, Status.REGISTERED, Status.PENDING)
    await poll(lambda: not reg.presence.leased, "the last lease to end")
    await reg.idle()
    assert cc.component_id not in reg.live
    assert status(reg, cc.component_id) is Status.REGISTERED
    assert not [r for r in caplog.records if "task failed" in r.getMessage()]
    await reg.close()


class CountingLive(dict[str, Announcement]):
    """The registrar's live announcements, counting the entries anyone iterates over."""

    looked_at = 0

    def values(self) -> Iterator[Announcement]:  # type: ignore[override]
        for value in super().values():
            CountingLive.looked_at += 1
            yield value


async def test_a_flip_of_an_unadmitted_cc_costs_a_reconsider_linear_in_what_is_heard(
    tmp_path: Path,
) -> None:
    reg = await make_registrar(tmp_path, CLC, timing=FAST, install_window=False)
    live = CountingLive()
    reg.presence.live = reg.live = live
    reg.presence.online = reg.online_ids = Online(live, reg.presence.polling)
    n = 600
    for i in range(n):  # pending SCs (each waits for its cluster), as a flood leaves them
        sc = ann(Role.SC, f"c{i}", fingerprint=fake_fingerprint(f"sc{i}"))
        reg.on_sighting(sighting(sc))
    await reg.idle()
    await reg.set_mode(Mode.ANY)
    attacker = over_http(ann(Role.CC, "evil", api_port=8780, fingerprint=fake_fingerprint("cc")))
    await reg.fallback(attacker)  # pending: waiting for approval
    await reg.idle()
    CountingLive.looked_at = 0
    await reg.fallback(replace(attacker, state=AnnouncedState.REGISTERED))
    await reg.idle()
    assert CountingLive.looked_at <= 20 * n, CountingLive.looked_at
    await reg.close()


# =============================================================================================
# Reports of registered components, and the agent that sends them
# =============================================================================================


async def test_a_certified_report_of_the_registered_address_is_heard_from_behind_nat(
    tmp_path: Path,
) -> None:
    peer = {"remote": "10.77.0.2"}
    served_ = served(
        tmp_path / "clc", CLC_SETTINGS, middlewares=(from_lan(peer),), tls_dir=tmp_path / "tls"
    )
    async with served_ as clc, aiohttp.ClientSession() as session:
        clc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        reg = clc.registrar
        await reg.open_install_window(600)
        walrus = ann(Role.WALRUS)
        reg.on_sighting(sighting(walrus))
        await reg.idle()
        answer = await reg.credentials(walrus.component_id, key_of(walrus).public_key(), wait=5)
        assert answer.files is not None  # registered at its own address
        peer["remote"] = "192.168.200.1"  # the site's NAT
        endpoint = Endpoint("127.0.0.1", clc.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=clc.cloud.issuer.cert)
        status_, data = await agent_collect._signed_post(
            session,
            endpoint,
            "/v1/announce",
            key_of(walrus),
            {"txt": txt_of(walrus)},
            expect,
            certificate(tmp_path / "w", clc, walrus),
        )
        assert status_ == 200, data
        assert data["status"] == "registered"


class SwitchingRegistrar(FakeRegistrar):
    """A fake registrar whose /v1/announce answer can be switched: as the genuine one, or
    refused (403), or a 200 whose body is not JSON."""

    def __init__(self, cloud: FakeCloud) -> None:
        super().__init__(bundle_reply(cloud, Role.WALRUS, watch=0.1), cloud)
        self.refresh = 1
        self.mode = "genuine"

    async def _announce(self, request: web.Request) -> web.Response:
        if self.mode == "genuine":
            return await super()._announce(request)
        self.announcements += 1
        if self.mode == "refused":
            body = {"error": "addr=10.0.2.10 is not the address …", "code": "address-mismatch"}
            return web.json_response(body, status=403)
        return web.Response(text="<html>maintenance</html>", content_type="text/html")


@contextlib.asynccontextmanager
async def reporting_walrus(tmp_path: Path) -> AsyncIterator[tuple[SwitchingRegistrar, Any]]:
    """A Walrus whose agent joined through its fallback registrar and is registered."""
    cloud = FakeCloud()
    registrar = SwitchingRegistrar(cloud)
    url = await registrar.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url)
    agent = Agent(cfg, backend=FakeMdns(), timing=AGENT_TIMING)
    await agent.start()
    try:
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None
        await agent_eventually(lambda: walrus.registered, timeout=5)
        yield registrar, walrus
    finally:
        await agent.stop()
        await registrar.close()


AGENT_TIMING = AgentTiming(long_poll=0.3, retry_base=0.02, retry_max=0.1, min_request_interval=0.02)


async def test_a_registered_component_whose_reports_are_refused_still_learns_its_revocation(
    tmp_path: Path,
) -> None:
    async with reporting_walrus(tmp_path) as (registrar, walrus):
        registrar.mode = "refused"
        registrar.default = json_reply({"error": "revoked", "code": "revoked"}, status=410)
        await agent_eventually(lambda: not walrus.registered, timeout=10)


@pytest.mark.parametrize("mode", ["refused", "not-json", "gone"])
async def test_a_registered_component_keeps_its_credentials_when_its_registrar_misbehaves(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused reports, a 200 that is not JSON, a registrar that is gone: retried, and the
    credentials stay (only a 410 to the component's own watch removes them)."""
    async with reporting_walrus(tmp_path) as (registrar, walrus):
        key_dir = walrus.cfg.key_dir
        held = sorted(p.name for p in key_dir.iterdir())
        if mode == "gone":
            assert registrar.server is not None
            caplog.clear()
            await registrar.server.close()  # connection refused from now on

            def failed_rounds() -> int:
                return sum(
                    " failed: " in r.message and "report of" in r.message for r in caplog.records
                )

            # Generous: each round is a connect refused and a backoff of at most 0.1 s, but a
            # request that reached the server as it closed is left unanswered, and the agent
            # gives up on it only after its own timeout (the wait + 10 s): CI saw 20 s pass.
            await agent_eventually(lambda: failed_rounds() >= 3, timeout=60)
        else:
            registrar.mode = mode
            before = registrar.announcements
            await agent_eventually(lambda: registrar.announcements >= before + 3, timeout=20)
        assert walrus.registered
        assert sorted(p.name for p in key_dir.iterdir()) == held


# =============================================================================================
# eucareg join
# =============================================================================================

JOIN_CONFIG = """\
address = "10.0.2.10"
state_dir = "{state}"

[preconditions]
sshd = false

[components.cc]
cluster = "cluster2"
installed = true
"""


def join_config(path: Path, tmp_path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(JOIN_CONFIG.format(state=tmp_path / "state"))
    path.chmod(mode)
    return path


@contextlib.asynccontextmanager
async def fake_registrar() -> AsyncIterator[tuple[FakeRegistrar, str, str]]:
    cloud = FakeCloud()
    registrar = FakeRegistrar(cloud=cloud)
    url = await registrar.start()
    try:
        yield registrar, url, token_for(cloud)
    finally:
        await registrar.close()


@pytest.mark.usefixtures("no_host_config")
async def test_join_does_not_leave_the_token_secret_readable_by_everyone(tmp_path: Path) -> None:
    config = join_config(tmp_path / "eucareg.toml", tmp_path, mode=0o644)
    async with fake_registrar() as (_, url, token):
        result = await run("join", url, "--token", token, "--config", str(config), "--wait", "1s")
    assert result.exit_code == 0, result.output
    assert token in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) & 0o007 == 0, oct(config.stat().st_mode)


@pytest.mark.usefixtures("no_host_config")
async def test_join_writes_through_a_symlinked_configuration(tmp_path: Path) -> None:
    real = join_config(tmp_path / "managed" / "eucareg.toml", tmp_path)
    link = tmp_path / "etc" / "eucareg.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    async with fake_registrar() as (_, url, token):
        result = await run("join", url, "--token", token, "--config", str(link), "--wait", "1s")
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert token in real.read_text()


@pytest.mark.usefixtures("no_host_config")
async def test_join_does_not_write_through_a_planted_backup_symlink(tmp_path: Path) -> None:
    config = join_config(tmp_path / "eucareg.toml", tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    config.with_name("eucareg.toml.bak").symlink_to(victim)
    async with fake_registrar() as (_, url, token):
        await run("join", url, "--token", token, "--config", str(config), "--wait", "1s")
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


@pytest.mark.usefixtures("no_host_config")
@pytest.mark.parametrize("bad", ["another-role", "revoked"])
async def test_join_says_why_the_registrar_refused_its_token(tmp_path: Path, bad: str) -> None:
    config = join_config(tmp_path / "eucareg.toml", tmp_path)
    async with served(tmp_path / "clc", CLC_SETTINGS, tls_dir=tmp_path / "tls") as clc:
        clc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        url = f"https://127.0.0.1:{clc.client.port}"
        reg = clc.registrar
        role = Role.SC if bad == "another-role" else Role.CC
        token = await reg.create_token(role, "cluster2", 600, 1, clc.cloud.fingerprint)
        if bad == "revoked":
            await reg.revoke_token(token.split(".")[1])
        result = await run("join", url, "--token", token, "--config", str(config), "--json")
        assert result.exit_code == 1, result.output
        [outcome] = json.loads(result.stdout)["components"]
        assert outcome["status"] == "refused", outcome
        assert reg.records() == {}
        assert "mode any" not in outcome["reason"], outcome["reason"]
        assert ("for a sc" if bad == "another-role" else "revoked") in outcome["reason"]


@pytest.mark.usefixtures("no_host_config")
async def test_join_against_the_real_registrar_is_pinned_signed_and_bounded(
    tmp_path: Path,
) -> None:
    """The registrar itself (real TLS as the CLC): the right token is accepted in mode
    local, the request signed by the component's new key over a connection pinned to the
    token's CA; a --wait past its bound is refused before anything is done."""
    config = join_config(tmp_path / "eucareg.toml", tmp_path)
    async with served(tmp_path / "clc", CLC_SETTINGS, tls_dir=tmp_path / "tls") as clc:
        clc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        url = f"https://127.0.0.1:{clc.client.port}"
        reg = clc.registrar
        token = await reg.create_token(Role.CC, "cluster2", 600, 1, clc.cloud.fingerprint)
        result = await run(
            "join", url, "--token", token, "--config", str(config), "--wait", "9999d"
        )
        assert result.exit_code == 2 and "--wait" in result.output
        assert reg.records() == {}
        result = await run("join", url, "--token", token, "--config", str(config), "--json")
        assert result.exit_code == 0, result.output
        [outcome] = json.loads(result.stdout)["components"]
        assert outcome["status"] in ("registering", "registered"), outcome
        record = reg.record(outcome["component_id"])
        assert record is not None and record.admitted_by.startswith("token:")
        assert record.address == "10.0.2.10"  # vouched for by the token's proof, not by TCP


# =============================================================================================
# The agent's side of a lease
# =============================================================================================


@pytest.mark.parametrize(
    ("given", "used"),
    [
        (float("inf"), agent_collect.WATCH_POLL),
        (float("-inf"), agent_collect.MIN_REFRESH),
        (-5, agent_collect.MIN_REFRESH),
        (0, agent_collect.MIN_REFRESH),
        (10**400, agent_collect.WATCH_POLL),
        ("NaN", agent_collect.DEFAULT_REFRESH),
        ([30], agent_collect.DEFAULT_REFRESH),
    ],
)
def test_no_refresh_a_registrar_sends_makes_the_agent_spin_or_go_quiet(
    given: object, used: float
) -> None:
    assert agent_collect.refresh_of({"refresh": given}) == used


class HonestWait(FakeRegistrar):
    """Credential requests are held as long as they ask (`?wait=`), then 202, as the
    registrar does; each /v1/announce is timed."""

    def __init__(self) -> None:
        super().__init__(self._held)
        self.announced_at: list[float] = []

    async def _held(self, _payload: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(float(self.waits[-1]))
        return web.json_response({"status": "pending", "reason": "waiting"}, status=202)

    async def _announce(self, request: web.Request) -> web.Response:
        self.announced_at.append(time.monotonic())
        return await super()._announce(request)


async def test_a_pending_component_announces_again_within_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scaled down (the registrar's least report_interval is 1 s, the agent's MIN_REFRESH too).
    monkeypatch.setattr(agent_collect, "MIN_REFRESH", 0.05)
    registrar = HonestWait()
    registrar.refresh = 0.2  # heard for 0.6 s after each announcement
    url = await registrar.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url)
    timing = replace(AGENT_TIMING, long_poll=1.5)
    agent = Agent(cfg, backend=FakeMdns(), timing=timing)
    await agent.start()
    try:
        await agent_eventually(lambda: len(registrar.announced_at) >= 2, timeout=3)
        first, second = registrar.announced_at[:2]
        assert second - first < 3 * registrar.refresh, second - first
    finally:
        await agent.stop()
        await registrar.close()
