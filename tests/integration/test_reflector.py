"""Issue 9, part 5: an Avahi reflector as the cheap alternative to the HTTP fallback.

The design's test case 6 (CLC+Walrus+CC1+SC1 and NC1 on `home`, CC2+SC2 and NC2 on `remote`,
router r1 between them) with avahi-daemon and ``enable-reflector=yes`` on the router only.
The agents speak python-zeroconf; the reflector relays their multicast between the subnets,
keeping each record's source address, and the router carries the unicast that follows (key
proofs and credential requests over HTTPS). No host has a ``fallback_registrar``.

Mode local (the CLC's default) does not mean "on my subnet": it means "heard over mDNS". The
policy refuses only unauthenticated *HTTP* announcements outside mode any (``docs/security.md``,
"Modes are about authentication, not about where a request comes from"), and nothing compares
a sighting's address with the registrar's own networks. So a reflected announcement from
another subnet is admitted in mode local, with the install window LabCloud opens, exactly as
one from the CLC's own LAN: no `mode any` is needed, and the first test shows it.

The second test is the control: the same lab without the reflector, where each side decides
what it hears on its own LAN and the CLC never hears of cluster2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.lab import Lab
from tests.integration.conftest import LabFactory
from tests.integration.test_lab import avahi_tools  # noqa: F401  (a fixture, used by name)
from tests.integration.test_routed import CASE_6, PLAN_6, assert_one_cloud, start_home

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("avahi_tools")]

REMOTE_HOSTS = ("cc2", "node2")
REMOTE_ROLES = (("cc2", "cc"), ("cc2", "sc"), ("node2", "nc"))
TXT_TYPE = {"cc": "cluster", "sc": "storage"}  # instance names are <type>-<component id>


def mdns_lines(log: str) -> str:
    """What an agent's mDNS layer logged (sightings appear at debug level)."""
    return "\n".join(line for line in log.splitlines() if '"logger": "eucareg.mdns' in line)


def ids_of(cloud: LabCloud, hosts: tuple[str, ...]) -> dict[str, str]:
    """Component id -> role on these hosts, once each agent has made its identities and
    announces them."""
    ids = {}
    for host in hosts:
        for role in PLAN_6[host]:
            cloud.agents[host].wait_for_log(f"announcing {role} ", timeout=30)
            ids[cloud.component_id(host, role)] = role
    return ids


def new_cloud(lab: Lab, tmp_path: Path) -> LabCloud:
    # Debug on the CLC's host only: its mDNS browser then logs each sighting by instance name.
    settings: dict[str, Any] = {"log_level": {"cloud": "debug"}}
    return LabCloud(lab, PLAN_6, tmp_path / "cloud", settings=settings)


def test_case_6_converges_over_an_avahi_reflector_in_mode_local(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(CASE_6)
    lab.start_avahi("r1", reflector=True)  # the only avahi-daemon in the lab
    cloud = new_cloud(lab, tmp_path)
    start_home(cloud)
    for host in REMOTE_HOSTS:
        cloud.start(host)

    status = assert_one_cloud(cloud)

    # Nobody was given an HTTP way in, and the CLC stayed in its default mode.
    for host in cloud.plan:
        assert "fallback" not in cloud.config_text(host), host
        assert "fallback announcement" not in cloud.logs(host), host
    assert status["registrar"]["trust"]["mode"] == "local"
    remote = ids_of(cloud, REMOTE_HOSTS)
    cc2, sc2, nc2 = (cloud.component_id(host, role) for host, role in REMOTE_ROLES)
    cc2_address = str(lab.address("cc2"))

    # The CLC heard CC2 and SC2 over mDNS (relayed: nothing else carries multicast across r1),
    # and admitted them on that sighting: "awaiting-key" comes only from an mDNS sighting (a
    # signed HTTP announcement proves the key at once), then the key was proven over HTTPS.
    heard = mdns_lines(cloud.logs("cloud"))
    for cid in (cc2, sc2):
        assert f"browser: added {TXT_TYPE[remote[cid]]}-{cid}" in heard, cid
        kinds = [e["kind"] for e in cloud.events("cloud", f"&component={cid}")]
        assert "awaiting-key" in kinds, (cid, kinds)
        assert kinds.count("registered") == 1, (cid, kinds)
    clc_events = cloud.events("cloud")
    registered_remote = sorted(
        (e["role"], e["address"])
        for e in clc_events
        if e["kind"] == "registered"
        if e["component_id"] in remote
    )
    assert registered_remote == [("cc", cc2_address), ("sc", cc2_address)]
    # Mode local refused nothing of the remote subnet (no fallback-not-allowed, no refusal).
    assert [e for e in clc_events if e["kind"] == "refused"] == []
    records = {r["component_id"]: r for r in cloud.registry("cloud")}
    assert {records[cc2]["admitted_by"], records[sc2]["admitted_by"]} == {"install-window"}

    # NC2 registered with CC2, on its own LAN, and not with the CLC.
    nc_events = cloud.events("cc2", f"&component={nc2}&kind=registered")
    assert [e["address"] for e in nc_events] == [str(lab.address("node2"))]
    assert not [e for e in clc_events if e["component_id"] == nc2 and e["kind"] == "registered"]


def test_without_the_reflector_the_clc_never_hears_the_remote_cluster(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(CASE_6)  # the same lab, and no avahi-daemon anywhere
    cloud = new_cloud(lab, tmp_path)
    # The remote cluster first, so that it is announcing before the CLC starts to browse.
    for host in REMOTE_HOSTS:
        cloud.start(host)
    remote = ids_of(cloud, REMOTE_HOSTS)
    nc2 = cloud.component_id("node2", "nc")
    # The remote side decides what it hears on its LAN: CC2's registrar has heard NC2 (and
    # holds it back: CC2 itself is not registered, having no CLC to ask).
    cloud.wait_for_events("cc2", bool, f"&component={nc2}", timeout=30)

    start_home(cloud)
    home = {cid for cid, role in ids_of(cloud, ("cloud", "node1")).items() if role != "clc"}

    # The home side decides what it hears: all of it is registered, NC1 included (so the
    # CLC's host hears another host's multicast), with the install window open in mode local.
    def home_done(rows: list[dict[str, Any]]) -> bool:
        return {r["component_id"] for r in rows if r["status"] == "registered"} >= home

    cloud.wait_for_registry("cloud", home_done, timeout=30)
    status = cloud.status("cloud")  # one more poll, after everything it heard was decided
    assert status["registrar"]["trust"]["mode"] == "local"
    assert status["registrar"]["trust"]["install_open"]

    # ... and it has no record, event or sighting of anything on the remote subnet.
    remote_address = str(lab.address("cc2")).rsplit(".", 1)[0] + "."
    assert {r["component_id"] for r in cloud.registry("cloud")} == home
    assert not [e for e in cloud.events("cloud") if e["component_id"] in remote]
    assert not [e for e in cloud.events("cloud") if e["address"].startswith(remote_address)]
    heard = mdns_lines(cloud.logs("cloud"))
    assert not [cid for cid in remote if cid in heard]
    assert remote_address not in heard
    # Nor did the remote side hear the CLC: its CC is still unregistered, and NC2 waits.
    cc2_status = cloud.status("cc2")
    assert [c["registered"] for c in cc2_status["local"] if c["role"] == "cc"] == [False]
    assert not cloud.events("cc2", f"&component={nc2}&kind=registered")
