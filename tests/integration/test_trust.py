"""Trust and lock-down with real agents, real multicast, real Avahi and attacker hosts.

The registrars here run with the default trust settings (no install window): every
admission is by token, by approval or by an explicitly opened window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eucalab.cloud import LabCloud
from eucalab.cloud_probes import all_registered, registered_components
from eucalab.lab import Lab
from tests.integration.conftest import CloudFactory

pytestmark = pytest.mark.integration


def approve_own_cc(cloud: LabCloud) -> None:
    """Start the CLC+CC host; its CC waits for approval like anything else. The operator
    checks the fingerprint (`eucareg fingerprint` on the host) and approves it by key."""
    cloud.start("cloud")
    cloud.wait_for_api("cloud")
    config = str(cloud.host_dir("cloud") / "eucareg.toml")
    mine = json.loads(cloud.cli("cloud", "fingerprint", "--json", "--config", config).stdout)
    cc_fingerprint = next(r["fingerprint"] for r in mine if r["role"] == "cc")
    queued = _wait_pending(cloud, 1)
    assert [r["fingerprint"] for r in queued] == [cc_fingerprint]
    cloud.cli("cloud", "approve", "--fingerprint", cc_fingerprint)
    cloud.wait_for("cloud", all_registered({"cc": 1}), timeout=60)


def ids_by_host(cloud: LabCloud) -> dict[str, str]:
    """host -> component id of its (single non-CLC) component."""
    out = {}
    for host in cloud.plan:
        for path in (cloud.host_dir(host) / "state" / "identity").glob("*.id"):
            cid = path.read_text().strip()
            if not cid.startswith("clc-"):
                out[host] = cid
    return out


def rows_by_id(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["component_id"]: r for r in registered_components(status)}


def token(cloud: LabCloud, host: str, *args: str) -> str:
    return cloud.cli(host, "token", "create", *args).stdout.strip()


def fingerprint_of(cloud: LabCloud, host: str) -> dict[str, str]:
    cloud.prepare(host)
    config = str(cloud.host_dir(host) / "eucareg.toml")
    out = cloud.cli(host, "fingerprint", "--json", "--config", config).stdout
    return dict(json.loads(out)[0])


def start_with_id(cloud: LabCloud, host: str) -> str:
    """Start a host's agent; its component id (made beforehand, as `eucareg fingerprint` does)."""
    component_id = fingerprint_of(cloud, host)["component_id"]
    cloud.start(host)
    return component_id


def has_credentials(cloud: LabCloud, host: str, cert: str) -> bool:
    return (cloud.key_dir(host) / cert).exists()


def test_attackers_get_nothing_and_every_refusal_says_why(cloud_factory: CloudFactory) -> None:
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "notoken": {"nc": "cluster1"},
        "wrongtok": {"nc": "cluster1"},
        "expired": {"nc": "cluster1"},
        "revoked": {"nc": "cluster1"},
        "otherrole": {"nc": "cluster1"},
        "othercl": {"sc": "cluster1"},
        "avahi": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan, trust="manual")
    approve_own_cc(cloud)

    good = token(cloud, "cloud", "--role", "nc", "--cluster", "cluster1", "--uses", "1")
    prefix, token_id, _secret, ca = good.split(".")
    wrong = f"{prefix}.{token_id}.{'A' * 43}.{ca}"
    expired = token(cloud, "cloud", "--role", "nc", "--cluster", "cluster1", "--ttl", "1s")
    revoked = token(cloud, "cloud", "--role", "nc", "--cluster", "cluster1")
    cloud.cli("cloud", "token", "revoke", revoked.split(".")[1])
    sc_token = token(cloud, "cloud", "--role", "sc", "--cluster", "cluster1")
    other_cluster = token(cloud, "cloud", "--role", "sc", "--cluster", "cluster9")
    _wait_token_state(cloud, expired.split(".")[1], "expired")
    cloud.settings = {
        **cloud.settings,
        "tokens": {
            "node1": {"nc": good},
            "wrongtok": {"nc": wrong},
            "expired": {"nc": expired},
            "revoked": {"nc": revoked},
            "otherrole": {"nc": sc_token},
            "othercl": {"sc": other_cluster},
        },
    }
    for host in ("node1", "notoken", "wrongtok", "expired", "revoked", "otherrole", "othercl"):
        cloud.start(host)

    # Through Avahi: an unknown NC, and a copy of node1's real, token-proven TXT record.
    cloud.agents["node1"].wait_for_log("announcing nc", timeout=60)
    node1 = fingerprint_of(cloud, "node1")
    cloud.lab.start_avahi("avahi")
    real_txt = _wait_for_txt(cloud, "avahi", node1["component_id"])
    env = cloud.lab.avahi_env("avahi")
    replay = cloud.lab.spawn(
        "avahi",
        "replay",
        ["avahi-publish", "-s", "node copy", "_eucalyptus._tcp", "8780", *real_txt],
        env=env,
    )
    stranger_txt = [
        "txtvers=1",
        "protovers=1",
        "eucavers=3.4",
        "type=node",
        "state=ready",
        "cluster=cluster1",
        f"addr={cloud.lab.address('avahi')}",
        "id=nc-0a0a0a0a0a0a",
        "fp=sha256:" + "0a" * 32,
    ]
    stranger = cloud.lab.spawn(
        "avahi",
        "stranger",
        ["avahi-publish", "-s", "node stranger", "_eucalyptus._tcp", "8780", *stranger_txt],
        env=env,
    )
    for proc in (replay, stranger):
        proc.wait_for_log("Established", timeout=60)

    ids = ids_by_host(cloud)
    expect = {
        ids["wrongtok"]: ("refused", "bad-proof"),
        ids["expired"]: ("refused", "token-expired"),
        ids["revoked"]: ("refused", "token-revoked"),
        ids["otherrole"]: ("refused", "token-wrong-role"),
        ids["othercl"]: ("refused", "token-wrong-cluster"),
        ids["notoken"]: ("pending", "awaiting-approval"),
        "nc-0a0a0a0a0a0a": ("pending", "awaiting-approval"),
    }

    def decided(events: list[dict[str, Any]]) -> bool:
        seen = {(e["component_id"], e["kind"], e["code"]) for e in events}
        return (
            all((cid, state, code) in seen for cid, (state, code) in expect.items())
            and (node1["component_id"], "rejected", "replayed") in seen
            and (node1["component_id"], "registered", "ok") in seen
        )

    # Every attacker's announcement has been decided (each decision is an event), and node1's
    # copy was heard and turned away. Those decisions stand until the operator acts.
    events = cloud.wait_for_events("cloud", decided, timeout=60)
    status = cloud.status("cloud")
    rows = rows_by_id(status)
    for cid, (state, code) in expect.items():
        assert rows[cid]["status"] == state, (cid, rows[cid])
        assert any(e["component_id"] == cid and e["code"] == code for e in events), (cid, code)
    # The copy of node1's record was refused as a replay; node1 itself registered once.
    replayed = [e for e in events if e["kind"] == "rejected" and e["code"] == "replayed"]
    assert [e["component_id"] for e in replayed] == [node1["component_id"]]
    assert sum(1 for line in cloud.hook_log("cloud") if line.startswith("node ")) == 1
    assert has_credentials(cloud, "node1", "node-cert.pem")
    for host, cert in (
        ("notoken", "node-cert.pem"),
        ("wrongtok", "node-cert.pem"),
        ("expired", "node-cert.pem"),
        ("revoked", "node-cert.pem"),
        ("otherrole", "node-cert.pem"),
        ("othercl", "sc-cert.pem"),
    ):
        assert not has_credentials(cloud, host, cert), host
    registered = {cid for cid, row in rows.items() if row["status"] == "registered"}
    assert registered == {ids["cloud"], ids["node1"]}

    # Deregistered, node1 comes back with its (one-use) token: the token does not admit it
    # again; that takes the operator.
    cloud.cli("cloud", "deregister", ids["node1"])
    _wait_status_on(cloud, "cloud", ids["node1"], "refused")
    spent = [
        e for e in cloud.events("cloud", f"&component={ids['node1']}") if e["kind"] == "refused"
    ]
    assert spent[-1]["code"] == "token-spent"
    assert not has_credentials(cloud, "node1", "node-cert.pem")


def _wait_for_txt(cloud: LabCloud, host: str, component_id: str) -> list[str]:
    """node1's TXT record as avahi-browse on another host sees it (key=value strings)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = cloud.lab.run(
            host,
            ["avahi-browse", "-r", "-t", "-p", "-k", "_eucalyptus._tcp"],
            env=cloud.lab.avahi_env(host),
            timeout=20,
        )
        for line in result.stdout.splitlines():
            fields = line.split(";")
            if fields[0] == "=" and f'"id={component_id}"' in line:
                return [item.strip('"') for item in fields[9].split('" "')]
        time.sleep(0.5)
    raise AssertionError(f"avahi-browse on {host} never saw {component_id}")


def test_approval_reject_install_window_lock_off_and_deregistration(
    cloud_factory: CloudFactory,
) -> None:
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "node2": {"nc": "cluster1"},
        "node3": {"nc": "cluster1"},
        "node4": {"nc": "cluster1"},
        "node5": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan, trust="manual", log_level={"node2": "debug"})
    approve_own_cc(cloud)

    # Default settings: an unknown NC waits; approve lets it in, reject keeps one out.
    cloud.start("node1")
    cloud.start("node2")
    queue = {r["component_id"]: r for r in _wait_pending(cloud, 2)}
    ids = ids_by_host(cloud)
    assert queue[ids["node1"]]["waiting_for"] == "operator approval"
    cloud.cli("cloud", "approve", ids["node1"])
    cloud.cli("cloud", "reject", ids["node2"])
    _wait_status(cloud, ids["node1"], "registered")
    # node2's agent asked again and was told: the registrar's answer after the rejection.
    cloud.agents["node2"].wait_for_log("'status': 'rejected'", timeout=60)
    rows = rows_by_id(cloud.status("cloud"))
    assert rows[ids["node2"]]["status"] == "rejected"
    kinds = [e["kind"] for e in cloud.events("cloud", f"&component={ids['node2']}")]
    assert kinds[-1] == "rejected" and "registering" not in kinds
    assert not has_credentials(cloud, "node2", "node-cert.pem")

    # An install window admits what waits, then closes by itself when its time is up. node3
    # is up and waiting first, so the window need not cover starting an agent.
    node3 = start_with_id(cloud, "node3")
    _wait_status(cloud, node3, "pending")
    opened = json.loads(cloud.cli("cloud", "install-mode", "open", "--for", "10s", "--json").stdout)
    assert opened["install_open"]
    until = opened["install_until"]
    _wait_status(cloud, node3, "registered", timeout=60)
    assert rows_by_id(cloud.status("cloud"))[node3]["admitted_by"] == "install-window"
    deadline = time.monotonic() + max(0.0, until - time.time()) + 30
    while json.loads(cloud.cli("cloud", "trust", "--json").stdout)["install_open"]:
        assert time.monotonic() < deadline, "the install window did not close"
        time.sleep(0.3)
    closed = [
        e for e in cloud.events("cloud", "&kind=trust") if e["code"] == "install-window-closed"
    ]
    # Closed by its own timer, at the end the registrar reported when it opened (wall clock
    # against the loop's monotonic timer: a little slack before, some for load after).
    assert len(closed) == 1 and until - 0.25 <= closed[0]["at"] < until + 3.0, (until, closed)

    # Lock: refused at once, kept across a registrar restart.
    cloud.cli("cloud", "lock")
    cloud.restart("cloud")
    cloud.wait_for_api("cloud")
    node4 = start_with_id(cloud, "node4")
    _wait_status(cloud, node4, "refused")
    assert "locked" in rows_by_id(cloud.status("cloud"))[node4]["reason"]
    assert json.loads(cloud.cli("cloud", "trust", "--json").stdout)["locked"] == ["cc", "clc"]

    # Mode off registers nothing, even what the operator approves.
    cloud.cli("cloud", "unlock")
    cloud.cli("cloud", "mode", "off")
    node5 = start_with_id(cloud, "node5")
    _wait_status(cloud, node5, "refused")
    approval = json.loads(cloud.cli("cloud", "approve", node5, "--json").stdout)
    assert approval["component"]["approved"] is True
    approved = cloud.wait_for_event("cloud", node5, "approved")
    again = cloud.wait_for_event("cloud", node5, "refused", after=approved["seq"])
    assert again["code"] == "registration-off"
    assert rows_by_id(cloud.status("cloud"))[node5]["status"] == "refused"
    cloud.cli("cloud", "mode", "local")

    # Deregister node1: its credentials are revoked, it notices, and it is a newcomer again.
    node1 = ids["node1"]
    cloud.cli("cloud", "deregister", node1)
    deadline = time.monotonic() + 60
    while has_credentials(cloud, "node1", "node-cert.pem") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not has_credentials(cloud, "node1", "node-cert.pem")
    _wait_status(cloud, node1, "pending")
    kinds = [e["kind"] for e in cloud.events("cloud", f"&component={node1}")]
    assert "deregistered" in kinds and kinds[-1] == "pending"
    cloud.cli("cloud", "approve", node1)
    _wait_status(cloud, node1, "registered")
    deadline = time.monotonic() + 60
    while not has_credentials(cloud, "node1", "node-cert.pem") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert has_credentials(cloud, "node1", "node-cert.pem")


def _wait_pending(cloud: LabCloud, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = json.loads(cloud.cli("cloud", "pending", "--json").stdout)
        waiting = [r for r in rows if r["waiting_for"] == "operator approval"]
        if len(waiting) >= count:
            return waiting
        time.sleep(0.3)
    raise AssertionError(f"fewer than {count} components waiting for approval: {rows}")


def _wait_token_state(cloud: LabCloud, token_id: str, state: str, timeout: float = 60) -> None:
    """Until the registrar reports the token in ``state`` (its own clock decides expiry)."""
    deadline = time.monotonic() + timeout
    while True:
        tokens = {t["token_id"]: t for t in cloud.api("cloud", "/v1/tokens")["tokens"]}
        if tokens[token_id]["state"] == state:
            return
        assert time.monotonic() < deadline, f"token {token_id} not {state}: {tokens[token_id]}"
        time.sleep(0.2)


def _wait_status(cloud: LabCloud, component_id: str, state: str, timeout: float = 60) -> None:
    def done(status: dict[str, Any]) -> bool:
        return rows_by_id(status).get(component_id, {}).get("status") == state

    cloud.wait_for("cloud", done, timeout=timeout)


def test_component_with_a_pinned_token_refuses_a_rogue_registrar(
    cloud_factory: CloudFactory,
) -> None:
    """node1 pins the genuine CA through its token, node2 through `ca_fingerprint`."""
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None, "cc": "cluster1"},
        "rogue": {"clc": None, "cc": "cluster1"},
        "node1": {"nc": "cluster1"},
        "node2": {"nc": "cluster1"},
    }
    cloud = cloud_factory(plan, trust="manual")
    cloud.start("cloud")
    cloud.open_install_window("cloud")
    cloud.wait_for("cloud", all_registered({"cc": 1}), timeout=60)
    genuine = token(cloud, "cloud", "--role", "nc", "--cluster", "cluster1")
    genuine_ca = "sha256:" + genuine.split(".")[3]
    cloud.stop("cloud")  # only the rogue answers from now on

    cloud.start("rogue")
    cloud.open_install_window("rogue")
    cloud.wait_for("rogue", all_registered({"cc": 1}), timeout=60)
    cloud.settings = {
        **cloud.settings,
        "tokens": {"node1": {"nc": genuine}},
        "top_level": {"node2": [f'ca_fingerprint = "{genuine_ca}"']},
    }
    node1 = start_with_id(cloud, "node1")
    node2 = start_with_id(cloud, "node2")
    # The rogue does not know the token; its operator lets the node in anyway. node2 comes
    # in through the rogue's install window, and waits there for a request signed by its key.
    _wait_status_on(cloud, "rogue", node1, "refused")
    cloud.cli("rogue", "approve", node1)
    _wait_status_on(cloud, "rogue", node2, "awaiting-key")
    # Each agent refuses the rogue in the TLS handshake (it refuses every time it asks): the
    # rogue never gets a request signed by the node's key, so never registers it.
    for host in ("node1", "node2"):
        cloud.agents[host].wait_for_log("refusing registrar", timeout=60)
        assert "does not show the cloud CA we pin" in cloud.logs(host)
    assert not has_credentials(cloud, "node1", "node-cert.pem")
    assert not has_credentials(cloud, "node2", "node-cert.pem")
    rows = rows_by_id(cloud.status("rogue"))
    assert rows[node1]["status"] != "registered" and rows[node2]["status"] != "registered"


def _wait_status_on(cloud: LabCloud, host: str, component_id: str, state: str) -> None:
    def done(status: dict[str, Any]) -> bool:
        return rows_by_id(status).get(component_id, {}).get("status") == state

    cloud.wait_for(host, done, timeout=60)


def test_remote_component_registers_over_http_only_in_mode_any(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    """The design's remote case: a Walrus on another network, out of multicast reach, uses
    the HTTP fallback. Mode local refuses it; mode any accepts it (with an install window)."""
    lab = lab_factory(
        "subnet near 10.77.1.0/24\nsubnet far 10.77.2.0/24\n"
        "host cloud near\nhost walrus far\nrouter r1 near far"
    )
    plan: dict[str, dict[str, str | None]] = {"cloud": {"clc": None}, "walrus": {"walrus": None}}
    url = f"http://{lab.address('cloud')}:8780"
    cloud = LabCloud(
        lab,
        plan,
        tmp_path / "cloud",
        settings={
            "trust": "install-window",
            "top_level": {"walrus": [f'fallback_registrar = "{url}"']},
        },
    )
    cloud.start("cloud")
    walrus = start_with_id(cloud, "walrus")
    # Mode local: refused with an event, and nothing stored for it.
    deadline = time.monotonic() + 60
    while True:
        refusals = [
            e
            for e in cloud.events("cloud", f"&component={walrus}")
            if e["code"] == "fallback-not-allowed"
        ]
        if refusals:
            break
        assert time.monotonic() < deadline, "the HTTP announcement was never decided"
        time.sleep(0.2)
    assert "needs mode any" in refusals[0]["reason"]
    assert walrus not in rows_by_id(cloud.status("cloud"))
    cloud.cli("cloud", "mode", "any")
    _wait_status_on(cloud, "cloud", walrus, "registered")
    deadline = time.monotonic() + 60
    while not has_credentials(cloud, "walrus", "walrus-cert.pem") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert has_credentials(cloud, "walrus", "walrus-cert.pem")
    assert "fallback announcement" in cloud.logs("walrus")


def test_token_pinned_walrus_and_cc_register_with_the_genuine_clc(
    cloud_factory: CloudFactory,
) -> None:
    """A token pins the cloud CA by its key; the CLC proves itself with that CA's own
    certificate. A Walrus and a CC of another host, each with a token and nothing else,
    register over TLS and write their credentials (no install window, no approval)."""
    plan: dict[str, dict[str, str | None]] = {
        "cloud": {"clc": None},
        "walrus": {"walrus": None},
        "cc2": {"cc": "cluster2"},
    }
    cloud = cloud_factory(plan, trust="manual")
    cloud.start("cloud")
    cloud.wait_for_api("cloud")
    walrus_token = token(cloud, "cloud", "--role", "walrus")
    cc_token = token(cloud, "cloud", "--role", "cc", "--cluster", "cluster2")
    cloud.settings = {
        **cloud.settings,
        "tokens": {"walrus": {"walrus": walrus_token}, "cc2": {"cc": cc_token}},
    }
    cloud.start("walrus")
    cloud.start("cc2")
    cloud.wait_for("cloud", all_registered({"walrus": 1, "cc": 1}), timeout=90)
    deadline = time.monotonic() + 60
    while not (
        has_credentials(cloud, "walrus", "walrus-cert.pem")
        and has_credentials(cloud, "cc2", "cluster-cert.pem")
    ):
        assert time.monotonic() < deadline, cloud.logs("walrus")[-2000:] + cloud.logs("cc2")[-2000:]
        time.sleep(0.2)
    for host in ("walrus", "cc2"):
        assert "refusing registrar" not in cloud.logs(host)
