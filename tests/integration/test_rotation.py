"""Replacing the cloud CA key in a running cloud (`eucareg ca rotate`): real agents in network
namespaces. The CLC's agent is stopped, the key rotated, the agent started: every component moves
its pin through the handover signed by the old key and holds certificates under the new key, no
hook runs again, nothing is ever shown unregistered, a CC restarted during the overlap carries
on, and a node that joins afterwards, configured with the old key, registers under the new one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucareg.core.model import Role
from eucareg.pki import certificates, handover, keypairs
from eucareg.pki import credentials as cred
from tests.integration.conftest import CloudFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLAN: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "cc": {"cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
    "node3": {"nc": "cluster1"},  # started only after the rotation
}
FIRST = ["cloud", "cc", "node1", "node2"]
UNREGISTERED = {"deregistered", "pending", "awaiting-key", "registering", "silent", "lost"}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def hook_lines(cloud: LabCloud) -> list[str]:
    return sorted(line for host in cloud.plan for line in cloud.hook_log(host))


def pin_of(cloud: LabCloud, host: str) -> str | None:
    try:
        return certificates.cert_fingerprint(
            certificates.load_cert(cloud.key_dir(host) / cred.CLOUD_CERT)
        )
    except keypairs.CredentialError:
        return None


def signed_under(cloud: LabCloud, host: str, role: str, ca: object) -> bool:
    """Whether the component's certificate chains to `ca` as its bundle says it must."""
    keys = cloud.key_dir(host)
    try:
        own = certificates.load_cert(keys / cred.LAYOUTS[Role(role)].cert)
        if role == "nc":
            above = certificates.load_cert(keys / "cluster-cert.pem")
            above.verify_directly_issued_by(ca)  # type: ignore[arg-type]
            own.verify_directly_issued_by(above)
        else:
            own.verify_directly_issued_by(ca)  # type: ignore[arg-type]
    except Exception:
        return False
    return True


def test_the_cloud_ca_key_is_replaced_while_every_component_stays_registered(
    cloud_factory: CloudFactory,
) -> None:
    cloud = cloud_factory(PLAN)
    cloud.start_all(FIRST)
    first = {**cloud.expected(), "nc": 2}
    cloud.wait_for("cloud", all_registered(first), timeout=120)
    old_fp = pin_of(cloud, "cloud")
    assert old_fp is not None
    wait_until(
        lambda: all(pin_of(cloud, h) == old_fp for h in FIRST), 60, "every host holding the CA"
    )
    hooks = hook_lines(cloud)
    assert len(hooks) == 5  # walrus, cc, sc and the two nodes: one hook each

    # The operator rotates: the agent stopped, the key replaced, the agent started again.
    refused = cloud.cli("cloud", "ca", "rotate", "--yes", check=False)
    assert refused.returncode == 1 and "the agent is running" in refused.stderr
    cloud.stop("cloud")
    done = json.loads(
        cloud.cli("cloud", "ca", "rotate", "--yes", "--json", "--overlap", "1h").stdout
    )
    assert done["previous_fingerprint"] == old_fp
    new_fp = done["fingerprint"]
    assert new_fp != old_fp and pin_of(cloud, "cloud") == new_fp
    cloud.start("cloud")
    new_ca = certificates.load_cert(cloud.key_dir("cloud") / cred.CLOUD_CERT)

    def moved(hosts: list[str]) -> bool:
        return all(
            pin_of(cloud, h) == new_fp
            and all(signed_under(cloud, h, r, new_ca) for r in cloud.plan[h] if r != "clc")
            for h in hosts
        )

    wait_until(lambda: moved(["cc"]), 120, "the CC and SC to move to the new CA")
    # A registrar restart during the overlap: the CC carries on handing over to its nodes.
    cloud.restart("cc")
    wait_until(lambda: moved(FIRST), 240, "every component to move to the new CA")
    # A bundle's files are replaced one by one: the handover may land a moment after the rest.
    holders = [cloud.key_dir(host) / handover.HANDOVER for host in ("cc", "node1", "node2")]
    wait_until(lambda: all(p.exists() for p in holders), 60, "the handover on every host")
    for host in ("cc", "node1", "node2"):
        held = handover.parse((cloud.key_dir(host) / handover.HANDOVER).read_bytes())
        assert held.old_fingerprint == old_fp and held.new_fingerprint == new_fp

    # A node configured with the old key (its operator's file predates the rotation) joins now.
    settings = dict(cloud.settings)
    settings["top_level"] = {"node3": [f'ca_fingerprint = "{old_fp}"']}
    cloud.settings = settings
    cloud.start("node3")
    everyone = cloud.expected()
    cloud.wait_for("cloud", all_registered(everyone), timeout=120)
    wait_until(lambda: moved(["node3"]), 120, "node3 to register under the new CA")

    # No hook ran again (node3's own registration is the only new line), nothing was ever
    # shown unregistered, and the CLC's components were re-issued as renewals.
    after = hook_lines(cloud)
    assert len(after) == len(hooks) + 1 and set(hooks) <= set(after)
    for host in ("cloud", "cc"):
        events = cloud.events(host)
        mine = {e["component_id"] for e in events if e["kind"] == "registered"} - {"-"}
        registered_at = {e["component_id"]: e["seq"] for e in events if e["kind"] == "registered"}
        late = [
            e
            for e in events
            if e["component_id"] in mine
            and e["seq"] > registered_at[e["component_id"]]
            and e["kind"] in UNREGISTERED
        ]
        assert not late, late
    renewed = {e["component_id"] for e in cloud.events("cloud") if e["code"] == "renewed"}
    for role in ("walrus", "cc", "sc"):
        host = "cloud" if role == "walrus" else "cc"
        assert cloud.component_id(host, role) in renewed, role
    shown = json.loads(cloud.cli("cloud", "ca", "show", "--json").stdout)
    assert shown["fingerprint"] == new_fp and shown["handover_from"] == old_fp
    for host in PLAN:
        log = cloud.logs(host)
        assert "no longer registered" not in log, host
        assert "Traceback" not in log, host
    # Each node's agent said so (the Walrus and the CC's components: the CLC's host holds the
    # new CA from the rotation itself, and the CC's log is its restarted agent's).
    for host in ("node1", "node2", "node3"):
        assert "moving our pin" in cloud.logs(host), host
