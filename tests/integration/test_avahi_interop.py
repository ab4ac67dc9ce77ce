"""Wire interoperability with Avahi, both ways, against docs/protocol.md.

One LAN: a CLC (an eucareg agent, python-zeroconf) on `cloud`, and an `observer` host running
avahi-daemon, where the stock avahi tools stand in for another implementation:

* `avahi-browse -rpt _eucalyptus._tcp` on the observer shows the CLC's service with exactly
  the SRV data and TXT keys the protocol document gives for a CLC;
* a Walrus published with plain `avahi-publish -s` and the documented keys (its `fp=` the
  fingerprint of a key this test makes) is decided like an eucareg Walrus (`awaiting-key` in
  the install window), proves its key with a request made by eucareg's own client code from
  the observer, and ends `registered` with a verified credential bundle;
* an avahi-published SC of a cluster without a registered CC waits (`pending`,
  `waiting-for-cluster`), and one with a malformed `fp=` is rejected with the code and reason
  `txt.decode` gives, as an event.

Every wait is for the deciding event or answer, never a fixed sleep.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.lab import Lab
from eucalab.process import LabProcess
from eucareg.config.file import DEFAULT_API_PORT
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.pki import certificates, keypairs
from eucareg.pki import credentials as cred
from tests.integration.conftest import CloudFactory
from tests.integration.test_lab import avahi_tools  # noqa: F401  (a fixture, used by name)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("avahi_tools")]

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
SERVICE = "_eucalyptus._tcp"
EUCAVERS = "3.4"  # eucareg's default eucalyptus_version (what the lab's agents announce)

# One credential collection with eucareg's own client (eucareg/agent/collect.py), run inside
# the observer's namespace: TLS to the CLC heard over mDNS (trust on first use, by role and
# announced id), a request signed by the given key, the bundle verified and written.
COLLECT = """
import asyncio, json, sys
from pathlib import Path

import aiohttp

from eucareg.agent.collect import collect_credentials
from eucareg.agent.identity import Identity
from eucareg.agent.locate import Endpoint
from eucareg.core.model import Role
from eucareg.pki import keypairs


async def main() -> None:
    key_file, key_dir, component_id, role, address, port, registrar_id = sys.argv[1:8]
    key = keypairs.load_key(Path(key_file))
    me = Identity(component_id, key, keypairs.fingerprint(key.public_key()))
    endpoint = Endpoint(address, int(port), registrar_id)
    outcomes = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # each request is a long-poll of up to 25 s
            outcome = await collect_credentials(
                session, me, Role(role), endpoint, Path(key_dir), wait=25
            )
            outcomes.append(outcome.value)
            if outcome.value != "pending":
                break
    print(json.dumps(outcomes), flush=True)


asyncio.run(main())
"""


def documented_txt(txt_type: str) -> dict[str, str]:
    """The example TXT record docs/protocol.md gives for a role: the line of quoted
    "key=value" strings with "type=<txt_type>"."""
    for line in PROTOCOL_DOC.read_text().splitlines():
        pairs = re.findall(r'"([a-z]+)=([^"]*)"', line)
        if pairs and ("type", txt_type) in pairs and pairs[0][0] == "txtvers":
            return dict(pairs)
    raise AssertionError(f"docs/protocol.md has no example TXT record with type={txt_type}")


def browse(lab: Lab, host: str, instance: str, timeout: float = 20.0) -> list[str]:
    """The resolved line `avahi-browse -rpt _eucalyptus._tcp` prints for `instance` on `host`
    (split on ';'), as soon as it prints one."""
    deadline = time.monotonic() + timeout
    while True:
        result = lab.run(
            host, ["avahi-browse", "-rpt", SERVICE], env=lab.avahi_env(host), timeout=20
        )
        for line in result.stdout.splitlines():
            fields = line.split(";")
            if fields[0] == "=" and len(fields) >= 10 and fields[3] == instance:
                return fields
        if time.monotonic() >= deadline:
            raise AssertionError(f"avahi-browse on {host} never resolved {instance}:\n{result}")


def txt_of(field: str) -> dict[str, str]:
    """avahi-browse's TXT field ('"k=v" "k=v"') as a dict; no key may appear twice."""
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', field)
    pairs = [s.split("=", 1) for s in strings]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"a TXT key appears twice: {field}"
    return dict((k, v) for k, v in pairs)


def publish(lab: Lab, host: str, name: str, instance: str, record: dict[str, str]) -> LabProcess:
    """`avahi-publish -s INSTANCE _eucalyptus._tcp PORT key=value ...`, until the lab stops."""
    argv = ["avahi-publish", "-s", instance, SERVICE, str(DEFAULT_API_PORT)]
    proc = lab.spawn(
        host, name, [*argv, *(f"{k}={v}" for k, v in record.items())], env=lab.avahi_env(host)
    )
    proc.wait_for_log(f"Established under name '{instance}'", timeout=30)
    return proc


def kinds(events: list[dict[str, Any]], component_id: str) -> list[tuple[str, str]]:
    return [(e["kind"], e["code"]) for e in events if e["component_id"] == component_id]


def record_of(cloud: LabCloud, component_id: str) -> dict[str, Any] | None:
    return next((r for r in cloud.registry("cloud") if r["component_id"] == component_id), None)


def test_avahi_sees_our_announcements_and_its_announcements_register_like_ours(
    cloud_factory: CloudFactory, tmp_path: Path
) -> None:
    # The default mode with an install window open on the CLC, as an operator installs a cloud.
    cloud = cloud_factory({"cloud": {"clc": None}, "observer": {}})
    lab = cloud.lab
    cloud.start("cloud")
    lab.start_avahi("observer")
    clc_address, observer = str(lab.address("cloud")), str(lab.address("observer"))

    # (a) Our CLC, as avahi-browse on another host shows it.
    clc_id = cloud.component_id("cloud", "clc")
    clc_key = keypairs.load_key(cloud.host_dir("cloud") / "state" / "identity" / "clc.key.pem")
    clc_fp = keypairs.fingerprint(clc_key.public_key())
    fields = browse(lab, "observer", f"cloud-{clc_id}")
    hyphenated = clc_address.replace(".", "-")
    assert fields[1:9] == [
        "eth0",
        "IPv4",
        f"cloud-{clc_id}",
        SERVICE,
        "local",
        f"eucareg-{hyphenated}.local",  # SRV target
        clc_address,  # its A record
        str(DEFAULT_API_PORT),  # SRV port
    ]
    seen = txt_of(fields[9])
    assert seen == {
        "txtvers": "1",
        "protovers": "1",
        "eucavers": EUCAVERS,
        "type": "cloud",
        "state": "ready",
        "addr": clc_address,
        "id": clc_id,
        "fp": clc_fp,
        "port": str(DEFAULT_API_PORT),
    }
    # ... exactly the keys the protocol document's CLC example has, fixed values alike.
    example = documented_txt("cloud")
    assert set(seen) == set(example)
    for key in ("txtvers", "protovers", "type", "state"):
        assert seen[key] == example[key], key
    # ... and what avahi shows decodes, per the document, to this CLC as a registrar.
    heard = txt.decode(fields[3], seen, (fields[7],))
    assert isinstance(heard, Announcement), heard
    assert (heard.role, heard.component_id, heard.fingerprint) == (Role.CLC, clc_id, clc_fp)
    assert (str(heard.address), heard.api_port) == (clc_address, DEFAULT_API_PORT)

    # (b) A Walrus announced with plain avahi-publish, with a key pair made here. Its TXT
    # record is, key for key, what eucareg's own encoder makes for such a Walrus.
    walrus_key = keypairs.generate_key()
    walrus_fp = keypairs.fingerprint(walrus_key.public_key())
    walrus_id = f"walrus-{secrets.token_hex(6)}"
    walrus_txt = {
        "txtvers": "1",
        "protovers": "1",
        "eucavers": EUCAVERS,
        "type": "walrus",
        "state": "ready",
        "addr": observer,
        "id": walrus_id,
        "fp": walrus_fp,
    }
    assert walrus_txt == txt.encode(
        role=Role.WALRUS,
        component_id=walrus_id,
        cluster=None,
        state=AnnouncedState.READY,
        address=ipaddress.ip_address(observer),
        fingerprint=walrus_fp,
        api_port=None,
        eucavers=EUCAVERS,
    )
    assert set(walrus_txt) == set(documented_txt("walrus"))
    # (c) An SC of a cluster no registered CC has, and an SC whose fp= is no fingerprint
    # (upper-case hex): published now too, each decided on its own.
    sc_key = keypairs.generate_key()
    sc_id = f"sc-{secrets.token_hex(6)}"
    sc_txt = {
        **walrus_txt,
        "type": "storage",
        "id": sc_id,
        "fp": keypairs.fingerprint(sc_key.public_key()),
        "cluster": "cluster9",
    }
    assert set(sc_txt) == set(documented_txt("storage"))
    bad_id = f"sc-{secrets.token_hex(6)}"
    bad_txt = {**sc_txt, "id": bad_id, "fp": "sha256:" + secrets.token_hex(32).upper()}
    verdict = txt.decode("bad storage", bad_txt, (observer,))
    assert isinstance(verdict, txt.Rejected) and verdict.code == "bad-txt", verdict

    # Instance names in avahi's style, nothing like ours: identity comes from id= and fp=.
    publish(lab, "observer", "walrus", "Walrus on observer", walrus_txt)
    publish(lab, "observer", "sc", "storage for cluster9", sc_txt)
    publish(lab, "observer", "badsc", "bad storage", bad_txt)

    # The Walrus: accepted by the install window, waiting for proof of its key, exactly as
    # an eucareg Walrus's announcement is (docs/registration.md).
    cloud.wait_for_event("cloud", walrus_id, "awaiting-key", "accepted", timeout=30)
    waiting = record_of(cloud, walrus_id)
    assert waiting is not None
    assert (waiting["status"], waiting["waiting_for"]) == (
        "awaiting-key",
        "proof of key possession",
    )
    assert (waiting["role"], waiting["address"], waiting["fingerprint"]) == (
        "walrus",
        observer,
        walrus_fp,
    )
    assert (waiting["admitted_by"], waiting["instance"]) == ("install-window", "Walrus on observer")
    assert not cloud.hook_log("cloud"), "no hook before the key is proven"

    # The SC of cluster9 waits for its cluster; the malformed one is rejected, as an event,
    # with txt.decode's very code and reason, and leaves no record.
    cloud.wait_for_event("cloud", sc_id, "pending", "waiting-for-cluster", timeout=30)
    pending = record_of(cloud, sc_id)
    assert pending is not None
    assert (pending["status"], pending["waiting_for"]) == ("pending", "cluster cluster9")
    rejected = cloud.wait_for_event("cloud", bad_id, "rejected", timeout=30)
    assert rejected["code"] == verdict.code
    assert rejected["reason"] == f"announcement 'bad storage': {verdict.reason}"
    assert (rejected["role"], rejected["cluster"], rejected["address"]) == (
        "sc",
        "cluster9",
        observer,
    )
    assert record_of(cloud, bad_id) is None

    # Proof of possession: a credential request signed with the Walrus's key, sent from the
    # observer by eucareg's own client code, over TLS to the CLC it heard.
    key_file = tmp_path / "walrus.key.pem"
    cred.write_atomic(key_file, keypairs.key_pem(walrus_key))
    key_dir = tmp_path / "walrus-keys"
    argv = [sys.executable, "-c", COLLECT, str(key_file), str(key_dir), walrus_id, "walrus"]
    argv += [clc_address, str(DEFAULT_API_PORT), clc_id]
    result = lab.run("observer", argv, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])[-1] == "written", result.stdout

    cloud.wait_for_event("cloud", walrus_id, "credentials", "issued", timeout=30)
    assert kinds(cloud.events("cloud"), walrus_id) == [
        ("awaiting-key", "accepted"),
        ("registering", "key-proven"),
        ("registered", "ok"),
        ("credentials", "issued"),
    ]
    done = record_of(cloud, walrus_id)
    assert done is not None
    assert done["status"] == "registered" and done["credentials_collected_at"], done
    assert cloud.hook_log("cloud") == [f"walrus {walrus_id} {observer} "]
    # The bundle certifies the key the TXT record named, chained to the CLC's cloud CA.
    assert sorted(p.name for p in key_dir.iterdir() if not p.name.startswith(".")) == [
        "cloud-cert.pem",
        "walrus-cert.pem",
        "walrus-pk.pem",
    ]
    assert cred.credentials_present(key_dir, Role.WALRUS, walrus_key)
    assert (
        certificates.cert_fingerprint(certificates.load_cert(key_dir / "cloud-cert.pem")) == clc_fp
    )

    # Nothing else moved: the SC still waits for its cluster, the bad one is still unrecorded.
    pending = record_of(cloud, sc_id)
    assert pending is not None and pending["status"] == "pending"
    assert record_of(cloud, bad_id) is None
