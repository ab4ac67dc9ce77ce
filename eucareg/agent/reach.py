"""Which of a registrar's addresses this host reaches on its own link. A dual-homed CC states
its front-end address in `addr=` (where the CLC registers it) and offers every interface's
address in its A records: a node on the private LAN must use the one on its own link.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence

from eucareg.core.grammar import IPNetwork
from eucareg.core.model import IPAddress

# Interfaces rarely change, and a thousand agents in one process (the benchmarks) must not
# each list them at every registrar they hear: the list is kept this long.
NETWORKS_TTL = 5.0
_cached: tuple[float, list[IPNetwork]] = (-NETWORKS_TTL, [])


def local_networks() -> list[IPNetwork]:
    """The networks of this host's interfaces (loopback and link-local left out)."""
    global _cached
    now = time.monotonic()
    if now - _cached[0] >= NETWORKS_TTL:
        _cached = (now, _list_networks())
    return _cached[1]


def _list_networks() -> list[IPNetwork]:
    import ifaddr  # python-zeroconf's own dependency, for the same question

    out: list[IPNetwork] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                network = ipaddress.ip_network(f"{address}/{ip.network_prefix}", strict=False)
            except ValueError:
                continue
            if not (network.is_loopback or network.is_link_local):
                out.append(network)
    return out


def reachable(
    stated: IPAddress, offered: Iterable[str], networks: Sequence[IPNetwork]
) -> IPAddress:
    """The address to reach a registrar at: the stated one if it is on one of our links,
    else an offered one (its A records) that is, else the stated one (a routed site)."""
    if _on_link(stated, networks):
        return stated
    for text in offered:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if _on_link(address, networks):
            return address
    return stated


def _on_link(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in networks)
