"""Beyond one broadcast domain (issue 9): the design's test cases 5 and 6, on networks joined by
routers that multicast does not cross. A remote cluster joins with `eucareg join`, or falls back
to HTTP by itself; its SC registers once its CC reports in, and its NCs register with the CC
over mDNS on their own LAN. Every component ends registered once, with its credentials."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered, registered_components
from eucalab.lab import Lab
from tests.integration.conftest import LabFactory
from tests.integration.test_cloud import assert_credentials_everywhere, component_ids, hook_calls

pytestmark = pytest.mark.integration

CASE_6 = (
    "subnet home 10.77.1.0/24\nsubnet remote 10.77.2.0/24\n"
    "host cloud home\nhost node1 home\nhost cc2 remote\nhost node2 remote\n"
    "router r1 home remote\n"
)
PLAN_6: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "cc2": {"cc": "cluster2", "sc": "cluster2"},
    "node2": {"nc": "cluster2"},
}


def token(cloud: LabCloud, role: str, cluster: str | None = None) -> str:
    args = ["token", "create", "--role", role, "--uses", "1"]
    if cluster:
        args += ["--cluster", cluster]
    return cloud.cli("cloud", *args).stdout.strip()


def registrar_url(lab: Lab) -> str:
    return f"https://{lab.address('cloud')}:8780"


def assert_one_cloud(cloud: LabCloud, timeout: float = 90) -> dict[str, Any]:
    """The CLC's status shows every component of the plan registered and collected, each
    once, every hook ran once, and each cluster's NCs sit under it."""
    status = cloud.wait_for("cloud", all_registered(cloud.expected()), timeout)
    deadline = time.monotonic() + 30
    while not cloud.credentials_complete():
        assert time.monotonic() < deadline, "registered, but key files missing on some host"
        time.sleep(0.2)
    rows = registered_components(status)
    ids = component_ids(cloud)
    expected = {cid for cid in ids if not cid.startswith("clc-")}
    assert sorted(r["component_id"] for r in rows) == sorted(expected)
    assert hook_calls(cloud) == collections.Counter(expected)
    assert_credentials_everywhere(cloud)
    for cluster in status["tree"]["clusters"]:
        assert len(cluster["cc"]) == 1 and len(cluster["sc"]) == 1, cluster
        assert {nc["cluster"] for nc in cluster["nc"]} == {cluster["name"]}, cluster
    return status


def no_multicast_crossed(cloud: LabCloud) -> None:
    """The CLC heard nothing of the remote LAN over mDNS: every remote component it knows
    came over HTTP (a reflector or a leak would make this test prove nothing)."""
    log = cloud.logs("cloud")
    assert "10.77.2." not in "\n".join(
        line for line in log.splitlines() if '"logger": "eucareg.mdns' in line
    )
    for event in cloud.events("cloud", "&kind=registered"):
        if event["address"].startswith("10.77.2."):
            assert event["role"] in ("cc", "sc"), event


def start_home(cloud: LabCloud) -> None:
    cloud.start("cloud")
    cloud.wait_for("cloud", lambda st: bool(st.get("tree")), timeout=60)
    cloud.start("node1")


def test_case_6_a_remote_cluster_joins_with_one_command(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(CASE_6)
    settings: dict[str, Any] = {"top_level": {"cc2": ['fallback_after = "2s"']}}
    cloud = LabCloud(lab, PLAN_6, tmp_path / "cloud", settings=settings)
    start_home(cloud)
    cloud.prepare("cc2")
    # The CLC's operator made two tokens; the remote operator joins with them.
    t_cc, t_sc = token(cloud, "cc", "cluster2"), token(cloud, "sc", "cluster2")
    joined = cloud.cli(
        "cc2",
        "join",
        registrar_url(lab),
        "--token",
        f"cc={t_cc}",
        "--token",
        f"sc={t_sc}",
        "--json",
    )
    answer = json.loads(joined.stdout)
    outcomes = {c["role"]: c for c in answer["components"]}
    assert outcomes["cc"]["status"] in ("registering", "registered"), outcomes
    # The SC waits, and says on what: its CC is registered, but not yet heard saying so.
    assert outcomes["sc"]["status"] == "pending", outcomes
    assert outcomes["sc"]["waiting_for"] == "cluster cluster2", outcomes
    config = (cloud.host_dir("cc2") / "eucareg.toml").read_text()
    assert f'fallback_registrar = "{registrar_url(lab)}"' in config and t_sc in config
    cloud.start("cc2", prepare=False)
    cloud.start("node2")
    assert_one_cloud(cloud)
    no_multicast_crossed(cloud)


def test_case_6_a_remote_cluster_falls_back_by_itself(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(CASE_6)
    settings: dict[str, Any] = {}
    cloud = LabCloud(lab, PLAN_6, tmp_path / "cloud", settings=settings)
    start_home(cloud)
    settings["tokens"] = {
        "cc2": {"cc": token(cloud, "cc", "cluster2"), "sc": token(cloud, "sc", "cluster2")}
    }
    settings["top_level"] = {
        "cc2": [f'fallback_registrar = "{registrar_url(lab)}"', 'fallback_after = "3s"']
    }
    began = time.monotonic()
    cloud.start("cc2")
    cloud.start("node2")
    assert_one_cloud(cloud)
    no_multicast_crossed(cloud)
    # It listened for mDNS first, as long as it was told to.
    log = cloud.logs("cc2")
    assert "fallback announcement of cc-" in log, log[-2000:]
    assert time.monotonic() - began >= 3


CASE_5 = (
    "subnet front 10.77.1.0/24\nsubnet site1 10.77.2.0/24\nsubnet site2 10.77.3.0/24\n"
    "host cloud front\nhost cc1 site1\nhost node1 site1\nhost cc2 site2\nhost node2 site2\n"
    "router r1 front site1\nrouter r2 site1 site2\n"
)
PLAN_5: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "cc1": {"cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "cc2": {"cc": "cluster2", "sc": "cluster2"},
    "node2": {"nc": "cluster2"},
}


def test_case_5_three_adjacent_networks_in_mode_any(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """CLC+Walrus / CC1+SC1 / NC1 / CC2+SC2 / NC2 on three networks in a row, two routers
    apart at most. The remote clusters come over HTTP, as the design's alternative has it:
    the CLC in mode any, with an install window, and no tokens."""
    lab = lab_factory(CASE_5)
    url = f"https://{lab.address('cloud')}:8780"
    remote = [f'fallback_registrar = "{url}"', 'fallback_after = "2s"']
    settings: dict[str, Any] = {"top_level": {"cc1": remote, "cc2": remote}}
    cloud = LabCloud(lab, PLAN_5, tmp_path / "cloud", settings=settings)
    cloud.start("cloud")
    cloud.wait_for("cloud", lambda st: bool(st.get("tree")), timeout=60)
    cloud.cli("cloud", "mode", "any")
    # The nodes first: each waits, unregistered, for its CC to be registered.
    for host in ("node1", "node2", "cc2", "cc1"):
        cloud.start(host)
    assert_one_cloud(cloud)
    for event in cloud.events("cloud", "&kind=registered"):
        assert event["role"] != "nc"  # the CLC registers no NC; each CC registers its own
    assert "10.77.3." not in cloud.logs("cc1")  # site1's CC heard nothing of site2


DUAL_HOMED = (
    "subnet front 10.77.1.0/24\nsubnet nodes 10.77.5.0/24\n"
    "host cloud front\nhost cc front\nlink cc nodes\nhost node1 nodes\nhost node2 nodes\n"
)
PLAN_DUAL: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "cc": {"cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
}


def test_a_dual_homed_cc_is_registered_at_its_front_address_and_serves_its_private_lan(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """The common Eucalyptus layout: the CC on the front-end LAN with the CLC and on a private
    node LAN that only it reaches (no router: the nodes cannot reach the front-end LAN)."""
    lab = lab_factory(DUAL_HOMED)
    cloud = LabCloud(lab, PLAN_DUAL, tmp_path / "cloud")
    cloud.start_all(["cloud", "node1", "node2", "cc"])
    status = assert_one_cloud(cloud)
    front, private = lab.address("cc"), lab.address("cc", subnet="nodes")
    [cluster] = status["tree"]["clusters"]
    assert [cc["address"] for cc in cluster["cc"]] == [str(front)]  # where the CLC reaches it
    for node in ("node1", "node2"):
        log = cloud.logs(node)
        assert f"https://{front}:" not in log, log[-2000:]  # never asked where it cannot go
        assert "Network is unreachable" not in log
    # Each NC was registered by the CC, which it reached at the node-LAN address.
    assert all(nc["address"].startswith("10.77.5.") for nc in cluster["nc"])
    assert str(private).startswith("10.77.5.")


ORDERED = (
    "subnet home 10.77.1.0/24\nsubnet remote 10.77.2.0/24\n"
    "host cloud home\nhost sc2 remote\nhost cc2 remote\nhost node2 remote\n"
    "router r1 home remote\n"
)
PLAN_ORDERED: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "sc2": {"sc": "cluster2"},
    "cc2": {"cc": "cluster2"},
    "node2": {"nc": "cluster2"},
}


def test_over_http_the_sc_before_its_cc_the_nc_before_its_cc_and_a_registrar_restart(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """The ordering cases over HTTP: the remote SC calls in first and waits, stored, on its
    cluster; the NC comes before its CC and waits; the CLC restarts while the SC's request is
    pending; then the CC. Nothing is lost and nothing is duplicated."""
    lab = lab_factory(ORDERED)
    url = registrar_url(lab)
    remote = [f'fallback_registrar = "{url}"', 'fallback_after = "0"']
    settings: dict[str, Any] = {"top_level": {"sc2": remote, "cc2": remote}}
    cloud = LabCloud(lab, PLAN_ORDERED, tmp_path / "cloud", settings=settings)
    cloud.start("cloud")
    cloud.wait_for("cloud", lambda st: bool(st.get("tree")), timeout=60)
    cloud.cli("cloud", "mode", "any")
    cloud.start("sc2").wait_for_log("agent started", timeout=30)
    sc = cloud.component_id("sc2", "sc")
    pending = cloud.wait_for_event("cloud", sc, "pending", "waiting-for-cluster")
    assert pending["via"] == "fallback"  # heard over HTTP, and the event says so
    cloud.start("node2")
    cloud.agents["node2"].wait_for_log("announcing nc", timeout=30)
    # The CLC restarts while the SC waits (its long-poll and reports are cut off).
    cloud.restart("cloud")
    cloud.wait_for("cloud", lambda st: bool(st.get("tree")), timeout=60)
    record = next(r for r in cloud.registry("cloud") if r["component_id"] == sc)
    assert record["status"] == "pending" and record["waiting_for"] == "cluster cluster2"
    cloud.start("cc2")
    assert_one_cloud(cloud)
    # The SC was decided once for good: one registered event, after the one pending wait.
    registered = cloud.events("cloud", f"&component={sc}&kind=registered")
    assert len(registered) == 1 and registered[0]["seq"] > pending["seq"]


MULTI_HOMED = (
    "subnet home 10.77.1.0/24\nsubnet remote 10.77.2.0/24\nsubnet side 10.77.3.0/24\n"
    "host cloud home\nhost walrus remote\nlink walrus side\n"
    "router r1 home remote\nrouter r2 home side\n"
)
PLAN_MULTI: dict[str, dict[str, str | None]] = {"cloud": {"clc": None}, "walrus": {"walrus": None}}


def test_a_multi_homed_component_calls_in_from_the_address_it_announces(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """The Walrus host's route to the CLC leaves from its `remote` address, but Walrus is
    configured at its `side` address. Over HTTP, with no join token, the registrar takes an
    address only from where the request comes: the agent's requests leave from the address
    the component announces, so it is registered there (refused as address-mismatch when
    the kernel picked the source)."""
    lab = lab_factory(MULTI_HOMED)
    side, cloud_address = lab.address("walrus", subnet="side"), lab.address("cloud")
    route = lab.run("walrus", ["ip", "-4", "route", "get", str(cloud_address)], check=True)
    assert f"src {lab.address('walrus')}" in route.stdout  # the route alone picks the other
    settings: dict[str, Any] = {
        "addresses": {"walrus": {"walrus": str(side)}},
        "top_level": {
            "walrus": [f'fallback_registrar = "{registrar_url(lab)}"', 'fallback_after = "2s"']
        },
    }
    cloud = LabCloud(lab, PLAN_MULTI, tmp_path / "cloud", settings=settings)
    cloud.start("cloud")
    cloud.wait_for("cloud", lambda st: bool(st.get("tree")), timeout=60)
    cloud.cli("cloud", "mode", "any")
    cloud.start("walrus")
    status = cloud.wait_for("cloud", all_registered(cloud.expected()), 90)
    [walrus] = registered_components(status)
    assert walrus["address"] == str(side), walrus
    heard = cloud.events("cloud", f"&component={walrus['component_id']}")
    assert {e["via"] for e in heard} - {""} == {"fallback"}, heard  # over HTTP, never mDNS
    assert "address-mismatch" not in cloud.logs("walrus")
