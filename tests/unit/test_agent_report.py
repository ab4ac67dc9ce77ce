"""The agent past the LAN: with a fallback registrar it waits `fallback_after` for mDNS first,
then announces over HTTP, and once registered keeps announcing itself there as often as the
registrar's `refresh` asks, or the registrar stops hearing it (and its SC waits again)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from eucareg.agent import collect
from eucareg.agent.host import Agent, AgentTiming
from eucareg.agent.locate import Registrars
from eucareg.core.model import Role
from tests.unit.test_agent_fakes import (
    FakeCloud,
    FakeMdns,
    FakeRegistrar,
    bundle_reply,
    eventually,
    key,
    make_config,
    seed_identity,
)

TIMING = AgentTiming(long_poll=0.3, retry_base=0.02, retry_max=0.1, min_request_interval=0.02)


async def test_a_registered_component_keeps_reporting_with_its_certificate(tmp_path: Path) -> None:
    cloud = FakeCloud()
    registrar = FakeRegistrar(bundle_reply(cloud, Role.WALRUS, watch=0.5), cloud)
    registrar.refresh = 1
    url = await registrar.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url)
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None
        await eventually(lambda: walrus.registered, timeout=5)
        registered_at = time.monotonic()
        reports = len(registrar.announced)
        await eventually(lambda: len(registrar.announced) >= reports + 2, timeout=5)
        last = registrar.announced[-1]["txt"]
        # Announced as itself (only a CC says "registered" in its record; see test_cloud.py).
        assert last["id"] == "walrus-00000000aaaa" and last["type"] == "walrus"
        # Between reports it watches its certificate, for no longer than the registrar's
        # refresh (a watch is otherwise held for minutes).
        watches = [
            w for r, w in zip(registrar.requests, registrar.waits, strict=True) if r.get("have")
        ]
        assert watches and all(float(w) == 1.0 for w in watches), watches
        assert time.monotonic() - registered_at >= 0.5
    finally:
        await agent.stop()
        await registrar.close()


async def test_the_fallback_waits_for_mdns_for_fallback_after(tmp_path: Path) -> None:
    registrar = FakeRegistrar()
    url = await registrar.start()
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url, fallback_after="1s")
    began = time.monotonic()
    agent = Agent(cfg, backend=FakeMdns(), timing=TIMING)
    await agent.start()
    try:
        await eventually(lambda: registrar.announcements >= 1, timeout=5)
        assert time.monotonic() - began >= 1.0
    finally:
        await agent.stop()
        await registrar.close()


def test_fallback_in_counts_down_and_is_none_without_a_fallback() -> None:
    now = [100.0]
    registrars = Registrars(("10.0.2.1", 8780), fallback_after=10, clock=lambda: now[0])
    assert registrars.fallback_in() == 10
    assert registrars.candidates(Role.WALRUS, None, pin=None, issuer=None) == []
    now[0] = 110.0
    assert registrars.fallback_in() == 0
    [endpoint] = registrars.candidates(Role.WALRUS, None, pin=None, issuer=None)
    assert (endpoint.address, endpoint.port, endpoint.component_id) == ("10.0.2.1", 8780, "")
    assert Registrars(None).fallback_in() is None


def test_the_fallback_moment_is_stretched_at_random_within_the_spread() -> None:
    """Hosts booted together do not fall back together: each waits fallback_after times a
    random factor in [1, 1 + spread], never less than fallback_after."""
    drawn: list[tuple[float, float]] = []

    def rng(low: float, high: float) -> float:
        drawn.append((low, high))
        return high

    now = [0.0]
    registrars = Registrars(
        ("10.0.2.1", 8780), fallback_after=10, fallback_spread=0.25, clock=lambda: now[0], rng=rng
    )
    assert drawn == [(1.0, 1.25)]
    assert registrars.fallback_in() == 12.5
    now[0] = 12.4
    assert registrars.candidates(Role.WALRUS, None, pin=None, issuer=None) == []
    now[0] = 12.5
    assert registrars.fallback_in() == 0
    # With the real random draw, 200 hosts spread over the whole window, none before it.
    waits = [
        Registrars(("10.0.2.1", 8780), fallback_after=10, fallback_spread=0.25).fallback_after
        for _ in range(200)
    ]
    assert min(waits) >= 10 and max(waits) <= 12.5
    assert max(waits) - min(waits) > 1.5  # uniform over 2.5 s: the spread is really used
    # No fallback wait: still none, whatever the spread.
    assert Registrars(("10.0.2.1", 8780), fallback_spread=0.25).fallback_in() == 0


def test_the_agent_stretches_its_fallback_by_its_timing(tmp_path: Path) -> None:
    url = "https://10.0.2.1:8780"
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=url, fallback_after="4s")
    assert (
        Agent(
            cfg, backend=FakeMdns(), timing=AgentTiming(fallback_spread=0.0)
        ).registrars.fallback_after
        == 4
    )
    waits = {Agent(cfg, backend=FakeMdns()).registrars.fallback_after for _ in range(20)}
    assert all(4 <= w <= 5 for w in waits) and len(waits) > 1


@pytest.mark.parametrize(
    ("given", "used"),
    [
        (30, 30.0),
        (0.001, collect.MIN_REFRESH),
        (10**9, collect.WATCH_POLL),
        (float("nan"), collect.DEFAULT_REFRESH),
        (True, collect.DEFAULT_REFRESH),
        ("5", collect.DEFAULT_REFRESH),
        (None, collect.DEFAULT_REFRESH),
    ],
)
def test_a_registrar_cannot_make_us_spin_or_sleep_for_good(given: object, used: float) -> None:
    assert collect.refresh_of({"refresh": given}) == used


async def test_fallback_after_passes_while_waiting(tmp_path: Path) -> None:
    """Nothing heard and nothing changing: the collect loop still wakes when the fallback's
    time comes (it waits on the registrars with that timeout, not for ever)."""
    registrars = Registrars(("127.0.0.1", 1), fallback_after=0.2)
    began = time.monotonic()
    await registrars.wait_changed(registrars.fallback_in())
    assert 0.15 <= time.monotonic() - began < 2
    await asyncio.sleep(0)
