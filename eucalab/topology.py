"""Lab descriptions: `subnet`, `host`, `router` and `link` lines parsed into a Topology of
subnets, hosts and routers with their addresses, and the routes between subnets."""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from dataclasses import dataclass, replace

from eucalab.errors import LabError

__all__ = ["MAX_NAME_LEN", "Host", "Router", "Subnet", "Topology", "parse_topology"]

# Names end up inside namespace and interface names ("v-" + name must fit IFNAMSIZ-1 = 15),
# and become avahi host names, so only DNS-safe characters without '-' (the separator).
MAX_NAME_LEN = 12
_NAME_RE = re.compile(r"[a-z][a-z0-9]*\Z")
_PRIVATE_NETS = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_FIRST_AUTO_HOST = 10


@dataclass(frozen=True)
class Subnet:
    name: str
    network: ipaddress.IPv4Network


@dataclass(frozen=True)
class Host:
    name: str
    subnet: str
    address: ipaddress.IPv4Address
    # Further interfaces (`link` lines): (subnet, address). A host never forwards, and its
    # default route goes via its first subnet's router only.
    links: tuple[tuple[str, ipaddress.IPv4Address], ...] = ()


@dataclass(frozen=True)
class Router:
    name: str
    subnets: tuple[str, ...]
    # Parallel to subnets: the n-th router on a subnet (file order) holds its .n address.
    addresses: tuple[ipaddress.IPv4Address, ...]

    def address_on(self, subnet: str) -> ipaddress.IPv4Address:
        if subnet not in self.subnets:
            raise LabError(f"router {self.name!r} is not on subnet {subnet!r}")
        return self.addresses[self.subnets.index(subnet)]


@dataclass(frozen=True)
class Topology:
    subnets: tuple[Subnet, ...]
    hosts: tuple[Host, ...]
    routers: tuple[Router, ...]

    def gateway(self, subnet: str) -> ipaddress.IPv4Address | None:
        """Where hosts on ``subnet`` send everything off-subnet: its first router (.1)."""
        for r in self.routers:
            if subnet in r.subnets:
                return r.address_on(subnet)
        return None

    def routes(self, router: Router) -> dict[str, ipaddress.IPv4Address]:
        """Next hop from ``router`` to each subnet it is not on but can reach.

        A breadth-first search over subnets joined by routers, so the next hop (a neighbour
        router's address on a shared subnet) lies on a path through the fewest routers; ties
        go to the router and subnet listed first. Unreachable subnets are left out.
        """
        hops: dict[str, ipaddress.IPv4Address | None] = dict.fromkeys(router.subnets)
        queue = deque(router.subnets)
        while queue:
            subnet = queue.popleft()
            for other in self.routers:
                if other.name == router.name or subnet not in other.subnets:
                    continue
                hop = hops[subnet]
                if hop is None:  # a subnet of ``router`` itself: the neighbour is the hop
                    hop = other.address_on(subnet)
                for far in other.subnets:
                    if far not in hops:
                        hops[far] = hop
                        queue.append(far)
        return {subnet: hop for subnet, hop in hops.items() if hop is not None}


def _check_name(lineno: int, kind: str, name: str) -> None:
    if len(name) > MAX_NAME_LEN:
        raise LabError(
            f"line {lineno}: {kind} name {name!r} is too long "
            f"({len(name)} > {MAX_NAME_LEN} characters)"
        )
    if not _NAME_RE.match(name):
        raise LabError(
            f"line {lineno}: invalid {kind} name {name!r}: "
            "use lowercase letters and digits, starting with a letter"
        )


def _router_address(
    lineno: int, name: str, subnet: str, network: ipaddress.IPv4Network, rank: int
) -> ipaddress.IPv4Address:
    """Address of the ``rank``-th router (from 1, file order) on a subnet: .1, .2, ..."""
    address = network.network_address + rank
    if address >= network.broadcast_address:
        raise LabError(
            f"line {lineno}: no address left in subnet {subnet!r} ({network}) for router {name!r}"
        )
    return address


def parse_topology(text: str) -> Topology:
    """Parse a lab description (``subnet``/``host``/``router`` lines, ``#`` comments).

    Routers on a subnet take .1, .2, ... in file order (the first one is its hosts' gateway);
    hosts without an explicit address take .10, .11, ... skipping addresses already taken.
    """
    lines: list[tuple[int, list[str]]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if tokens:
            lines.append((lineno, tokens))

    # Subnets first, so hosts and routers may refer to subnets declared further down.
    subnets: dict[str, tuple[int, ipaddress.IPv4Network]] = {}
    for lineno, tokens in lines:
        kind = tokens[0]
        if kind not in ("subnet", "host", "router", "link"):
            raise LabError(
                f"line {lineno}: unknown keyword {kind!r} (expected subnet, host, router or link)"
            )
        if kind != "subnet":
            continue
        if len(tokens) != 3:
            raise LabError(f"line {lineno}: expected 'subnet NAME CIDR'")
        _, name, cidr = tokens
        _check_name(lineno, "subnet", name)
        if name in subnets:
            raise LabError(
                f"line {lineno}: duplicate subnet name {name!r} "
                f"(first defined on line {subnets[name][0]})"
            )
        try:
            network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise LabError(f"line {lineno}: bad CIDR {cidr!r}: {exc}") from None
        if "/" not in cidr:
            raise LabError(f"line {lineno}: bad CIDR {cidr!r}: missing /prefix length")
        if network.prefixlen > 30:
            raise LabError(f"line {lineno}: subnet {cidr} is too small (need /30 or larger)")
        # The hard rule is private addresses only, even though they never leave the lab.
        if not any(network.subnet_of(p) for p in _PRIVATE_NETS):
            raise LabError(
                f"line {lineno}: subnet {cidr} is not private "
                "(must be inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16)"
            )
        for other, (other_line, other_net) in subnets.items():
            if network.overlaps(other_net):
                raise LabError(
                    f"line {lineno}: subnet {cidr} overlaps subnet {other!r} "
                    f"({other_net}, line {other_line})"
                )
        subnets[name] = (lineno, network)

    nodes: dict[str, int] = {}  # host and router names share one namespace -> line

    def claim(lineno: int, kind: str, name: str) -> None:
        _check_name(lineno, kind, name)
        if name in nodes:
            raise LabError(
                f"line {lineno}: duplicate name {name!r} (first defined on line {nodes[name]})"
            )
        nodes[name] = lineno

    def known_subnet(lineno: int, kind: str, name: str, subnet: str) -> None:
        if subnet not in subnets:
            raise LabError(f"line {lineno}: unknown subnet {subnet!r} for {kind} {name!r}")

    # Shape and names in file order, so a duplicate is reported on its second occurrence.
    for lineno, tokens in lines:
        if tokens[0] == "router" and len(tokens) < 3:
            raise LabError(f"line {lineno}: expected 'router NAME SUBNET [SUBNET...]'")
        if tokens[0] == "host" and len(tokens) not in (3, 4):
            raise LabError(f"line {lineno}: expected 'host NAME SUBNET [ADDRESS]'")
        if tokens[0] == "link" and len(tokens) not in (3, 4):
            raise LabError(f"line {lineno}: expected 'link HOST SUBNET [ADDRESS]'")
        if tokens[0] not in ("subnet", "link"):
            claim(lineno, tokens[0], tokens[1])

    # Routers before hosts: router addresses must be reserved before explicit host addresses
    # are checked against them, whatever the line order.
    routers: list[Router] = []
    used: dict[ipaddress.IPv4Address, str] = {}
    routers_on: dict[str, int] = {}  # subnet -> routers seen on it so far
    for lineno, tokens in lines:
        if tokens[0] != "router":
            continue
        name, rsubnets = tokens[1], tokens[2:]
        for sn in rsubnets:
            known_subnet(lineno, "router", name, sn)
        if len(set(rsubnets)) != len(rsubnets):
            raise LabError(f"line {lineno}: router {name!r} lists a subnet twice")
        addresses: list[ipaddress.IPv4Address] = []
        for sn in rsubnets:
            routers_on[sn] = routers_on.get(sn, 0) + 1
            own = _router_address(lineno, name, sn, subnets[sn][1], routers_on[sn])
            used[own] = f"router {name!r} (line {lineno})"
            addresses.append(own)
        routers.append(Router(name=name, subnets=tuple(rsubnets), addresses=tuple(addresses)))

    host_lines: list[tuple[int, str, str, str, ipaddress.IPv4Address | None]] = []
    host_names = {t[1] for _, t in lines if t[0] == "host"}
    linked: set[tuple[str, str]] = set()
    for lineno, tokens in lines:
        if tokens[0] not in ("host", "link"):
            continue
        kind, name, sn = tokens[0], tokens[1], tokens[2]
        known_subnet(lineno, kind, name, sn)
        if kind == "link":
            if name not in host_names:
                raise LabError(f"line {lineno}: link names {name!r}, which is not a host")
            if (name, sn) in linked or any(
                t[0] == "host" and t[1] == name and t[2] == sn for _, t in lines
            ):
                raise LabError(f"line {lineno}: host {name!r} is on subnet {sn!r} already")
            linked.add((name, sn))
        network = subnets[sn][1]
        explicit: ipaddress.IPv4Address | None = None
        if len(tokens) == 4:
            try:
                explicit = ipaddress.IPv4Address(tokens[3])
            except ValueError:
                raise LabError(f"line {lineno}: bad address {tokens[3]!r}") from None
            if explicit not in network:
                raise LabError(
                    f"line {lineno}: address {explicit} is outside subnet {sn!r} ({network})"
                )
            if explicit in (network.network_address, network.broadcast_address):
                raise LabError(
                    f"line {lineno}: address {explicit} is the network or broadcast "
                    f"address of subnet {sn!r}"
                )
            if explicit in used:
                raise LabError(
                    f"line {lineno}: address {explicit} is already used by {used[explicit]}"
                )
            used[explicit] = f"host {name!r} (line {lineno})"
        host_lines.append((lineno, kind, name, sn, explicit))

    hosts: list[Host] = []
    links: dict[str, list[tuple[str, ipaddress.IPv4Address]]] = {}
    next_auto: dict[str, int] = {}
    for lineno, kind, name, sn, explicit in host_lines:
        address = explicit
        if address is None:
            network = subnets[sn][1]
            offset = next_auto.get(sn, _FIRST_AUTO_HOST)
            while True:
                candidate = network.network_address + offset
                if candidate >= network.broadcast_address:
                    raise LabError(
                        f"line {lineno}: no free address left in subnet {sn!r} ({network}) "
                        f"for host {name!r}"
                    )
                offset += 1
                if candidate not in used:
                    break
            next_auto[sn] = offset
            used[candidate] = f"host {name!r} (line {lineno})"
            address = candidate
        if kind == "link":
            links.setdefault(name, []).append((sn, address))
        else:
            hosts.append(Host(name=name, subnet=sn, address=address))
    hosts = [replace(h, links=tuple(links.get(h.name, ()))) for h in hosts]

    return Topology(
        subnets=tuple(Subnet(name=n, network=net) for n, (_, net) in subnets.items()),
        hosts=tuple(hosts),
        routers=tuple(routers),
    )
