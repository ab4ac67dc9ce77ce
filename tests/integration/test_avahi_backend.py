"""The Avahi backend with a real avahi-daemon (and private system bus) in each lab namespace.

* the design's cases 1, 3 and 4 register everything exactly once, with every host on Avahi,
  and a mixed cloud (some hosts on Avahi, some on python-zeroconf) does too: the same checks
  as tests/integration/test_cloud.py's topology test, through the same function;
* two of our components that publish one instance name: Avahi renames the second, both are
  registered, and identity comes from the TXT record (lesson L2);
* `auto` picks Avahi only when the daemon on the bus runs in our own network namespace: a bus
  whose avahi-daemon runs in another namespace gives python-zeroconf, and says why;
* the daemon restarting under a running agent: its services come back, and so does browsing.

No test talks to the machine's own system bus: every agent here has a private bus, or forces
python-zeroconf.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import registered_components
from eucalab.errors import LabError
from eucalab.plans import TOPOLOGY_1, TOPOLOGY_3, TOPOLOGY_4
from tests.integration.conftest import CloudFactory, LabFactory
from tests.integration.test_cloud import check_design_topology
from tests.integration.test_lab import avahi_tools  # noqa: F401  (a fixture, used by name)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("avahi_tools")]

Plan = dict[str, dict[str, str | None]]


@pytest.mark.parametrize(
    ("plan", "seed"),
    [
        pytest.param(TOPOLOGY_1, 11, id="t1-avahi"),
        pytest.param(TOPOLOGY_3, 13, id="t3-avahi"),
        pytest.param(TOPOLOGY_4, 14, id="t4-avahi"),
    ],
)
def test_design_topology_on_avahi(cloud_factory: CloudFactory, plan: Plan, seed: int) -> None:
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    status = check_design_topology(cloud, seed)
    assert status["mdns"]["backend"] == "avahi"
    assert status["mdns"]["setting"] == "avahi"
    for host in plan:
        assert "mDNS backend: avahi (forced by [mdns] backend)" in cloud.logs(host), host


def test_design_topology_with_hosts_on_both_backends(cloud_factory: CloudFactory) -> None:
    # Case 4 with the CLC and one cluster on Avahi, the other cluster on python-zeroconf.
    backends = {
        "cloud": "avahi",
        "cc1": "avahi",
        "node1": "zeroconf",
        "cc2": "zeroconf",
        "node2": "avahi",
    }
    cloud = cloud_factory(TOPOLOGY_4, mdns_backend=backends)
    check_design_topology(cloud, 15)
    for host, backend in backends.items():
        assert f"mDNS backend: {backend} (forced by [mdns] backend)" in cloud.logs(host), host
        assert cloud.lab.has_avahi(host) == (backend == "avahi")
    # `eucareg discover` hears the CLC (an Avahi host) through either backend.
    clc_id = cloud.component_id("cloud", "clc")
    for host, backend in (("node1", "zeroconf"), ("node2", "avahi")):
        argv = [sys.executable, "-m", "eucareg", "discover", "clc", "--json"]
        argv += ["--backend", backend, "--timeout", "3s"]
        out = cloud.lab.run(host, argv, env=cloud.agent_env(host), timeout=30, check=True)
        (clc,) = json.loads(out.stdout)["clcs"]
        assert clc["component_id"] == clc_id, out.stdout


# -- name collisions (lesson L2) ------------------------------------------------------------------


def test_a_taken_name_is_renamed_and_identity_still_comes_from_txt(
    cloud_factory: CloudFactory,
) -> None:
    """Another responder holds each NC's instance name before the NC starts (as Avahi's own
    legacy NCs all announced one name): Avahi renames ours ("name #2"), and both NCs are
    registered under the ids in their TXT records, never under the name."""
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1", "sc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "node2": {"nc": "cluster1"},
        "squat": {},
    }
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    names = {}
    for host in ("node1", "node2"):
        config = cloud.prepare(host)
        cloud.cli(host, "fingerprint", "--config", str(config))  # makes the NC's identity
        names[host] = f"node-{cloud.component_id(host, 'nc')}"
    cloud.lab.start_avahi("squat")
    squatters = {}
    for host, name in names.items():
        squatter = squatters[host] = cloud.lab.spawn(
            "squat",
            f"squat-{host}",
            ["avahi-publish", "-s", name, "_eucalyptus._tcp", "8780", "txtvers=1", "type=node"],
            env=cloud.lab.avahi_env("squat"),
        )
        squatter.wait_for_log(f"Established under name '{name}'")
    for host in ("cloud", "node1", "node2"):
        cloud.start(host)
    for host, name in names.items():
        proc = cloud.agents[host]
        # (Found by Avahi's probe, or, since this agent's browser has the squatter's records
        # cached, which defeats that probe, before publishing: the newcomer yields.)
        proc.wait_for_log(f"service name {name!r} ", timeout=30)
        proc.wait_for_log(f"publishing it as '{name} #2'", timeout=30)
        proc.wait_for_log(f"established as '{name} #2'", timeout=30)

    status = cloud.wait_for("cloud", all_registered_ncs(2), timeout=90)
    for squatter in squatters.values():  # the first holder of a name keeps it
        assert "collision" not in squatter.log_text().lower(), squatter.log_text()
    ids = {cloud.component_id(host, "nc") for host in names}
    ncs = [r for r in registered_components(status) if r["role"] == "nc"]
    assert {r["component_id"] for r in ncs} == ids
    # The hooks were told the ids (and the addresses) of the TXT records, once each.
    node_calls = [line.split() for line in cloud.hook_log("cloud") if line.startswith("node ")]
    assert sorted(call[1] for call in node_calls) == sorted(ids)
    assert {call[2] for call in node_calls} == {
        str(cloud.lab.address("node1")),
        str(cloud.lab.address("node2")),
    }


def all_registered_ncs(count: int) -> Any:
    def check(status: dict[str, Any]) -> bool:
        rows = [r for r in registered_components(status) if r["role"] == "nc"]
        return len(rows) == count and all(
            r["status"] == "registered" and r.get("credentials_collected_at") for r in rows
        )

    return check


# -- auto -----------------------------------------------------------------------------------------

CHOOSE = """
import asyncio, json
from eucareg.mdns.choice import ChosenBackend

async def main() -> None:
    backend = ChosenBackend("auto", ipv6=False)
    await backend.start()
    print(json.dumps(backend.describe()), flush=True)
    await backend.close()

asyncio.run(main())
"""


def choose(lab: Any, host: str, bus_address: str) -> dict[str, Any]:
    """What `auto` picks in a host's namespace, with the given system bus (the agent's code)."""
    result = lab.run(
        host,
        [sys.executable, "-c", CHOOSE],
        env={"DBUS_SYSTEM_BUS_ADDRESS": bus_address},
        timeout=30,
        check=True,
    )
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_auto_uses_avahi_only_in_its_own_network_namespace(lab_factory: LabFactory) -> None:
    lab = lab_factory("subnet lan 10.77.1.0/24\nhost alpha lan\nhost beta lan")
    beta = lab.start_avahi("beta")
    # alpha reaches beta's bus, as `ip netns exec` reaches the machine's: not Avahi, and why.
    there = choose(lab, "alpha", beta.bus_address)
    assert there["backend"] == "zeroconf", there
    assert "another network namespace" in there["reason"], there
    assert f"pid {beta.daemon.pid}" in there["reason"], there
    # In beta's own namespace, the same bus gives Avahi.
    here = choose(lab, "beta", beta.bus_address)
    assert here == {
        "backend": "avahi",
        "setting": "auto",
        "reason": f"auto: avahi-daemon (pid {beta.daemon.pid}) runs in this network namespace",
    }
    # check-config says the same, through the same probe.
    config = lab.workdir / "auto.toml"
    config.write_text(
        'address = "10.77.1.11"\n[mdns]\nbackend = "auto"\n[components.nc]\ncluster = "c1"\n'
    )
    for host, backend in (("alpha", "zeroconf"), ("beta", "avahi")):
        out = lab.run(
            host,
            [sys.executable, "-m", "eucareg", "check-config", "--config", str(config), "--json"],
            env={"DBUS_SYSTEM_BUS_ADDRESS": beta.bus_address},
            check=True,
        )
        assert json.loads(out.stdout)["mdns_backend"]["backend"] == backend, out.stdout
    # A bus without avahi-daemon, and no bus at all: python-zeroconf, with the reason.
    lab.stop_avahi("beta")
    gone = choose(lab, "beta", beta.bus_address)
    assert gone["backend"] == "zeroconf" and "not running" in gone["reason"], gone
    nobus = choose(lab, "beta", f"unix:path={lab.workdir}/no-such-bus")
    assert nobus["backend"] == "zeroconf" and "no system bus" in nobus["reason"], nobus


# -- the daemon restarting ------------------------------------------------------------------------


def test_the_agent_follows_avahi_daemon_restarts(cloud_factory: CloudFactory) -> None:
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1", "sc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "node2": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    for host in ("cloud", "node1"):
        cloud.start(host)
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    clc = f"cloud-{cloud.component_id('cloud', 'clc')}"

    # The registrar's host restarts its avahi-daemon: the agent publishes again and browses again.
    cloud.lab.restart_avahi("cloud")
    cloud.agents["cloud"].wait_for_log("avahi-daemon stopped", timeout=20)
    cloud.agents["cloud"].wait_for_log("publishing 3 services", timeout=20)
    wait_until(lambda: clc in avahi_browse_names(cloud, "node1"), 20, "the CLC again")
    # A node whose avahi-daemon is down when its agent starts: the agent waits for it. Once it
    # runs, the node is heard and registered (the registrar's browsing came back too).
    cloud.lab.start_avahi("node2")
    cloud.lab.stop_avahi("node2")
    cloud.start("node2")
    cloud.agents["node2"].wait_for_log("avahi-daemon is not running on the bus; waiting")
    cloud.lab.restart_avahi("node2")
    cloud.wait_for("cloud", all_registered_ncs(2), timeout=60)

    # A node's avahi-daemon goes away for a while: the agent waits, then publishes again.
    node1 = f"node-{cloud.component_id('node1', 'nc')}"
    cloud.lab.stop_avahi("node1")
    cloud.agents["node1"].wait_for_log("avahi-daemon stopped", timeout=20)
    wait_until(lambda: node1 not in avahi_browse_names(cloud, "cloud"), 20, "goodbye")
    assert not cloud.agents["node1"].exited()
    cloud.lab.restart_avahi("node1")
    wait_until(lambda: node1 in avahi_browse_names(cloud, "cloud"), 20, "node1 again")
    status = cloud.status("cloud")
    assert len([r for r in registered_components(status) if r["role"] == "nc"]) == 2


def test_the_agent_connects_again_when_the_system_bus_restarts(
    cloud_factory: CloudFactory,
) -> None:
    plan: Plan = {"cloud": {"clc": None, "cc": "cluster1"}, "node1": {"nc": "cluster1"}}
    cloud = cloud_factory(plan, mdns_backend="avahi", log_level="debug")
    cloud.start_all()
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    node1 = f"node-{cloud.component_id('node1', 'nc')}"
    # The bus goes, and avahi-daemon with it; both come back at the same address.
    cloud.lab.restart_avahi_bus("node1")
    agent = cloud.agents["node1"]
    agent.wait_for_log("the system bus connection was lost", timeout=20)
    agent.wait_for_log("connected to the system bus again", timeout=30)
    agent.wait_for_log("publishing 1 services", timeout=20)
    wait_until(lambda: node1 in avahi_browse_names(cloud, "cloud"), 20, "node1 again")
    assert not agent.exited()


def avahi_browse_names(cloud: LabCloud, host: str) -> set[str]:
    """Instance names avahi-browse resolves on a host now (its avahi-daemon's view)."""
    out = cloud.lab.run(
        host,
        ["avahi-browse", "-r", "-t", "-p", "_eucalyptus._tcp"],
        env=cloud.lab.avahi_env(host),
        timeout=20,
    ).stdout
    return {line.split(";")[3] for line in out.splitlines() if line.startswith("=;")}


def wait_until(done: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not within {timeout}s")
        time.sleep(0.3)


# -- avahi-daemon's limits ------------------------------------------------------------------------

DROP_IN = Path(__file__).resolve().parents[2] / "packaging" / "avahi" / "eucareg-limits.conf"


def drop_in_limits() -> dict[str, int]:
    """The [server] keys packaging/avahi/eucareg-limits.conf sets (what the docs tell
    operators to merge into avahi-daemon.conf)."""
    limits = {}
    for line in DROP_IN.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            limits[key.strip()] = int(value)
    return limits


def test_avahi_daemon_takes_the_drop_in_limits(lab_factory: LabFactory) -> None:
    lab = lab_factory("subnet lan 10.77.1.0/24\nhost alpha lan\nhost beta lan")
    limits = drop_in_limits()
    assert limits["objects-per-client-max"] >= 4096 and limits["cache-entries-max"] >= 16384
    lab.start_avahi("alpha", server_options=limits)  # runs: every key is one it knows
    # (It does refuse keys it does not know, so the check above means something.)
    with pytest.raises(LabError, match="exited"):
        lab.start_avahi("beta", server_options={"objects-per-client-maximum": 8192})


def test_a_daemon_short_of_objects_still_lets_the_agent_publish_and_hear(
    cloud_factory: CloudFactory,
) -> None:
    """node2's avahi-daemon allows it 6 objects (Avahi's default is 1024, too few for 1,000
    NCs): it publishes (2 entry groups) and browses (1), hears 5 services, resolves what it
    cannot keep a resolver for once, says so, and is registered."""
    plan: Plan = {
        "cloud": {"clc": None, "cc": "cluster1", "sc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "node2": {"nc": "cluster1"},
    }
    cloud = cloud_factory(
        plan,
        mdns_backend="avahi",
        avahi_options={"node2": {"objects-per-client-max": 6}},
        log_level="debug",
    )
    for host in ("cloud", "node1"):
        cloud.start(host)
    cloud.wait_for("cloud", all_registered_ncs(1), timeout=60)
    cloud.start("node2")
    cloud.wait_for("cloud", all_registered_ncs(2), timeout=60)
    cloud.agents["node2"].wait_for_log("refuses more objects for this client", timeout=10)
    assert "resolving once per service" in cloud.logs("node2")
