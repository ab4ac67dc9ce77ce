"""A registrar greets newcomers (agent/greet.py): which sightings make a host announce its
registrar again, that a real agent does so through its mDNS backend, and that the backend
never multicasts a service's records more than once a second (RFC 6762 section 6)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from eucareg.agent.greet import Serving, greeting_for
from eucareg.agent.host import Agent
from eucareg.agent.timing import AgentTiming
from eucareg.core.model import Role
from eucareg.mdns import zeroconf_backend
from eucareg.mdns.types import Change, ServiceSpec, Sighting
from eucareg.mdns.zeroconf_backend import MULTICAST_INTERVAL, ZeroconfBackend
from tests.unit.test_agent_fakes import FakeMdns, key, make_config, seed_identity

CC_HOST = {
    Role.CLC: Serving("cloud-clc-1"),
    Role.CC: Serving("cluster-cc-1", "cluster1"),
}


def seen(instance: str, kind: str, change: Change = Change.ADDED, **txt: str) -> Sighting:
    return Sighting(instance, change, txt={"type": kind, **txt}, addresses=("10.0.2.9",))


@pytest.mark.parametrize(
    ("sighting", "greeting"),
    [
        (seen("node-nc-1", "node", cluster="cluster1"), "cluster-cc-1"),
        (seen("walrus-w-1", "walrus"), "cloud-clc-1"),
        (seen("storage-sc-1", "storage", cluster="cluster1"), "cloud-clc-1"),
        (seen("cluster-cc-2", "cluster", cluster="cluster2"), "cloud-clc-1"),
        # A node of another cluster asks another CC; a change is no newcomer.
        (seen("node-nc-2", "node", cluster="cluster2"), None),
        (seen("node-nc-1", "node", Change.UPDATED, cluster="cluster1"), None),
        (seen("node-nc-1", "node", Change.REMOVED, cluster="cluster1"), None),
        # Nobody registers a CLC; junk and our own services are not newcomers.
        (seen("cloud-clc-9", "cloud"), None),
        (seen("x-1", "printer"), None),
        (Sighting("x-2", Change.ADDED), None),
        (seen("cluster-cc-1", "cluster", cluster="cluster1"), "cloud-clc-1"),
    ],
)
def test_which_newcomers_a_registrar_greets(sighting: Sighting, greeting: str | None) -> None:
    assert greeting_for(sighting, CC_HOST) == greeting


def test_a_host_greets_only_with_the_registrars_it_has() -> None:
    node = seen("node-nc-1", "node", cluster="cluster1")
    assert greeting_for(node, {Role.CLC: Serving("cloud-clc-1")}) is None  # no CC here
    assert greeting_for(seen("walrus-w-1", "walrus"), {Role.CC: CC_HOST[Role.CC]}) is None
    # A host hears its own CC's announcement: the CLC greets it (it would ask the CLC), the
    # CC does not greet itself.
    own = seen("cluster-cc-1", "cluster", cluster="cluster1")
    assert greeting_for(own, {Role.CC: CC_HOST[Role.CC]}) is None


async def test_a_clc_host_greets_a_walrus_that_appears_and_not_a_stranger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.test_attack_tls import loopback_only

    loopback_only(monkeypatch)
    seed_identity(tmp_path / "state", Role.CLC, "clc-00000000c10d", key(4))
    cfg = make_config(tmp_path, {"clc": {}})
    mdns = FakeMdns()
    timing = AgentTiming(long_poll=0.3, retry_base=0.02, retry_max=0.1, stop_step=1.0)
    agent = Agent(dataclasses.replace(cfg, api_port=0), backend=mdns, timing=timing)
    await agent.start()
    try:
        clc = agent.runtime(Role.CLC)
        assert clc is not None
        for _ in range(200):  # the announce loop publishes the CLC soon after the start
            if clc.instance in mdns.published:
                break
            await asyncio.sleep(0.01)
        mdns.hear(seen("node-nc-1", "node", cluster="cluster1"))  # no CC on this host
        mdns.hear(seen("walrus-walrus-1", "walrus"))
        greets = [name for call, name in mdns.calls if call == "greet"]
        assert greets == [clc.instance]
    finally:
        await agent.stop()


# The backend's once-a-second rule: python-zeroconf stood in for (no socket is opened), the
# backend's own bookkeeping real.


class FakeZeroconf:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def generate_service_broadcast(
        self, info: Any, ttl: int | None, broadcast_addresses: bool = True
    ) -> str:
        return str(info.name)

    def async_send(self, out: str) -> None:
        self.sent.append(out)


class FakeAsyncZeroconf:
    def __init__(self) -> None:
        self.zeroconf = FakeZeroconf()

    async def async_register_service(self, *_: Any, **__: Any) -> None:
        return None

    async def async_unregister_service(self, *_: Any, **__: Any) -> Any:
        return asyncio.sleep(0)


async def test_the_backend_multicasts_a_service_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = ZeroconfBackend()
    fake = FakeAsyncZeroconf()
    backend._started = fake  # type: ignore[assignment]
    clock = [1000.0]
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: clock[0])
    spec = ServiceSpec("cluster-cc-1", 8780, {"type": "cluster"}, ("127.0.0.1",), "h.local.")
    await backend.publish(spec)
    assert backend.greet("unknown-1") is False  # not ours
    # python-zeroconf is still announcing it (0.5 s), and then a second must pass.
    clock[0] += zeroconf_backend.ANNOUNCING_FOR + MULTICAST_INTERVAL - 0.01
    assert backend.greet("cluster-cc-1") is False
    clock[0] += 0.02
    assert backend.greet("cluster-cc-1") is True
    assert backend.greet("cluster-cc-1") is False
    clock[0] += MULTICAST_INTERVAL - 0.01
    assert backend.greet("cluster-cc-1") is False
    clock[0] += 0.02
    assert backend.greet("cluster-cc-1") is True
    assert [name.split(".")[0] for name in fake.zeroconf.sent] == ["cluster-cc-1"] * 2
    await backend.withdraw("cluster-cc-1")
    clock[0] += 10
    assert backend.greet("cluster-cc-1") is False  # withdrawn: never again
    assert len(fake.zeroconf.sent) == 2
