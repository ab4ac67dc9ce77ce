"""A lab's network on this machine: one namespace per host and router, one per subnet holding
its bridge, veths joining them, addresses and routes; built from a Topology and removed again
by the names it recorded while building."""

from __future__ import annotations

import ipaddress

from eucalab.errors import LabError
from eucalab.netns import add_netns, delete_netns, ip, kill_netns_processes
from eucalab.topology import Topology

__all__ = ["Network"]

_MCAST_NET = "224.0.0.0/4"


class Network:
    """The namespaces of one lab, named ``{prefix}-{node}`` and ``{prefix}-s-{subnet}``."""

    def __init__(self, topology: Topology, prefix: str) -> None:
        self.topology = topology
        self.prefix = prefix
        self._hosts = {h.name: h for h in topology.hosts}
        self._routers = {r.name: r for r in topology.routers}
        self._subnets = {s.name: s for s in topology.subnets}
        self.namespaces: list[str] = []  # created by us, in creation order

    # -- names -----------------------------------------------------------------------------------

    def netns(self, host: str) -> str:
        """Namespace name of a host or router."""
        if host not in self._hosts and host not in self._routers:
            raise LabError(f"unknown host or router {host!r}")
        return f"{self.prefix}-{host}"

    def bridge_netns(self, subnet: str) -> str:
        """Namespace holding the bridge ``br0`` of a subnet."""
        if subnet not in self._subnets:
            raise LabError(f"unknown subnet {subnet!r}")
        return f"{self.prefix}-s-{subnet}"

    def address(self, host: str, *, subnet: str | None = None) -> ipaddress.IPv4Address:
        """Address of a host, or of a router on ``subnet`` (optional if it has only one)."""
        if host in self._hosts:
            h = self._hosts[host]
            if subnet is None or subnet == h.subnet:
                return h.address
            for linked, address in h.links:
                if linked == subnet:
                    return address
            raise LabError(f"host {host!r} is not on subnet {subnet!r}")
        if host in self._routers:
            r = self._routers[host]
            if subnet is None:
                if len(r.subnets) != 1:
                    raise LabError(f"router {host!r} has several addresses; pass subnet=")
                subnet = r.subnets[0]
            return r.address_on(subnet)
        raise LabError(f"unknown host or router {host!r}")

    def attachments(self, node: str) -> list[str]:
        """The subnets of a host or router, in the order of its interfaces eth0, eth1, ..."""
        if node in self._hosts:
            host = self._hosts[node]
            return [host.subnet, *(sn for sn, _ in host.links)]
        return list(self._routers[node].subnets)

    # -- building --------------------------------------------------------------------------------

    def build(self) -> None:
        """Create namespaces, bridges, veths, addresses and routes; whatever was created is on
        ``namespaces`` even when this fails half-way."""
        # IPv6 stays off: the project speaks mDNS over IPv4, and v6 link-local traffic
        # (DAD, router solicitations, AAAA records) is only noise in captures and logs.
        no_v6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        for subnet in self.topology.subnets:
            brns = self.bridge_netns(subnet.name)
            add_netns(brns, no_v6, self.namespaces)
            # Without snooping the bridge floods every multicast group to every port, so
            # delivery never depends on IGMP membership state (there is no querier here).
            ip("-n", brns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            ip("-n", brns, "link", "set", "br0", "up")

        nodes = [h.name for h in self.topology.hosts] + [r.name for r in self.topology.routers]
        for node in nodes:
            ns = self.netns(node)
            is_router = node in self._routers
            add_netns(ns, [*no_v6, f"net.ipv4.ip_forward={1 if is_router else 0}"], self.namespaces)
            for index, subnet_name in enumerate(self.attachments(node)):
                subnet = self._subnets[subnet_name]
                dev, port = f"eth{index}", f"v-{node}"
                brns = self.bridge_netns(subnet_name)
                # Created directly inside the lab namespaces, so nothing ever appears in the
                # root namespace.
                ip(*f"-n {ns} link add {dev} type veth peer name {port} netns {brns}".split())
                ip("-n", brns, "link", "set", port, "master", "br0", "up")
                addr = self.address(node, subnet=subnet_name)
                ip("-n", ns, "addr", "add", f"{addr}/{subnet.network.prefixlen}", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
            # A fresh namespace has no multicast route; plain sockets would get ENETUNREACH.
            ip("-n", ns, "route", "add", _MCAST_NET, "dev", "eth0")
            self._add_routes(node, ns)

    def _add_routes(self, node: str, ns: str) -> None:
        """A host's default route via its subnet's first router; a router's static routes to
        the subnets behind other routers. They live in the node's namespace and go with it."""
        if node in self._hosts:
            gateway = self.topology.gateway(self._hosts[node].subnet)
            if gateway is not None:
                ip("-n", ns, "route", "add", "default", "via", str(gateway))
            return
        for subnet, hop in self.topology.routes(self._routers[node]).items():
            ip("-n", ns, "route", "add", str(self._subnets[subnet].network), "via", str(hop))

    # -- removal ---------------------------------------------------------------------------------

    def remove(self) -> list[str]:
        """Kill what still runs in each namespace we created, newest first, and delete it;
        what could not be removed, as messages."""
        errors: list[str] = []
        while self.namespaces:
            ns = self.namespaces[-1]
            try:
                leftover = kill_netns_processes(ns)
                if leftover:
                    errors.append(f"processes {leftover} in {ns} survived SIGKILL")
                problem = delete_netns(ns)
                if problem is not None:
                    errors.append(problem)
            except Exception as exc:
                errors.append(f"removing {ns}: {exc!r}")
            self.namespaces.pop()
        return errors
