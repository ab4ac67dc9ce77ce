"""The agent's lifecycle: every task has an owner that logs and restarts it, failures reach
stop() and the exit status, and stop() is quick, goodbyes first, even with long-polls open on
either side. mDNS is the in-memory fake; HTTP stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from eucareg.agent import component as component_module
from eucareg.agent.host import Agent, AgentFailed, AgentTiming
from eucareg.agent.tasks import RestartPolicy, Supervisor
from eucareg.api.app import signed_body
from eucareg.config.components import ComponentConfig
from eucareg.config.file import Config
from eucareg.core.model import Role
from eucareg.pki import credentials as cred
from tests.unit.test_agent_fakes import (
    FakeMdns,
    FakeRegistrar,
    eventually,
    key,
    make_config,
    seed_identity,
)

FAST = RestartPolicy(base=0.01, max=0.05, healthy_after=60.0, max_crashes=3)
TIMING = AgentTiming(long_poll=20.0, retry_base=0.02, retry_max=0.1, min_request_interval=0.02)
STOP_LIMIT = 3.0  # seconds, what SIGTERM promises


# -- the supervisor ------------------------------------------------------------------------


async def test_a_dying_task_is_logged_and_restarted_until_it_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []
    steady = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ValueError(f"bug number {len(runs)}")
        steady.set()
        await asyncio.Event().wait()

    supervisor = Supervisor(FAST)
    supervisor.spawn("flaky", flaky)
    await asyncio.wait_for(steady.wait(), 5)
    assert await supervisor.close() == []
    assert supervisor.restarts == {"flaky": 2}
    assert not supervisor.failed.is_set()
    failures = [r for r in caplog.records if r.getMessage() == "task flaky failed"]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["bug number 1", "bug number 2"]


async def test_a_task_that_keeps_dying_fails_the_supervisor_with_the_reason() -> None:
    async def broken() -> None:
        raise RuntimeError("always")

    async def returns() -> None:
        return None

    supervisor = Supervisor(FAST)
    supervisor.spawn("broken", broken)
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    assert supervisor.failure == "task broken died 3 times in a row"
    other = Supervisor(FAST)
    other.spawn("returns", returns)  # returning is dying too: these loops run until stopped
    await asyncio.wait_for(other.failed.wait(), 5)
    assert other.failure == "task returns died 3 times in a row"
    assert await supervisor.close() == [] and await other.close() == []


async def test_close_reports_a_task_that_fails_while_being_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()

    async def messy() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            raise OSError("cleanup failed")

    supervisor = Supervisor(FAST)
    supervisor.spawn("messy", messy)
    await started.wait()
    problems = await supervisor.close()
    assert problems == ["task messy failed while stopping: OSError('cleanup failed')"]
    logged = [r for r in caplog.records if r.getMessage() == "task messy failed while stopping"]
    assert logged and logged[0].exc_info is not None


# -- the agent -----------------------------------------------------------------------------


def walrus_config(tmp_path: Path, **top: object) -> Config:
    seed_identity(tmp_path / "state", Role.WALRUS, "walrus-00000000aaaa", key(1))
    return make_config(tmp_path, {"walrus": {}}, **top)


async def test_stop_raises_a_task_failure_after_stopping_everything(tmp_path: Path) -> None:
    mdns = FakeMdns()
    agent = Agent(walrus_config(tmp_path), backend=mdns, timing=TIMING, restart=FAST)
    await agent.start()
    armed = asyncio.Event()

    async def fails_on_cancel() -> None:
        try:
            armed.set()
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("lost the lock file")

    agent.supervisor.spawn("extra", fails_on_cancel)
    await armed.wait()
    with pytest.raises(AgentFailed, match="task extra failed while stopping"):
        await agent.stop()
    assert mdns.calls[-1] == ("close", "")
    assert agent.sessions is not None and agent.sessions.closed


async def test_run_forever_gives_up_and_raises_when_a_loop_keeps_dying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def buggy(_cfg: Config, _conf: ComponentConfig) -> str | None:
        raise KeyError("a bug in the precondition check")

    monkeypatch.setattr(component_module, "preconditions", buggy)
    mdns = FakeMdns()
    agent = Agent(walrus_config(tmp_path), backend=mdns, timing=TIMING, restart=FAST)
    with pytest.raises(AgentFailed, match="task announce-walrus died 3 times in a row"):
        await asyncio.wait_for(agent.run_forever(), 10)
    assert mdns.calls[-1] == ("close", "")  # it stopped properly before raising


async def test_stop_is_quick_with_our_long_poll_open_and_says_goodbye_first(
    tmp_path: Path,
) -> None:
    fake = FakeRegistrar()  # holds every request
    url = await fake.start()
    try:
        mdns = FakeMdns()
        agent = Agent(walrus_config(tmp_path, fallback_registrar=url), backend=mdns, timing=TIMING)
        await agent.start()
        await eventually(lambda: fake.held == 1)  # our request is being held by the registrar
        began = time.monotonic()
        await agent.stop()
        took = time.monotonic() - began
        assert took < STOP_LIMIT, took
        assert agent.sessions is not None and agent.sessions.closed
        walrus = agent.runtime(Role.WALRUS)
        assert walrus is not None
        assert mdns.calls[-2:] == [("withdraw", walrus.instance), ("close", "")]
    finally:
        await fake.close()


@pytest.fixture
async def clc_cc_agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, FakeMdns]]:
    """A CLC+CC host whose API listens on an ephemeral port (api_port 0, set past the parser,
    which allows 1-65535 only)."""
    seed_identity(tmp_path / "state", Role.CLC, "clc-00000000c10d", key(4))
    seed_identity(tmp_path / "state", Role.CC, "cc-00000000cc01", key(5))
    cfg = make_config(tmp_path, {"clc": {}, "cc": {"cluster": "c1"}})
    mdns = FakeMdns()
    agent = Agent(dataclasses.replace(cfg, api_port=0), backend=mdns, timing=TIMING)
    await agent.start()
    yield agent, mdns
    await agent.stop()


async def test_stop_is_quick_with_a_long_poll_held_by_our_registrar(
    clc_cc_agent: tuple[Agent, FakeMdns],
) -> None:
    agent, mdns = clc_cc_agent
    assert agent.service is not None and agent.service.port != 0
    # The CLC announces the port it really listens on.
    clc = agent.runtime(Role.CLC)
    assert clc is not None
    await eventually(lambda: clc.instance in mdns.published)
    assert mdns.published[clc.instance].txt["port"] == str(agent.service.port)

    path = "/v1/credentials?wait=30"
    body, headers = signed_body(
        key(6),
        {"component_id": "nc-00000000beef"},
        method="POST",
        path=path,
        audience=clc.identity.component_id,
    )
    url = f"https://127.0.0.1:{agent.service.port}{path}"  # HTTPS: the CLC holds its cert
    async with aiohttp.ClientSession() as session:

        async def long_poll() -> int:
            async with session.post(url, data=body, headers=headers, ssl=False) as response:
                return response.status

        poll = asyncio.create_task(long_poll())
        server = agent.service._runner.server if agent.service._runner else None
        assert server is not None
        await eventually(lambda: server.requests_count >= 1)  # the registrar holds it now
        assert not poll.done()
        began = time.monotonic()
        await agent.stop()
        took = time.monotonic() - began
        # The held request was answered or cut while stopping, not after its 30 s.
        done, _ = await asyncio.wait({poll}, timeout=STOP_LIMIT - took)
        assert poll in done, "the long-poll outlived the agent"
        with contextlib.suppress(aiohttp.ClientError):
            assert poll.result() != 200  # "stopping", or the connection cut
    assert took < STOP_LIMIT, took
    cc = agent.runtime(Role.CC)
    assert cc is not None
    assert ("withdraw", clc.instance) in mdns.calls and ("withdraw", cc.instance) in mdns.calls
    assert mdns.calls[-1] == ("close", "")
    assert cred.credentials_present(agent.config.key_dir, Role.CLC, key(4))
