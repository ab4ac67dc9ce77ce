"""Whole clouds in network namespaces: real agents, real multicast, real HTTP and SQLite.

Each test builds a lab from the design's topologies, starts agents in a shuffled order, and
checks what an operator would: everything registered once, with credentials, and every
refusal visible with its reason.
"""

from __future__ import annotations

import collections
import csv
import json
import random
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered, registered_components
from eucalab.lab import Lab
from eucalab.plans import TOPOLOGY_1, TOPOLOGY_3, TOPOLOGY_4, single_lan
from eucalab.publisher import publisher_argv
from eucareg.core.model import Role
from eucareg.pki import credentials as cred
from eucareg.pki import keypairs
from tests.integration.conftest import CloudFactory

pytestmark = pytest.mark.integration


def clc_host(plan: dict[str, dict[str, str | None]]) -> str:
    return next(h for h, roles in plan.items() if "clc" in roles)


def component_ids(cloud: LabCloud) -> dict[str, str]:
    """component id -> host, read from each host's identity files."""
    ids = {}
    for host in cloud.plan:
        for path in (cloud.host_dir(host) / "state" / "identity").glob("*.id"):
            ids[path.read_text().strip()] = host
    return ids


def hook_calls(cloud: LabCloud) -> collections.Counter[str]:
    calls: collections.Counter[str] = collections.Counter()
    for host in cloud.plan:
        for line in cloud.hook_log(host):
            calls[line.split()[1]] += 1
    return calls


def assert_credentials_everywhere(cloud: LabCloud) -> None:
    for host, roles in cloud.plan.items():
        for role_name in roles:
            role = Role(role_name)
            key = keypairs.load_key(
                cloud.host_dir(host) / "state" / "identity" / f"{role_name}.key.pem"
            )
            assert cred.credentials_present(cloud.key_dir(host), role, key), (host, role_name)
            for name in cred.required_files(role):
                mode = stat.S_IMODE((cloud.key_dir(host) / name).stat().st_mode)
                assert mode == 0o600, (host, name, oct(mode))


def converge(cloud: LabCloud, timeout: float = 60) -> dict[str, Any]:
    status = cloud.wait_for(clc_host(dict(cloud.plan)), all_registered(cloud.expected()), timeout)
    deadline = time.monotonic() + 30
    while not cloud.credentials_complete():
        assert time.monotonic() < deadline, "registered, but key files missing on some host"
        time.sleep(0.2)
    return status


@pytest.mark.parametrize(
    ("plan", "seed"),
    [
        pytest.param(TOPOLOGY_1, 1, id="t1-clc+walrus+cc+sc/ncs-a"),
        pytest.param(TOPOLOGY_1, 2, id="t1-clc+walrus+cc+sc/ncs-b"),
        pytest.param(TOPOLOGY_3, 3, id="t3-every-component-alone-a"),
        pytest.param(TOPOLOGY_3, 4, id="t3-every-component-alone-b"),
        pytest.param(TOPOLOGY_4, 5, id="t4-two-clusters-one-lan-a"),
        pytest.param(TOPOLOGY_4, 6, id="t4-two-clusters-one-lan-b"),
    ],
)
def test_design_topology_registers_everything_exactly_once(
    cloud_factory: CloudFactory, plan: dict[str, dict[str, str | None]], seed: int
) -> None:
    check_design_topology(cloud_factory(plan), seed)


def check_design_topology(cloud: LabCloud, seed: int) -> dict[str, Any]:
    """Start a cloud's agents in a shuffled order; everything registers exactly once, with
    credentials. Also run with the Avahi backend (tests/integration/test_avahi_backend.py)."""
    plan = {host: dict(roles) for host, roles in cloud.plan.items()}
    order = list(plan)
    random.Random(seed).shuffle(order)
    cloud.start_all(order, gap=random.Random(seed).choice([0.0, 0.4]))
    status = converge(cloud)

    rows = registered_components(status)
    ids = component_ids(cloud)
    expected_ids = {cid for cid in ids if not cid.startswith("clc-")}
    assert {r["component_id"] for r in rows} == expected_ids
    assert len(rows) == len(expected_ids)  # no component twice
    # Every hook ran exactly once, for exactly the registered components.
    assert hook_calls(cloud) == collections.Counter(expected_ids)
    assert_credentials_everywhere(cloud)
    # The tree puts each NC under its own cluster.
    for cluster in status["tree"]["clusters"]:
        assert len(cluster["cc"]) == 1 and len(cluster["sc"]) == 1
        assert all(nc["cluster"] == cluster["name"] for nc in cluster["nc"])
    # Each agent used the backend its config forces (the lab never says "auto").
    assert status["mdns"]["backend"] == cloud.backend(clc_host(plan))
    return status


def test_second_walrus_and_duplicate_cluster_name_are_refused_visibly(
    cloud_factory: CloudFactory,
) -> None:
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "walrus": None},
        "cc1": {"cc": "cluster1"},
        "walrus2": {"walrus": None},
        "ccdup": {"cc": "cluster1"},
    }
    cloud = cloud_factory(plan)
    cloud.start_all(["cloud", "cc1"])
    cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1}), timeout=60)
    cloud.start_all(["walrus2", "ccdup"])

    def refused_both(status: dict[str, Any]) -> bool:
        return sum(r["status"] == "refused" for r in registered_components(status)) == 2

    status = cloud.wait_for("cloud", refused_both, timeout=60)
    ids = component_ids(cloud)
    by_host = {host: cid for cid, host in ids.items()}
    rows = {r["component_id"]: r for r in registered_components(status)}
    assert rows[by_host["walrus2"]]["status"] == "refused"
    assert "already has a Walrus" in rows[by_host["walrus2"]]["reason"]
    assert rows[by_host["ccdup"]]["status"] == "refused"
    assert "cluster name cluster1 is taken" in rows[by_host["ccdup"]]["reason"]
    refusals = {e["component_id"]: e["code"] for e in cloud.events("cloud", "&kind=refused")}
    assert refusals == {by_host["walrus2"]: "walrus-exists", by_host["ccdup"]: "cluster-name-taken"}
    # The refused ones got no credentials and ran no hook.
    assert not list(cloud.key_dir("walrus2").glob("walrus-cert.pem"))
    assert not list(cloud.key_dir("ccdup").glob("cluster-cert.pem"))
    assert by_host["walrus2"] not in hook_calls(cloud)


def test_sc_before_its_cc_is_pending_then_registers(cloud_factory: CloudFactory) -> None:
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None},
        "sc": {"sc": "cluster1"},
        "cc": {"cc": "cluster1"},
    }
    cloud = cloud_factory(plan)
    cloud.start_all(["cloud", "sc"])

    def sc_pending(status: dict[str, Any]) -> bool:
        return any(r["status"] == "pending" for r in registered_components(status))

    status = cloud.wait_for("cloud", sc_pending, timeout=60)
    pending = registered_components(status)[0]
    assert pending["role"] == "sc" and pending["waiting_for"] == "cluster cluster1"
    cloud.start("cc")
    converge(cloud)
    sc_id = next(cid for cid, host in component_ids(cloud).items() if host == "sc")
    kinds = [e["kind"] for e in cloud.events("cloud", f"&component={sc_id}")]
    assert kinds[:4] == ["pending", "awaiting-key", "registering", "registered"]
    assert_credentials_everywhere(cloud)


def test_node_of_an_unknown_cluster_is_unmatched_and_no_cc_takes_it(
    cloud_factory: CloudFactory,
) -> None:
    plan = {**TOPOLOGY_4, "ghost": {"nc": "nosuchcluster"}}
    cloud = cloud_factory(plan)
    cloud.start_all()

    def settled(status: dict[str, Any]) -> bool:
        rows = registered_components(status)
        return (
            sum(r["status"] == "registered" for r in rows) == 7
            and len(status["tree"]["unmatched"]) == 1
        )

    status = cloud.wait_for("cloud", settled, timeout=60)
    ghost_id = next(cid for cid, host in component_ids(cloud).items() if host == "ghost")
    stray = status["tree"]["unmatched"][0]
    assert stray["component_id"] == ghost_id
    assert "no registered CC has cluster nosuchcluster" in stray["reason"]
    for cc_host in ("cc1", "cc2"):
        registry = cloud.api(cc_host, "/v1/registry")
        assert ghost_id not in {c["component_id"] for c in registry["components"]}
    assert ghost_id not in hook_calls(cloud)
    assert not list(cloud.key_dir("ghost").glob("node-cert.pem"))
    events = cloud.events("cloud", f"&component={ghost_id}")
    assert [e["kind"] for e in events] == ["unmatched"]


def test_restarts_lead_back_to_the_same_state_without_duplicates(
    cloud_factory: CloudFactory,
) -> None:
    cloud = cloud_factory(TOPOLOGY_4)
    cloud.start_all()
    before = converge(cloud)
    hooks_before = hook_calls(cloud)
    events_before = {h: len(cloud.events(h)) for h in ("cloud", "cc1", "cc2")}
    # The CLC's registrar, then a CC registrar, then components, one after the other.
    for host in ("cloud", "cc1", "node1", "cc2", "node2"):
        cloud.restart(host)

    # A registrar decides on an announcement when it hears it, and a registered component's
    # announcement changes no record (no event). So wait until every registrar hears every
    # component again: the CLC lists both clusters' NCs, which it asks only CCs it hears
    # announcing "registered" for, and every row is online.
    def heard_again(status: dict[str, Any]) -> bool:
        rows = registered_components(status)
        clusters = status["tree"]["clusters"]
        return (
            len(rows) == len(registered_components(before))
            and all(r["online"] for r in rows)
            and all(len(c["nc"]) == 1 for c in clusters)
        )

    after = cloud.wait_for("cloud", heard_again, timeout=60)
    for cc_host in ("cc1", "cc2"):
        cloud.wait_for_registry(cc_host, lambda rows: bool(rows) and all(r["online"] for r in rows))
    key = lambda r: (r["component_id"], r["status"], r["fingerprint"])  # noqa: E731
    assert sorted(map(key, registered_components(after))) == sorted(
        map(key, registered_components(before))
    )
    assert hook_calls(cloud) == hooks_before
    # Registrations are not re-decided; at most nothing new is logged.
    for host, count in events_before.items():
        kinds = [e["kind"] for e in cloud.events(host)[count:]]
        assert not {"registering", "registered", "refused"} & set(kinds), (host, kinds)


def test_twin_announcements_register_once_and_link_local_never(
    cloud_factory: CloudFactory,
) -> None:
    """One NC announced under its own name, an Avahi-style '#2' rename and a second address
    family at once (L1, L2); plus a stray whose only address is link-local (L3)."""
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan)
    # Create node1's identity first, so its twins can be published before it starts.
    cloud.prepare("node1")
    result = cloud.lab.run(
        "node1",
        [
            sys.executable,
            "-m",
            "eucareg",
            "fingerprint",
            "--json",
            "--config",
            str(cloud.host_dir("node1") / "eucareg.toml"),
        ],
        check=True,
    )
    ident = json.loads(result.stdout)[0]
    address = str(cloud.lab.address("node1"))
    record = {
        "txtvers": "1",
        "protovers": "1",
        "eucavers": "3.4",
        "type": "node",
        "state": "ready",
        "cluster": "cluster1",
        "addr": address,
        "id": ident["component_id"],
        "fp": ident["fingerprint"],
    }
    instance = f"node-{ident['component_id']}"
    twins = [
        cloud.lab.spawn(
            "node1", "twin-rename", publisher_argv(f"{instance} #2", record, [address])
        ),
        cloud.lab.spawn(
            "node1", "twin-v6", publisher_argv(f"{instance} v6", record, [address, "fd00::77"])
        ),
    ]
    stray_txt = {**record, "id": "nc-11111111aaaa", "fp": "sha256:" + "ab" * 32, "addr": "fe80::1"}
    stray = cloud.lab.spawn("node1", "stray", publisher_argv("stray", stray_txt, ["fe80::1"]))
    for proc in [*twins, stray]:
        proc.wait_for_log("published", timeout=30)
    cloud.start_all(["node1", "cloud"])
    converge(cloud)
    # The stray, published with the twins, was heard and turned away.
    cloud.wait_for_events(
        "cloud",
        lambda evs: any(e["component_id"] == "nc-11111111aaaa" for e in evs),
        "&kind=rejected",
    )
    # Registered is final (only the operator changes it): one decision, one hook run.
    steps = [e["kind"] for e in cloud.events("cloud", f"&component={ident['component_id']}")]
    assert steps.count("registering") == 1 and steps.count("registered") == 1, steps
    assert "refused" not in steps
    calls = hook_calls(cloud)
    assert calls[ident["component_id"]] == 1
    registry = cloud.api("cloud", "/v1/registry")["components"]
    nodes = [c for c in registry if c["role"] == "nc"]
    assert [n["component_id"] for n in nodes] == [ident["component_id"]]
    assert nodes[0]["address"] == address
    # Identity and the hook's arguments come from TXT, never from the (renamed) instance name.
    node_lines = [line for line in cloud.hook_log("cloud") if line.startswith("node ")]
    assert node_lines == [f"node {ident['component_id']} {address} cluster1"]
    rejected = cloud.events("cloud", "&kind=rejected")
    assert any("link-local" in e["reason"] for e in rejected)
    assert "nc-11111111aaaa" not in {c["component_id"] for c in registry}
    assert "nc-11111111aaaa" not in calls


def test_component_announces_only_while_installed_and_sshd_answers(
    cloud_factory: CloudFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "eucalyptus-nc.installed"
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
    }
    cloud = cloud_factory(
        plan,
        sshd={"node1": "127.0.0.1:2222"},
        installed={"node1": {"nc": str(marker)}},
        recheck_interval="300ms",
    )
    # An sshd that accepts connections but never answers: it logs each probe and when the
    # agent gives up on it, so every precondition check can be seen to happen.
    silent = cloud.fake_sshd("node1", banner=False)
    cloud.start_all(["cloud", "node1"])
    cloud.wait_for("cloud", all_registered({"cc": 1}), timeout=60)

    def nodes(status: dict[str, Any]) -> list[dict[str, Any]]:
        return [r for r in registered_components(status) if r["role"] == "nc"]

    # Not installed: the agent decides not to announce, without even asking sshd.
    cloud.agents["node1"].wait_for_log("not announcing nc: not installed", timeout=60)
    assert "probe" not in silent.log_text()
    marker.write_text("")
    # Installed: now it asks sshd, which does not answer, and gives up on it (still silent).
    silent.wait_for_log("closed 1", timeout=60)
    cloud.lab.stop(silent)
    answering_since = time.time()
    sshd = cloud.fake_sshd("node1")
    status = cloud.wait_for("cloud", all_registered({"cc": 1, "nc": 1}), timeout=60)
    node = nodes(status)[0]
    assert node["online"] is True
    # The registrar decides on an announcement when it hears it: its first decision about the
    # node came after sshd answered, so the node had announced nothing before.
    first = cloud.events("cloud", f"&component={node['component_id']}")[0]
    assert first["at"] >= answering_since and node["first_seen"] >= answering_since
    # sshd stops: the node withdraws (goodbye packets), and the registrar sees it go at once.
    cloud.lab.stop(sshd)
    cloud.agents["node1"].wait_for_log("not announcing nc: sshd does not answer", timeout=30)
    cloud.agents["cloud"].wait_for_log(
        f"component {node['component_id']} withdrew its announcement", timeout=30
    )
    rows = {r["component_id"]: r for r in cloud.registry("cloud")}
    assert rows[node["component_id"]]["status"] == "registered"  # withdrawal deregisters nothing


MDNS_LOOP_PROBE = """
import asyncio, threading
from eucareg.mdns.types import ServiceSpec
from eucareg.mdns.zeroconf_backend import ZeroconfBackend

# Built before the loop runs, as the agent builds it.
backend = ZeroconfBackend()

async def main():
    await backend.start()
    seen = asyncio.get_running_loop().create_future()
    def handler(sighting):
        # Must run on the agent's own loop and thread, where aiohttp and the registrar live.
        same = asyncio.get_running_loop() is loop and threading.current_thread() is main
        if not seen.done():
            seen.set_result(same)
    loop, main = asyncio.get_running_loop(), threading.main_thread()
    backend.watch(handler)
    await backend.publish(ServiceSpec("probe-0001", 1, {"a": "b"}, (ADDRESS,), "probe.local."))
    print("same-loop" if await asyncio.wait_for(seen, 10) else "OTHER-LOOP")
    print("threads", threading.active_count())
    await backend.close()

asyncio.run(main())
"""


def test_mdns_callbacks_run_on_the_agents_own_loop(
    lab_factory: Callable[..., Lab],
) -> None:
    """python-zeroconf must not run a loop of its own: sightings would race the HTTP API."""
    lab = lab_factory(single_lan(["probe"]))
    script = MDNS_LOOP_PROBE.replace("ADDRESS", repr(str(lab.address("probe"))))
    result = lab.run("probe", [sys.executable, "-c", script], timeout=30, check=True)
    assert "same-loop" in result.stdout
    assert "threads 1" in result.stdout


def test_operator_commands_preferred_address_and_credential_repair(
    cloud_factory: CloudFactory,
) -> None:
    """L7: an NC registers with its configured preferred address; L10: the operator lists,
    filters and exports decisions; L9: a lost credential file is repaired by itself."""
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan, addresses={"node1": {"nc": "10.77.1.200"}})
    cloud.lab.run("node1", ["ip", "addr", "add", "10.77.1.200/24", "dev", "eth0"], check=True)
    cloud.start_all()
    status = converge(cloud)
    node = next(r for r in registered_components(status) if r["role"] == "nc")
    assert node["address"] == "10.77.1.200"

    def cli(*args: str) -> str:
        return cloud.cli("cloud", *args).stdout

    text = cli("status")
    assert "cluster cluster1" in text and "10.77.1.200" in text and "registered" in text
    assert json.loads(cli("status", "--json"))["tree"]["clusters"][0]["name"] == "cluster1"
    registered = json.loads(cli("events", "--json", "--kind", "registered"))
    assert {e["role"] for e in registered} == {"cc", "nc"}
    assert {e["kind"] for e in registered} == {"registered"}
    rows = list(csv.DictReader(cli("events", "--csv", "--role", "nc").splitlines()))
    assert rows and {r["role"] for r in rows} == {"nc"}
    # The NC may first have waited for this CC's own registration (who starts first decides).
    steps = [
        r["kind"]
        for r in rows
        if (r["kind"], r["code"]) != ("pending", "waiting-for-own-registration")
    ]
    assert steps[:3] == ["awaiting-key", "registering", "registered"], rows

    # A credential file disappears: the agent notices and collects the same certificate again.
    cert = cloud.key_dir("node1") / "node-cert.pem"
    original = cert.read_bytes()
    hooks = hook_calls(cloud)
    cert.unlink()
    deadline = time.monotonic() + 60
    while not cert.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cert.read_bytes() == original
    assert hook_calls(cloud) == hooks
    assert "no longer registered (credentials missing)" in cloud.logs("node1")


def test_a_node_that_joins_is_greeted_by_its_registered_cc(cloud_factory: CloudFactory) -> None:
    """When a node appears, its registered CC multicasts its own announcement once more, so the
    node's browser has it without its first query (RFC 6762 section 5.2's 20-120 ms delay).
    A node of another cluster is not greeted."""
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "stray": {"nc": "cluster9"},
    }
    cloud = cloud_factory(plan, log_level="debug")
    cloud.start("cloud")
    cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1, "sc": 1}), timeout=60)
    cloud.start("stray")
    cloud.wait_for("cloud", lambda status: len(status["tree"]["unmatched"]) == 1, timeout=30)
    # The greeting handler ran with the sighting that made the stray unmatched: decided.
    assert "greeted with" not in cloud.logs("cloud")
    # The CC's records went out when it registered; a greeting waits a second after that.
    published = [
        json.loads(line)["ts"]
        for line in cloud.logs("cloud").splitlines()
        if "published cluster-cc-" in line
    ]
    while time.time() < published[-1] + 1.6:
        time.sleep(0.1)
    cloud.start("node1")
    cloud.agents["node1"].wait_for_log("credentials for nc", timeout=30)
    greetings = [m for m in cloud.logs("cloud").splitlines() if "greeted with" in m]
    assert len(greetings) == 1 and "greeted with cluster-cc-" in greetings[0]
    # The node's browser heard the greeting (its own query may come later, or not at all).
    assert "browser: added cluster-cc-" in cloud.logs("node1")
