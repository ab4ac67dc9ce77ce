"""The agent's credential collection against a scripted registrar on 127.0.0.1: malformed
answers are logged and retried, credentials land 0600, keys are read once, a deleted file is
collected again, and what a 410 does. mDNS is the in-memory fake; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eucareg.agent.host import Agent, AgentTiming
from eucareg.agent.locate import Registrars
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Role
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs
from tests.unit.test_agent_fakes import (
    FakeCloud,
    FakeMdns,
    FakeRegistrar,
    bundle_reply,
    eventually,
    json_reply,
    key,
    make_config,
    seed_identity,
    text_reply,
)

WALRUS_ID = "walrus-00000000aaaa"
TIMING = AgentTiming(
    long_poll=0.3, retry_base=0.02, retry_max=0.1, min_request_interval=0.02, stop_step=1.0
)

StartAgent = Callable[..., Awaitable[tuple[Agent, FakeMdns]]]


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud()


@pytest.fixture
async def start_walrus(tmp_path: Path) -> AsyncIterator[StartAgent]:
    """Start a Walrus-only agent (pooled key), asking `fallback` if given; stopped after."""
    agents: list[Agent] = []

    async def start(fallback: str | None = None, **top: Any) -> tuple[Agent, FakeMdns]:
        seed_identity(tmp_path / "state", Role.WALRUS, WALRUS_ID, key(1))
        if fallback is not None:
            top["fallback_registrar"] = fallback
        mdns = FakeMdns()
        agent = Agent(make_config(tmp_path, {"walrus": {}}, **top), backend=mdns, timing=TIMING)
        agents.append(agent)
        await agent.start()
        return agent, mdns

    yield start
    for agent in agents:
        await agent.stop()


@pytest.fixture
async def registrar(cloud: FakeCloud) -> AsyncIterator[FakeRegistrar]:
    fake = FakeRegistrar(bundle_reply(cloud, Role.WALRUS), cloud)
    yield fake
    await fake.close()


def walrus_of(agent: Agent) -> Any:
    comp = agent.runtime(Role.WALRUS)
    assert comp is not None
    return comp


def fresh_requests(fake: FakeRegistrar) -> list[dict[str, Any]]:
    """Requests for credentials (not watches of credentials held)."""
    return [r for r in fake.requests if "have" not in r]


async def test_collection_survives_malformed_answers_and_collects_once_answered_well(
    start_walrus: StartAgent,
    registrar: FakeRegistrar,
    cloud: FakeCloud,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="eucareg")
    someone_else = cloud.bundle(Role.WALRUS, key(2).public_key(), "walrus-00000000bbbb")
    registrar.script = [
        text_reply("<html>proxy error</html>"),
        json_reply({"status": "registered"}),
        json_reply({"status": "registered", "files": someone_else}),
        text_reply("internal error", status=500),
        json_reply(["not", "an", "object"]),
    ]
    url = await registrar.start()
    agent, _ = await start_walrus(url)
    walrus = walrus_of(agent)
    await eventually(lambda: walrus.registered)

    assert len(fresh_requests(registrar)) == 6  # five bad answers, then the good one
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "eucareg.agent.component" and r.levelno == logging.WARNING
    ]
    for reason in (
        "answer is not JSON",
        "without a credential bundle",
        "does not certify this component's key",
        "HTTP 500",
        "answer is not a JSON object",
    ):
        said = [w for w in warnings if reason in w]
        assert said, f"no warning says {reason!r}: {warnings}"
        assert WALRUS_ID in said[0] and url in said[0] and "retrying in" in said[0]
    assert agent.supervisor.restarts == {}  # the loop itself never died
    key_dir = agent.config.key_dir
    assert sorted(p.name for p in key_dir.iterdir()) == cred.required_files(Role.WALRUS)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_dir.iterdir())
    assert cred.credentials_present(key_dir, Role.WALRUS, key(1))


async def test_keys_are_loaded_once_and_rechecks_only_stat_the_files(
    start_walrus: StartAgent,
    cloud: FakeCloud,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_dir = tmp_path / "state" / "keys"
    held = cloud.bundle(Role.WALRUS, key(1).public_key(), WALRUS_ID)
    cred.write_credentials(key_dir, Role.WALRUS, cred.verify_bundle(held, Role.WALRUS, key(1)))
    loads: list[tuple[str, bool]] = []
    real_load = keypairs.load_key

    def counting_load(path: Path) -> keypairs.PrivateKey:
        loads.append((path.name, threading.current_thread() is threading.main_thread()))
        return real_load(path)

    monkeypatch.setattr(keypairs, "load_key", counting_load)
    agent, mdns = await start_walrus()  # no registrar to ask: nothing but re-checks happens
    walrus = walrus_of(agent)
    assert walrus.registered
    await eventually(lambda: mdns.publishes >= 1)
    after_start = list(loads)
    # The identity key and the stored key copy, each read once, neither on the event loop.
    assert after_start == [("walrus.key.pem", False), ("walrus-pk.pem", False)]
    seen = mdns.publishes
    for more in range(1, 6):  # five more re-checks, each woken as the file watch wakes it
        walrus.wake.set()
        await eventually(lambda more=more: mdns.publishes >= seen + more)
    assert loads == after_start
    assert walrus.presence.verifications == 1


async def test_a_deleted_credential_file_makes_the_component_collect_again(
    start_walrus: StartAgent, registrar: FakeRegistrar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eucareg")
    agent, _ = await start_walrus(await registrar.start())
    walrus = walrus_of(agent)
    await eventually(lambda: walrus.registered)
    await eventually(lambda: any("have" in r for r in registrar.requests))  # now watching
    own_cert = agent.config.key_dir / cred.LAYOUTS[Role.WALRUS].cert

    own_cert.unlink()
    await eventually(lambda: len(fresh_requests(registrar)) == 2)
    await eventually(lambda: walrus.registered and own_cert.exists())
    assert any("no longer registered" in r.getMessage() for r in caplog.records)
    assert stat.S_IMODE(own_cert.stat().st_mode) == 0o600


async def test_a_410_from_the_registrar_we_watch_is_believed_and_we_collect_again(
    start_walrus: StartAgent,
    registrar: FakeRegistrar,
    cloud: FakeCloud,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What an unsigned 410 does, pinned or not: answers carry no signature, so whoever
    answers in our registrar's place (here the configured fallback) makes us drop our
    certificate and key copy. We then announce as unregistered and collect again; no private
    key ever leaves, and cloud-cert.pem (shared on the host) stays. The defence is whom we
    ask: see the next test."""
    caplog.set_level(logging.INFO, logger="eucareg")
    genuine = bundle_reply(cloud, Role.WALRUS)
    registrar.script = [genuine, json_reply({"error": "revoked (rogue)"}, status=410)]
    agent, _ = await start_walrus(await registrar.start())
    walrus = walrus_of(agent)
    key_dir = agent.config.key_dir

    await eventually(lambda: len(fresh_requests(registrar)) == 2)  # the 410, then afresh
    await eventually(lambda: walrus.registered)
    assert [("have" in r) for r in registrar.requests[:3]] == [False, True, False]
    assert registrar.requests[1]["have"] == cloud.serial(key(1).public_key())
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"credentials of {WALRUS_ID} revoked" in m for m in messages)
    assert any("no longer registered" in m for m in messages)
    assert cred.credentials_present(key_dir, Role.WALRUS, key(1))


def clc_sighting(instance: str, fingerprint: str, address: str) -> Sighting:
    record = txt.encode(
        role=Role.CLC,
        component_id=instance.removeprefix("cloud-"),
        cluster=None,
        state=AnnouncedState.READY,
        address=ipaddress.ip_address(address),
        fingerprint=fingerprint,
        api_port=8780,
        eucavers="3.4",
    )
    return Sighting(instance, Change.ADDED, txt=record, addresses=(address,))


def test_candidates_put_the_registrar_that_certified_us_first(cloud: FakeCloud) -> None:
    """Every CLC heard is a candidate (TLS decides which is genuine, pki/tls.py); the one
    that certified the credentials we hold is asked first, and a pin filters by the key
    announced, so a stranger is not even tried."""
    registrars = Registrars()
    rogue_fp = keypairs.fingerprint(key(3).public_key())
    registrars.on_sighting(clc_sighting("cloud-clc-00000000dead", rogue_fp, "10.0.2.9"))
    registrars.on_sighting(clc_sighting("cloud-clc-00000000c10d", cloud.fingerprint, "10.0.2.66"))

    first = registrars.candidates(Role.WALRUS, None, pin=None, issuer=None)
    watched = registrars.candidates(Role.WALRUS, None, pin=None, issuer=cloud.fingerprint)
    assert [ep.address for ep in first] == ["10.0.2.9", "10.0.2.66"]  # by address, as numbers
    assert [ep.address for ep in watched] == ["10.0.2.66", "10.0.2.9"]
    pinned = registrars.candidates(Role.WALRUS, None, pin=cloud.fingerprint, issuer=None)
    assert [ep.address for ep in pinned] == ["10.0.2.66"]

    registrars.on_sighting(Sighting("cloud-clc-00000000c10d", Change.REMOVED))
    assert [
        ep.address for ep in registrars.candidates(Role.WALRUS, None, pin=None, issuer=None)
    ] == ["10.0.2.9"]
    assert registrars.candidates(Role.WALRUS, None, pin=cloud.fingerprint, issuer=None) == []


async def test_a_flapping_announcer_does_not_make_us_retry_in_a_loop(tmp_path: Path) -> None:
    """After a failed request, a change among the registrars heard cuts the wait short, but
    never below min_request_interval: a decoy re-announcing itself every 10 ms must not turn
    our retries into a loop against whoever fails us."""
    accepted = 0

    async def garbage(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.write(b"\x00\xff not TLS")
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    slow = AgentTiming(long_poll=0.3, retry_base=2.0, retry_max=4.0, min_request_interval=0.5)
    seed_identity(tmp_path / "state", Role.WALRUS, WALRUS_ID, key(1))
    cfg = make_config(tmp_path, {"walrus": {}}, fallback_registrar=f"https://127.0.0.1:{port}")
    mdns = FakeMdns()
    agent = Agent(cfg, backend=mdns, timing=slow)
    await agent.start()
    try:
        await eventually(lambda: accepted >= 1)
        began, first, n = time.monotonic(), accepted, 0
        record = txt.encode(
            role=Role.CC,
            component_id="cc-00000000f1a9",
            cluster="other",
            state=AnnouncedState.REGISTERED,
            address=ipaddress.ip_address("10.0.2.50"),
            fingerprint="sha256:" + "f" * 64,
            api_port=8780,
            eucavers="3.4",
        )
        while time.monotonic() - began < 2.5:  # another cluster's CC, flapping
            n += 1
            change = Change.ADDED if n % 2 else Change.REMOVED
            mdns.hear(Sighting("cluster-cc-f1a9", change, txt=record, addresses=("10.0.2.50",)))
            await asyncio.sleep(0.01)
        # One attempt a second at most (min_request_interval 0.5 s, the backoff 2 s and
        # more), not one per flap (about 250).
        assert accepted - first <= 6, (accepted - first, n)
    finally:
        await agent.stop()
        server.close()
        await server.wait_closed()
