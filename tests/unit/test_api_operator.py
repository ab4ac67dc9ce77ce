"""Operator endpoints about components, over HTTP against a real registrar: pending, approve,
reject and deregister round trips, the event log and its filters, hook runs, the registry and
the status tree (with the NCs a CC reports to the CLC). Bad input is a 400 naming the problem.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from eucareg.api import peer
from eucareg.api.status import tree
from eucareg.api.views import record_json
from eucareg.core.model import AnnouncedState, Role, Status
from tests.factories import ann, record_from
from tests.unit.test_api_harness import CC_SETTINGS, CLC_SETTINGS, Harness, key_of, served

ROW_FIELDS = {
    "component_id",
    "role",
    "cluster",
    "address",
    "fingerprint",
    "status",
    "reason",
    "waiting_for",
    "approved",
    "admitted_by",
    "instance",
    "first_seen",
    "updated_at",
    "registered_at",
    "expires_at",
    "attempts",
    "next_retry_at",
    "credentials_issued_at",
    "credentials_collected_at",
    "claimable",
    "online",
}


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS, peer_key=None) as harness:
        yield harness


async def test_approve_then_key_proof_registers_a_pending_component(clc: Harness) -> None:
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "pending")
    status, answer = await clc.get("/v1/pending")
    assert status == 200
    [row] = answer["pending"]
    assert set(row) >= ROW_FIELDS
    assert (row["component_id"], row["status"], row["online"]) == (
        walrus.component_id,
        "pending",
        True,
    )
    status, answer = await clc.post("/v1/approve", {"fingerprint": walrus.fingerprint})
    assert status == 200
    assert answer["component"]["approved"] is True
    assert "approved by the operator" in answer["component"]["reason"]
    # It names what it changed: this record's approval, reason and time, nothing else.
    [change] = answer["changed"]
    assert (change["object"], change["id"], change["action"]) == (
        "component",
        walrus.component_id,
        "updated",
    )
    assert (change["before"]["approved"], change["after"]["approved"]) == (False, True)
    assert set(change["before"]) == set(change["after"]) <= ROW_FIELDS - {"online"}
    assert {k for k in change["after"] if row[k] != change["after"][k]} <= {
        "approved",
        "reason",
        "updated_at",
        "status",
        "waiting_for",
    }
    await clc.record_status(walrus.component_id, "awaiting-key")
    status, _ = await clc.signed(
        "/v1/credentials", key_of(walrus), {"component_id": walrus.component_id}, "?wait=10"
    )
    assert status == 200
    assert (await clc.get("/v1/pending"))[1] == {"pending": []}
    # A registered component cannot be approved or rejected again.
    for path, message in (("/v1/approve", "is already"), ("/v1/reject", "deregister it instead")):
        status, answer = await clc.post(path, {"component_id": walrus.component_id})
        assert status == 400
        assert message in answer["error"]


async def test_reject_keeps_a_component_out_until_approved(clc: Harness) -> None:
    cc = ann(Role.CC, "cluster1")
    clc.announce(cc)
    await clc.record_status(cc.component_id, "pending")
    status, answer = await clc.post("/v1/reject", {"component_id": cc.component_id})
    assert status == 200
    assert answer["component"]["status"] == "rejected"
    assert (await clc.post("/v1/trust/install-window", {"open": True, "for": "5m"}))[0] == 200
    # Still rejected after the window opened (everything pending was decided again)...
    status, answer = await clc.get("/v1/events", kind="trust")
    assert status == 200 and answer["events"]
    assert (rec := clc.registrar.record(cc.component_id)) and rec.status.value == "rejected"
    assert (await clc.get("/v1/pending"))[1] == {"pending": []}
    # ...until the operator approves it.
    assert (await clc.post("/v1/approve", {"component_id": cc.component_id}))[0] == 200
    await clc.record_status(cc.component_id, "awaiting-key")


async def test_deregister_removes_the_record_and_is_logged(clc: Harness) -> None:
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "pending")
    status, answer = await clc.post("/v1/deregister", {"component_id": walrus.component_id})
    assert (status, answer["deregistered"]) == (200, walrus.component_id)
    [change] = answer["changed"]  # no certificate was issued: only the record
    assert (change["object"], change["id"], change["action"], change["after"]) == (
        "component",
        walrus.component_id,
        "deleted",
        None,
    )
    assert change["before"]["status"] == "pending"
    status, answer = await clc.get("/v1/events", kind="deregistered")
    assert [e["component_id"] for e in answer["events"]] == [walrus.component_id]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "component_id or fingerprint is required"),
        (
            {"component_id": ["x"]},
            "component_id: expected a component id (8-64 of a-z 0-9 -), got a list",
        ),
        (
            {"fingerprint": {"a": 1}},
            "fingerprint: expected a key fingerprint (sha256: and 64 hex digits), got an object",
        ),
        ({"component_id": "nosuch-component"}, "no component nosuch-component in this"),
        ({"fingerprint": "sha256:00"}, "fingerprint: 'sha256:00' is not a key fingerprint"),
        ({"component_id": "nosuch-component\n"}, "is not a component id"),
        ({"component_id": None}, "component_id: expected a component id"),
        ({"component_id": "nosuch-component", "force": True}, "unknown field 'force'"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/approve", "/v1/reject", "/v1/deregister"])
async def test_naming_a_component_badly_is_400(
    clc: Harness, path: str, body: dict[str, Any], message: str
) -> None:
    status, answer = await clc.post(path, body)
    assert status == 400
    assert message in answer["error"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 60_000, "nested too deeply"),
        (b"not json", "body is not JSON"),
        (b'["component_id"]', "body must be a JSON object, got a list"),
        (b'"x"', "body must be a JSON object, got a string"),
        (b"", "body is not JSON"),
        (b'{"a": 1, "a": 2}', "'a' appears twice"),
        (b"[" * 33 + b"]" * 33, "nested too deeply"),
        (b"\xff", "not UTF-8"),
        (b'{"component_id": Infinity}', "Infinity is not a JSON value"),
    ],
)
async def test_malformed_operator_bodies_are_400(clc: Harness, raw: bytes, message: str) -> None:
    for path in ("/v1/approve", "/v1/trust/lock", "/v1/tokens"):
        status, answer = await clc.raw_post(path, raw)
        assert status == 400, (path, answer)
        assert message in answer["error"]


async def events_of(h: Harness, **query: str) -> list[dict[str, Any]]:
    status, answer = await h.get("/v1/events", **query)
    assert status == 200, answer
    events: list[dict[str, Any]] = answer["events"]
    return events


async def test_event_filters_combine(clc: Harness) -> None:
    assert (await clc.post("/v1/trust/mode", {"mode": "any"}))[0] == 200
    walrus, cc1, cc2 = ann(Role.WALRUS), ann(Role.CC, "cluster1"), ann(Role.CC, "cluster2")
    for a in (walrus, cc1, cc2):
        clc.announce(a)
        await clc.record_status(a.component_id, "pending")
    every = await events_of(clc)
    assert {e["kind"] for e in every} == {"pending", "trust"}
    assert set(every[0]) == {
        "seq",
        "at",
        "component_id",
        "role",
        "cluster",
        "address",
        "kind",
        "code",
        "reason",
        "via",
    }
    # How each was heard: the pending ones by their (multicast) announcement, trust by nobody.
    assert {(e["kind"], e["via"]) for e in every} == {("pending", "mdns"), ("trust", "")}
    assert [e["seq"] for e in every] == sorted(e["seq"] for e in every)
    assert [e["component_id"] for e in await events_of(clc, role="cc")] == [
        cc1.component_id,
        cc2.component_id,
    ]
    assert [e["component_id"] for e in await events_of(clc, cluster="cluster2")] == [
        cc2.component_id
    ]
    assert [e["component_id"] for e in await events_of(clc, component=walrus.component_id)] == [
        walrus.component_id
    ]
    assert [e["code"] for e in await events_of(clc, kind="trust")] == ["mode"]
    assert await events_of(clc, kind="pending", role="walrus", cluster="cluster1") == []
    # since: strictly after; limit: the newest N, oldest first.
    assert await events_of(clc, since=str(every[1]["seq"])) == every[2:]
    assert await events_of(clc, since=str(every[-1]["seq"])) == []
    assert await events_of(clc, limit="2") == every[-2:]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"since": "abc"}, "since and limit must be integers"),
        ({"limit": "1.5"}, "since and limit must be integers"),
        ({"limit": "0"}, "since must be >= 0 and limit >= 1"),
        ({"since": "-1"}, "since must be >= 0 and limit >= 1"),
        ({"since": str(10**30)}, "since must be at most"),
    ],
)
async def test_bad_event_queries_are_400(clc: Harness, query: dict[str, str], message: str) -> None:
    status, answer = await clc.get("/v1/events", **query)
    assert status == 400
    assert message in answer["error"]


async def test_hook_runs_are_listed_per_component(clc: Harness, tmp_path: Path) -> None:
    hook = tmp_path / "hooks" / "walrus"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\necho hello from the hook\n")
    hook.chmod(0o755)
    assert (await clc.post("/v1/trust/install-window", {"open": True, "for": "5m"}))[0] == 200
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "awaiting-key")
    fields = {"component_id": walrus.component_id}
    assert (await clc.signed("/v1/credentials", key_of(walrus), fields, "?wait=10"))[0] == 200
    status, answer = await clc.get("/v1/hooks", component=walrus.component_id)
    assert status == 200
    [run] = answer["hook_runs"]
    assert run["component_id"] == walrus.component_id
    assert "hello from the hook" in str(run)
    assert (await clc.get("/v1/hooks", component="nobody"))[1] == {"hook_runs": []}


async def test_registry_and_status_on_a_cc(tmp_path: Path) -> None:
    async with served(tmp_path, CC_SETTINGS) as cc:
        cc.local.append({"role": "cc", "component_id": "cc-000000000001", "cluster": "cluster1"})
        nc = ann(Role.NC, "cluster1")
        cc.announce(nc)
        await cc.record_status(nc.component_id, "pending")
        status, registry = await cc.get("/v1/registry")
        assert status == 200
        assert registry["registrar"]["registers"] == ["nc"]
        assert registry["registrar"]["cluster"] == "cluster1"
        assert registry["local"] == cc.local
        assert [c["component_id"] for c in registry["components"]] == [nc.component_id]
        status, answer = await cc.get("/v1/status")
        assert status == 200
        assert set(answer) == {"registrar", "local", "tree", "errors", "warnings", "legacy", "mdns"}
        assert answer["errors"] == []
        assert answer["tree"]["clc"] is None
        [cluster] = answer["tree"]["clusters"]
        assert cluster["name"] == "cluster1"
        assert [c["component_id"] for c in cluster["nc"]] == [nc.component_id]


async def test_the_clc_status_tree_holds_the_nodes_its_ccs_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        served(tmp_path / "cc", CC_SETTINGS) as cc_host,
        served(tmp_path / "clc", CLC_SETTINGS, peer_key=cc_host.cloud.key) as clc_host,
    ):
        nc = ann(Role.NC, "cluster1")
        cc_host.announce(nc)
        await cc_host.record_status(nc.component_id, "pending")
        clc_host.local.append({"role": "clc", "component_id": "clc-1", "address": "10.0.0.1"})
        # cluster1's CC, registered at the CLC and announcing its API port.
        cc = ann(Role.CC, "cluster1", state=AnnouncedState.REGISTERED, api_port=8780)
        # The CLC signs its peer request for this CC's announced id, which its registrar has.
        cc_host.local.append({"role": "cc", "component_id": cc.component_id})
        window = {"open": True, "for": "5m"}
        assert (await clc_host.post("/v1/trust/install-window", window))[0] == 200
        clc_host.announce(cc)
        await clc_host.record_status(cc.component_id, "awaiting-key")
        fields = {"component_id": cc.component_id}
        assert (await clc_host.signed("/v1/credentials", key_of(cc), fields, "?wait=10"))[0] == 200
        # The CC announces an address the test cannot reach; send the fetch to its API.
        url = f"{cc_host.base}/v1/peer/registry"
        monkeypatch.setattr(peer, "_url", lambda _address, _port: url)
        status, answer = await clc_host.get("/v1/status")
        assert status == 200
        assert answer["errors"] == []
        assert answer["tree"]["clc"]["component_id"] == "clc-1"
        [cluster] = answer["tree"]["clusters"]
        assert [c["component_id"] for c in cluster["cc"]] == [cc.component_id]
        assert [c["component_id"] for c in cluster["nc"]] == [nc.component_id]
        # A CC that does not answer is reported, and its nodes are missing.
        await cc_host.client.close()
        started = time.monotonic()
        status, answer = await clc_host.get("/v1/status")
        assert status == 200
        assert time.monotonic() - started < peer.PEER_TIMEOUT + 2
        [error] = answer["errors"]
        assert error.startswith(f"CC cluster1 at {cc.address}: ")
        assert answer["tree"]["clusters"][0]["nc"] == []


def test_the_tree_puts_each_row_in_its_place_once() -> None:
    rows = [
        {"component_id": "walrus-1", "role": "walrus", "status": "refused"},
        {"component_id": "cc-1", "role": "cc", "cluster": "b", "status": "registered"},
        {"component_id": "nc-1", "role": "nc", "cluster": "a", "status": "registered"},
        {"component_id": "nc-2", "role": "nc", "cluster": "z", "status": "unmatched"},
        {"component_id": "nc-1", "role": "nc", "cluster": "b", "status": "pending"},
    ]
    shaped = tree(rows, [{"role": "clc", "component_id": "clc-1"}])
    assert shaped["clc"] == {"role": "clc", "component_id": "clc-1"}
    assert [w["component_id"] for w in shaped["walrus"]] == ["walrus-1"]
    assert [c["name"] for c in shaped["clusters"]] == ["a", "b"]
    assert [c["component_id"] for c in shaped["clusters"][0]["nc"]] == ["nc-1"]
    assert shaped["clusters"][1]["nc"] == []  # the first row of nc-1 wins
    assert [u["component_id"] for u in shaped["unmatched"]] == ["nc-2"]


def test_a_record_row_is_the_record_with_its_enums_as_text() -> None:
    """record_json copies fields flat: it must stay what asdict() gives, should a field
    ever hold something nested."""
    record = record_from(
        ann(Role.NC, "c1"), Status.REGISTERED, waiting_for="cluster c1", replaces="nc-old"
    )
    expected = {**asdict(record), "role": "nc", "status": "registered", "online": True}
    assert record_json(record, True) == expected


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"role": "cc", "address": "10.77.9.9"}, 400, "missing-field", "a cc needs its cluster"),
        (
            {"role": "walrus", "address": "10.77.9.9", "cluster": "c1"},
            400,
            "invalid-field",
            "a walrus has no cluster",
        ),
        ({"role": "walrus", "address": "127.0.0.1"}, 400, "invalid-field", "address"),
        ({"role": "walrus", "address": "10.77.9"}, 400, "invalid-field", "address"),
        ({"role": "clc", "address": "10.77.9.9"}, 400, "invalid-field", "role"),
        (
            {"role": "nc", "address": "10.77.9.9", "cluster": "c1"},
            400,
            "not-mine",
            "this registrar does not register ncs of cluster c1",
        ),
        (
            {"role": "sc", "address": "10.77.9.9", "cluster": "c1"},
            409,
            "waiting-for-cluster",
            "waiting for cluster c1's CC",
        ),
    ],
)
async def test_manual_registration_names_what_is_wrong_and_stores_nothing(
    clc: Harness, body: dict[str, Any], status: int, code: str, message: str
) -> None:
    got, answer = await clc.post("/v1/register", body)
    assert (got, answer.get("code")) == (status, code), answer
    assert message in answer["error"], answer
    assert clc.registrar.records() == {}


async def test_manual_registration_answers_with_the_record_and_what_changed(
    clc: Harness,
) -> None:
    body = {"role": "walrus", "address": "10.77.9.9", "fingerprint": "sha256:" + "a" * 64}
    status, answer = await clc.post("/v1/register", body)
    assert status == 200, answer
    row = answer["component"]
    assert set(row) >= ROW_FIELDS
    assert (row["role"], row["address"], row["claimable"]) == ("walrus", "10.77.9.9", True)
    assert row["status"] in ("registering", "registered") and row["admitted_by"] == "manual"
    assert [c["id"] for c in answer["changed"]] == [row["component_id"]]
    status, again = await clc.post("/v1/register", body)
    assert (status, again["code"]) == (409, "in-use"), again
