"""The design's test case 6 through wide-area DNS-SD: two LANs joined by a router that no
multicast crosses, and a real BIND 9 named on the home LAN that every agent publishes to and
browses (docs/dnssd.md). The remote cluster is heard by the CLC through DNS only, registers
once with its credentials, and a component that dies without a word is pruned from the zone.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.lab import Lab
from eucalab.named import TsigKey, instance_key_name, named_binary, site_policy, start_in_lab
from eucareg.core.model import Role
from tests.integration.conftest import LabFactory
from tests.integration.test_routed import CASE_6, PLAN_6, assert_one_cloud, token

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        named_binary() is None,
        reason="needs BIND 9's named: apt-get install bind9 (make test installs it)",
    ),
]

DOMAIN = "site.test"
CASE_6_DNS = CASE_6 + "host dns home\n"
REGISTRAR_HOSTS = ("cloud", "cc2")


def instances(cloud: LabCloud) -> dict[str, dict[str, str]]:
    """host -> role -> instance name, from identities made now (before named.conf is written:
    every component's key is named after its instance)."""
    out: dict[str, dict[str, str]] = {}
    for host in cloud.plan:
        config = str(cloud.prepare(host))
        rows = json.loads(cloud.cli(host, "fingerprint", "--json", "--config", config).stdout)
        out[host] = {
            row["role"]: f"{Role(row['role']).txt_type}-{row['component_id']}" for row in rows
        }
    return out


def mdns_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"logger": "eucareg.mdns' in line]


def dnssd_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"logger": "eucareg.dnssd' in line]


def test_case_6_through_wide_area_dnssd_with_no_multicast_crossing(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab: Lab = lab_factory(CASE_6_DNS)
    settings: dict[str, Any] = {"log_level": {"cloud": "debug"}}
    cloud = LabCloud(lab, PLAN_6, tmp_path / "cloud", settings=settings)
    secrets = {host: cloud.host_dir(host) / "dnssd" for host in cloud.plan}
    settings["dnssd"] = {
        "domain": DOMAIN,
        "server": f"{lab.address('dns')}:53",
        "tsig_secret_file": {host: str(secrets[host] / "{role}.key") for host in cloud.plan},
        "prune_key_name": dict.fromkeys(REGISTRAR_HOSTS, "eucareg-prune"),
        "prune_secret_file": {h: str(secrets[h] / "prune.key") for h in REGISTRAR_HOSTS},
        "refresh": "2s",
        "browse_interval": "1s",
    }
    # One key per component, named after its instance; the prune key on the registrars.
    names = instances(cloud)
    keys = []
    for host, roles in names.items():
        for role, instance in roles.items():
            key = TsigKey.make(instance_key_name(instance, DOMAIN))
            key.write_secret(secrets[host] / f"{role}.key")
            keys.append(key)
    prune = TsigKey.make("eucareg-prune")
    for host in REGISTRAR_HOSTS:
        prune.write_secret(secrets[host] / "prune.key")
    named = start_in_lab(
        lab,
        "dns",
        tmp_path / "named",
        domain=DOMAIN,
        keys=[*keys, prune],
        policy=site_policy(DOMAIN, prune_keys=[prune.name]),
    )

    began = time.monotonic()
    cloud.start("cloud")
    cloud.wait_for("cloud", lambda st: bool(st.get("tree")), timeout=60)
    # The remote cluster joins with tokens, as in tests/integration/test_routed.py; no
    # fallback_registrar anywhere: DNS-SD is how it finds the CLC.
    settings["tokens"] = {
        "cc2": {"cc": token(cloud, "cc", "cluster2"), "sc": token(cloud, "sc", "cluster2")}
    }
    for host in ("node1", "cc2", "node2"):
        cloud.start(host)
    status = assert_one_cloud(cloud, timeout=120)
    took = time.monotonic() - began
    clusters = {c["name"]: c for c in status["tree"]["clusters"]}
    assert set(clusters) == {"cluster1", "cluster2"}
    assert [nc["address"] for nc in clusters["cluster2"]["nc"]] == [str(lab.address("node2"))]

    # No multicast crossed: the CLC heard each remote component through DNS-SD, and never
    # through mDNS, whose debug log names every instance it hears.
    log = cloud.logs("cloud")
    heard_by_mdns = "\n".join(mdns_lines(log))
    heard_by_dnssd = "\n".join(dnssd_lines(log))
    remote = [names["cc2"]["cc"], names["cc2"]["sc"], names["node2"]["nc"]]
    for instance in remote:
        assert instance not in heard_by_mdns, instance
        assert re.search(rf"DNS-SD: added {instance} addresses=\[.10\.77\.2\.", heard_by_dnssd), (
            instance
        )
    # The home LAN's components were heard both ways.
    assert names["node1"]["nc"] in heard_by_mdns and names["node1"]["nc"] in heard_by_dnssd
    remote_registered = [
        e for e in cloud.events("cloud", "&kind=registered") if e["address"].startswith("10.77.2.")
    ]
    assert sorted(e["role"] for e in remote_registered) == ["cc", "sc"]
    # And the updates reached named from the remote LAN, through the router, signed.
    named_log = named.log_text()
    assert "10.77.2.10#" in named_log and f"/key {names['cc2']['cc']}." in named_log
    assert "fallback announcement" not in cloud.logs("cc2")

    # node2's host dies without a word: the registrars prune its records from the zone once
    # its heartbeat is three refreshes (6 s) old.
    cloud.kill("node2")
    deadline = time.monotonic() + 40
    pruned = f"DNS-SD: pruned {names['node2']['nc']}: its heartbeat did not change"
    while not any(pruned in cloud.logs(h) for h in REGISTRAR_HOSTS):
        assert time.monotonic() < deadline, "node2's records were not pruned"
        time.sleep(0.3)
    # node1's agent stops as systemd stops it: it deletes its records on the way out, and the
    # CLC hears it gone through DNS-SD too.
    code, stopping = cloud.terminate("node1")
    assert code == 0 and stopping < 3.0, (code, stopping)
    gone = f"{names['node1']['nc']}._eucalyptus._tcp.{DOMAIN}"
    assert f"/key {gone}: updating zone '{DOMAIN}/IN': deleting rrset at '{gone}' SRV" in (
        named.log_text()
    )
    deadline = time.monotonic() + 10
    while f"DNS-SD: removed {names['node1']['nc']}" not in cloud.logs("cloud"):
        assert time.monotonic() < deadline, "node1's withdrawal was not browsed"
        time.sleep(0.2)
    assert "withdrawing" not in cloud.logs("node1")  # no failure logged
    print(f"case 6 over DNS-SD: every component registered {took:.1f} s after the CLC started")
