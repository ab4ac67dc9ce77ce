"""Certificate renewal in a running cloud: real agents in network namespaces, certificates that
fall due a minute after they are issued, and the cloud CA renewed by its operator. Every
component ends with a new certificate for its own key, and none ever looks unregistered.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered
from eucareg.core.model import Role
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from tests.integration.conftest import CloudFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLAN: dict[str, dict[str, str | None]] = {
    "cloud": {"clc": None, "walrus": None},
    "cc": {"cc": "cluster1", "sc": "cluster1"},
    "node1": {"nc": "cluster1"},
    "node2": {"nc": "cluster1"},
}
# Certificates of an hour, renewed with 59 minutes left: due a minute after they are issued.
RENEWAL = {"certificate_lifetime": "1h", "certificate_renew_before": "59m"}
# Events that would mean a component was, at some point, not registered any more.
UNREGISTERED = {"deregistered", "pending", "awaiting-key", "registering", "silent", "lost"}


def own_certs(cloud: LabCloud) -> dict[tuple[str, str], str]:
    """(host, role) -> the serial of the component's own certificate on disk."""
    out = {}
    for host, roles in cloud.plan.items():
        for role_name in roles:
            if role_name == "clc":
                continue
            path = cloud.key_dir(host) / cred.LAYOUTS[Role(role_name)].cert
            out[(host, role_name)] = format(certificates.load_cert(path).serial_number, "x")
    return out


def hook_calls(cloud: LabCloud) -> collections.Counter[str]:
    calls: collections.Counter[str] = collections.Counter()
    for host in cloud.plan:
        for line in cloud.hook_log(host):
            calls[line.split()[1]] += 1
    return calls


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def holds_credentials(cloud: LabCloud) -> bool:
    for host, roles in cloud.plan.items():
        for role_name in roles:
            role = Role(role_name)
            key = keypairs.load_key(
                cloud.host_dir(host) / "state" / "identity" / f"{role_name}.key.pem"
            )
            if role is not Role.CLC and not cred.credentials_present(
                cloud.key_dir(host), role, key
            ):
                return False
    return True


def file_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# Start, registration and a renewal of every certificate take up to 4 1/2 minutes here.
@pytest.mark.timeout(600)
def test_short_lived_certificates_are_renewed_while_the_cloud_runs(
    cloud_factory: CloudFactory,
) -> None:
    cloud = cloud_factory(PLAN, registrar=RENEWAL)
    cloud.start_all()
    cloud.wait_for("cloud", all_registered(cloud.expected()), timeout=90)
    wait_until(lambda: cloud.credentials_complete(), 30, "every key file")
    first = own_certs(cloud)
    hooks = hook_calls(cloud)
    assert sorted(hooks.values()) == [1] * len(first)  # one hook per component, so far

    # Every component renews in place: a new serial for the same key, while the cloud runs.
    def all_renewed() -> bool:
        now = own_certs(cloud)
        return all(now[k] != first[k] for k in first)

    wait_until(all_renewed, 150, "every certificate renewed")
    assert holds_credentials(cloud)
    # The NCs hold the chain of their CC's renewed certificate (same key, same name). The CC
    # renews each minute here, at about the moment its NCs renew theirs: an NC that asked
    # just before the CC's new certificate was served must get it with its next watch, not
    # when that watch runs out (4 minutes; CI saw the NCs lag a renewal behind for good).
    for node in ("node1", "node2"):
        wait_until(
            lambda node=node: (
                file_text(cloud.key_dir(node) / "cluster-cert.pem")  # type: ignore[misc]
                == file_text(cloud.key_dir("cc") / "cluster-cert.pem")
            ),
            120,
            f"{node} to hold its CC's renewed certificate",
        )
    # No hook ran again, and nothing was ever shown unregistered.
    assert hook_calls(cloud) == hooks
    for host in ("cloud", "cc"):
        events = cloud.events(host)
        renewed = {e["component_id"] for e in events if e["code"] == "renewed"}
        mine = {
            cid
            for cid in {e["component_id"] for e in events if e["kind"] == "registered"}
            if cid != "-"
        }
        assert mine and mine <= renewed, (host, mine - renewed)
        after = [e for e in events if e["component_id"] in mine]
        registered_at = {e["component_id"]: e["seq"] for e in after if e["kind"] == "registered"}
        late = [
            e
            for e in after
            if e["seq"] > registered_at[e["component_id"]] and e["kind"] in UNREGISTERED
        ]
        assert not late, late
        # Renewed on time: nothing was reported as not renewed.
        assert not [e for e in events if e["code"] in ("expiring", "expired")]
    for host in PLAN:
        log = cloud.logs(host)
        assert "no longer registered" not in log, host
        assert "Traceback" not in log, host
        assert " renewed (" in log, host  # each agent replaced its files in place

    # The operator renews the cloud CA: the same key, so every pin holds, and every component
    # takes up the new cloud-cert.pem (through its CC, for the nodes) without re-registering.
    old_ca = certificates.load_cert(cloud.key_dir("cloud") / cred.CLOUD_CERT)
    shown = cloud.cli("cloud", "ca", "renew", "--json")
    assert '"previous_serial"' in shown.stdout
    new_pem = file_text(cloud.key_dir("cloud") / cred.CLOUD_CERT)
    new_ca = certificates.load_cert_pem(new_pem)
    assert new_ca.serial_number != old_ca.serial_number
    assert certificates.cert_fingerprint(new_ca) == certificates.cert_fingerprint(old_ca)
    for host in ("cc", "node1", "node2"):
        wait_until(
            lambda host=host: file_text(cloud.key_dir(host) / cred.CLOUD_CERT) == new_pem,  # type: ignore[misc]
            300,
            f"{host} to hold the renewed cloud CA",
        )
    assert holds_credentials(cloud)
    assert hook_calls(cloud) == hooks
    status = cloud.status("cloud")
    assert all_registered(cloud.expected())(status)
    for host in PLAN:
        assert "no longer registered" not in cloud.logs(host), host
        assert "Traceback" not in cloud.logs(host), host
    assert "cloud CA certificate is now serial" in cloud.logs("cloud")
