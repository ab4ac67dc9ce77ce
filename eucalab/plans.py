"""What runs where in a lab cloud: a plan maps each host to its components (role -> cluster),
the design's test topologies as plans, and the one-LAN lab topology most tests build."""

from __future__ import annotations

from collections.abc import Mapping

from eucalab.topology import Topology, parse_topology

__all__ = ["TOPOLOGY_1", "TOPOLOGY_3", "TOPOLOGY_4", "CloudPlan", "HostPlan", "single_lan"]

# role -> cluster (None for roles without one), per host
HostPlan = Mapping[str, str | None]
CloudPlan = Mapping[str, HostPlan]

# The design's test topologies (EucalyptusRemoteAutoRegistration, "Test/Demo Plan").
TOPOLOGY_1: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None, "cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
}
TOPOLOGY_3: dict[str, dict[str, str | None]] = {
    "clc": {"clc": None},
    "walrus": {"walrus": None},
    "cc": {"cc": "cluster1"},
    "sc": {"sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
}
TOPOLOGY_4: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "cc1": {"cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "cc2": {"cc": "cluster2", "sc": "cluster2"},
    "node2": {"nc": "cluster2"},
}


def single_lan(hosts: list[str], network: str = "10.77.1.0/24") -> Topology:
    lines = [f"subnet lan {network}"] + [f"host {h} lan" for h in hosts]
    return parse_topology("\n".join(lines))
