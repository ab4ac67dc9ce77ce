"""An idle registered component waits for events, not timers: no credential re-check, no
announce round, no new request while nothing changes, however short recheck_interval is; a
file change still acts at once. Only sshd, or files that cannot be watched, are polled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eucareg.agent import watch as watch_module
from eucareg.agent.host import Agent, AgentTiming
from eucareg.agent.presence import Held
from eucareg.core.model import Role
from eucareg.pki import credentials as cred
from tests.unit.test_agent_fakes import (
    FakeCloud,
    FakeMdns,
    FakeRegistrar,
    eventually,
    key,
    make_config,
    seed_identity,
)

WALRUS_ID = "walrus-00000000aaaa"
RECHECK = 0.05  # seconds: the idle window below spans many of them
TIMING = AgentTiming(long_poll=0.3, retry_base=0.02, retry_max=0.1, min_request_interval=0.02)

Start = Callable[..., Awaitable[Agent]]


class Counted:
    """Counts the credential re-checks of a component (CredentialPresence.check)."""

    def __init__(self, comp: Any) -> None:
        self.calls = 0
        real: Callable[[], Awaitable[Held]] = comp.presence.check

        async def check() -> Held:
            self.calls += 1
            return await real()

        comp.presence.check = check


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a Walrus agent holding valid credentials (pooled key); stopped after."""
    agents: list[Agent] = []

    async def run(mdns: FakeMdns, walrus: dict[str, Any] | None = None, **top: Any) -> Agent:
        seed_identity(tmp_path / "state", Role.WALRUS, WALRUS_ID, key(1))
        held = FakeCloud().bundle(Role.WALRUS, key(1).public_key(), WALRUS_ID)
        key_dir = tmp_path / "state" / "keys"
        cred.write_credentials(key_dir, Role.WALRUS, cred.verify_bundle(held, Role.WALRUS, key(1)))
        top.setdefault("preconditions", {"sshd": False, "recheck_interval": RECHECK})
        agent = Agent(
            make_config(tmp_path, {"walrus": walrus or {}}, **top), backend=mdns, timing=TIMING
        )
        agents.append(agent)
        await agent.start()
        return agent

    yield run
    for agent in agents:
        await agent.stop()


def walrus_of(agent: Agent) -> Any:
    comp = agent.runtime(Role.WALRUS)
    assert comp is not None
    return comp


async def intervals_pass(count: int) -> None:
    """Until the loop's clock is `count` recheck intervals further on (a positive event)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + count * RECHECK
    await eventually(lambda: loop.time() >= until)


async def test_an_idle_registered_component_does_nothing_until_a_file_changes(
    start: Start,
) -> None:
    registrar = FakeRegistrar()  # holds every request: the watch stays open, as a CC holds it
    url = await registrar.start()
    try:
        mdns = FakeMdns()
        agent = await start(mdns, fallback_registrar=url)
        walrus = walrus_of(agent)
        assert walrus.registered
        await eventually(lambda: registrar.held == 1 and mdns.publishes >= 1)
        assert registrar.requests[-1].get("have")  # watching the credentials it holds
        checks, publishes, requests = Counted(walrus), mdns.publishes, len(registrar.requests)

        await intervals_pass(20)
        assert checks.calls == 0
        assert mdns.publishes == publishes
        assert len(registrar.requests) == requests

        (agent.config.key_dir / cred.LAYOUTS[Role.WALRUS].cert).unlink()
        await eventually(lambda: not walrus.registered)
        assert checks.calls >= 1
    finally:
        await registrar.close()


async def test_the_installed_file_is_watched_not_polled(start: Start, tmp_path: Path) -> None:
    marker = tmp_path / "dpkg" / "info" / "eucalyptus-walrus.list"  # no directory either, yet
    mdns = FakeMdns()
    # An hour between re-checks: only the watch can make it announce within the test.
    agent = await start(
        mdns,
        preconditions={"sshd": False, "recheck_interval": 3600},
        walrus={"installed": str(marker)},
    )
    walrus = walrus_of(agent)
    await eventually(lambda: ("withdraw", walrus.instance) in mdns.calls or not walrus.announced)
    assert not mdns.published
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    await eventually(lambda: walrus.instance in mdns.published)
    marker.unlink()
    await eventually(lambda: walrus.instance not in mdns.published)


async def test_sshd_alone_is_still_probed_every_recheck_interval(start: Start) -> None:
    probes = 0

    async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal probes
        probes += 1
        writer.write(b"SSH-2.0-test\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(sshd, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mdns = FakeMdns()
        agent = await start(
            mdns, preconditions={"sshd": f"127.0.0.1:{port}", "recheck_interval": RECHECK}
        )
        walrus = walrus_of(agent)
        checks = Counted(walrus)
        await eventually(lambda: probes >= 5)
        assert walrus.instance in mdns.published
        assert checks.calls >= 3  # each round also re-checks (stats) the credentials
    finally:
        server.close()
        await server.wait_closed()


async def test_without_inotify_the_files_are_polled_and_a_deletion_still_noticed(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(watch_module, "Inotify", unavailable)
    agent = await start(FakeMdns())
    walrus = walrus_of(agent)
    checks = Counted(walrus)
    await eventually(lambda: checks.calls >= 3)
    (agent.config.key_dir / cred.LAYOUTS[Role.WALRUS].cert).unlink()
    await eventually(lambda: not walrus.registered)
