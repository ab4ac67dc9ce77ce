"""A dual-homed CC (issue 9): it states its front-end address in addr= and offers every
interface's address in its A records; a node reaches it at the one on its own link, and a
CC that is no longer registered is no longer a candidate."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from eucareg.agent.locate import Registrars
from eucareg.agent.reach import local_networks, reachable
from eucareg.core.model import AnnouncedState, Role
from eucareg.mdns.types import Change
from tests.factories import ann, sighting

FRONT, PRIVATE = "10.1.0.5", "10.2.0.5"
NODE_LAN = [ipaddress.ip_network("10.2.0.0/24")]


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def test_the_stated_address_wins_when_it_is_on_our_link() -> None:
    front = ipaddress.ip_address(FRONT)
    assert reachable(front, [PRIVATE, FRONT], nets("10.1.0.0/16")) == front


def test_else_an_offered_address_on_our_link_and_else_the_stated_one() -> None:
    front = ipaddress.ip_address(FRONT)
    assert str(reachable(front, ["garbage", "fe80::1%eth0", PRIVATE], NODE_LAN)) == PRIVATE
    assert reachable(front, [PRIVATE], nets("192.0.2.0/24")) == front  # a routed site
    assert reachable(front, [], []) == front
    v6 = ipaddress.ip_address("fd00::5")
    assert str(reachable(front, ["fd00::5%eth1"], [ipaddress.ip_network("fd00::/64")])) == str(v6)


def test_local_networks_leave_out_loopback() -> None:
    networks = local_networks()
    assert all(not n.is_loopback for n in networks)
    assert local_networks() is networks  # kept a while: not listed again at every sighting


def test_a_node_asks_a_dual_homed_cc_at_its_address_on_the_node_lan() -> None:
    registrars = Registrars(networks=lambda: NODE_LAN)
    cc = ann(Role.CC, "c1", address=FRONT, state=AnnouncedState.REGISTERED, api_port=8780)
    registrars.on_sighting(replace(sighting(cc), addresses=(FRONT, PRIVATE)))
    [endpoint] = registrars.candidates(Role.NC, "c1", pin=None, issuer=None)
    assert (endpoint.address, endpoint.component_id) == (PRIVATE, cc.component_id)


def test_a_cc_that_says_it_is_no_longer_registered_is_no_candidate() -> None:
    registrars = Registrars(networks=lambda: NODE_LAN)
    cc = ann(Role.CC, "c1", address=FRONT, state=AnnouncedState.REGISTERED, api_port=8780)
    registrars.on_sighting(sighting(cc))
    assert registrars.candidates(Role.NC, "c1", pin=None, issuer=None)
    ready = replace(cc, state=AnnouncedState.READY, api_port=None)
    registrars.on_sighting(sighting(ready, Change.UPDATED, instance=cc.instance))
    assert registrars.candidates(Role.NC, "c1", pin=None, issuer=None) == []
