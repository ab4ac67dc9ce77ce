"""Operator endpoints about trust, over HTTP against a real registrar: mode, locks, the install
window and join tokens (create, list with their states, revoke). Wrong types and out-of-range
values are a 400 naming the field, never a 500 or a silently odd setting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from eucareg.core.model import Announcement, Role
from eucareg.core.trust import announcement_proof_message, make_proof, parse_token
from tests.factories import ann
from tests.unit.test_api_harness import (
    CC_SETTINGS,
    CLC_SETTINGS,
    Harness,
    eventually,
    key_of,
    served,
)

TRUST_FIELDS = {"mode", "locked", "install_until", "install_open", "install_remaining"}


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS) as harness:
        yield harness


def trust_change(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"object": "trust", "id": "trust", "action": "updated", "before": before, "after": after}
    ]


async def test_mode_lock_and_install_window_answer_the_new_settings(clc: Harness) -> None:
    status, trust = await clc.post("/v1/trust/mode", {"mode": "off"})
    assert status == 200 and set(trust) == TRUST_FIELDS | {"changed"} and trust["mode"] == "off"
    assert trust["changed"] == trust_change({"mode": "local"}, {"mode": "off"})
    status, trust = await clc.post("/v1/trust/mode", {"mode": "off"})
    assert (status, trust["changed"]) == (200, [])  # nothing changed, and it says so
    status, trust = await clc.post("/v1/trust/lock", {"tasks": "all", "locked": True})
    assert (status, trust["locked"]) == (200, ["clc"])
    assert trust["changed"] == trust_change({"locked": []}, {"locked": ["clc"]})
    status, trust = await clc.post("/v1/trust/lock", {"tasks": ["clc"], "locked": False})
    assert (status, trust["locked"]) == (200, [])
    status, trust = await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"})
    assert status == 200 and trust["install_open"] is True
    assert 590 < trust["install_remaining"] <= 600
    assert trust["install_until"] == pytest.approx(time.time() + 600, abs=10)
    assert trust["changed"] == trust_change(
        {"install_until": None}, {"install_until": trust["install_until"]}
    )
    until = trust["install_until"]
    status, trust = await clc.post("/v1/trust/install-window", {"open": False})
    assert status == 200
    assert (trust["install_open"], trust["install_until"], trust["install_remaining"]) == (
        False,
        None,
        0.0,
    )
    assert trust["changed"] == trust_change({"install_until": until}, {"install_until": None})
    assert (await clc.get("/v1/trust"))[1]["mode"] == "off"
    codes = [e["code"] for e in (await clc.get("/v1/events", kind="trust"))[1]["events"]]
    assert codes == [
        "mode",
        "mode",
        "locked",
        "unlocked",
        "install-window-open",
        "install-window-closed",
    ]


async def test_a_cc_has_only_the_cc_task(tmp_path: Path) -> None:
    async with served(tmp_path, CC_SETTINGS) as cc:
        assert (await cc.post("/v1/trust/lock", {}))[1]["locked"] == ["cc"]
        status, answer = await cc.post("/v1/trust/lock", {"tasks": "clc"})
    assert (status, answer) == (
        400,
        {"error": "this registrar has no clc task", "code": "out-of-scope"},
    )


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/trust/mode", {}, "mode is required"),
        ("/v1/trust/mode", {"mode": "sideways"}, "mode 'sideways': expected local, any or off"),
        ("/v1/trust/mode", {"mode": 3}, "mode must be local, any or off, got the number 3"),
        ("/v1/trust/mode", {"mode": "any", "why": "x"}, "unknown field 'why'; it takes mode"),
        ("/v1/trust/mode", {"mode": "any\n"}, "mode 'any\\n': expected local, any or off"),
        ("/v1/trust/lock", {"tasks": 5}, "tasks must be clc, cc, all or a list of those"),
        ("/v1/trust/lock", {"tasks": ["clc", 3]}, "tasks must be clc, cc, all or a list"),
        ("/v1/trust/lock", {"tasks": {"clc": True}}, "tasks must be clc, cc, all or a list"),
        ("/v1/trust/lock", {"tasks": "nc"}, "tasks must be clc, cc, all or a list of those"),
        ("/v1/trust/lock", {"tasks": ["clc", "cc", "clc"]}, "tasks must be clc, cc, all or a"),
        ("/v1/trust/lock", {"bogus": 1}, "unknown field 'bogus'; it takes locked, tasks"),
        ("/v1/trust/lock", {"tasks": "cc"}, "this registrar has no cc task"),
        ("/v1/trust/lock", {"locked": "no"}, "locked must be true or false, got a string"),
        ("/v1/trust/install-window", {"open": "yes"}, "open must be true or false"),
        ("/v1/trust/install-window", {"open": True}, "for is required"),
        ("/v1/trust/install-window", {"open": True, "for": None}, "for: expected a duration"),
        ("/v1/trust/install-window", {"open": True, "for": 1e300}, "for: must be at most 3650d"),
        ("/v1/trust/install-window", {"open": True, "for": "soon"}, "for: expected a duration"),
        ("/v1/trust/install-window", {"open": True, "for": -5}, "for: must be"),
        ("/v1/trust/install-window", {"open": True, "for": "9" * 400 + "d"}, "for: must be"),
        ("/v1/trust/install-window", {"open": True, "for": "3651d"}, "at most 3650d"),
        ("/v1/tokens", {}, "role is required"),
        ("/v1/tokens", {"role": "clc"}, "role 'clc': expected walrus, cc, sc or nc"),
        ("/v1/tokens", {"role": "nc"}, "this registrar does not register nc components"),
        ("/v1/tokens", {"role": "king"}, "role 'king': expected walrus, cc, sc or nc"),
        ("/v1/tokens", {"role": ["nc"]}, "role must be walrus, cc, sc or nc, got a list"),
        ("/v1/tokens", {"role": "walrus", "cluster": "c1"}, "a walrus belongs to no cluster"),
        ("/v1/tokens", {"role": "cc", "cluster": 7}, "cluster: expected a cluster name"),
        ("/v1/tokens", {"role": "cc", "cluster": "a b"}, "cluster: 'a b' is not a cluster"),
        ("/v1/tokens", {"role": "cc", "uses": 2.0}, "uses must be an integer, got the number"),
        ("/v1/tokens", {"role": "cc", "ttl": "1h", "secret": "x"}, "unknown field 'secret'"),
        ("/v1/tokens", {"role": "cc", "uses": 10**30}, "uses must be between 1 and 1000000"),
        ("/v1/tokens", {"role": "cc", "uses": 0}, "uses must be between 1 and 1000000, got 0"),
        ("/v1/tokens", {"role": "cc", "uses": True}, "uses must be an integer, got a boolean"),
        ("/v1/tokens", {"role": "cc", "uses": 1.5}, "uses must be an integer, got the number"),
        ("/v1/tokens", {"role": "cc", "uses": "2"}, "uses must be an integer, got a string"),
        ("/v1/tokens", {"role": "cc", "ttl": 1e300}, "ttl: must be at most 3650d"),
        ("/v1/tokens", {"role": "cc", "ttl": 0}, "ttl: must be"),
        ("/v1/tokens", {"role": "cc", "ttl": True}, "ttl: expected a duration"),
        ("/v1/tokens/revoke", {}, "token_id is required"),
        ("/v1/tokens/revoke", {"token_id": 5}, "token_id: expected a token id"),
        ("/v1/tokens/revoke", {"token_id": "ZZZZZZZZZZZZ"}, "is not a token id (12 of a-z 0-9)"),
        ("/v1/tokens/revoke", {"token_id": "zzzzzzzzzzzz"}, "no unrevoked token zzzzzzzzzzzz"),
    ],
)
async def test_bad_trust_and_token_requests_are_400(
    clc: Harness, path: str, body: dict[str, Any], message: str
) -> None:
    before = (await clc.get("/v1/trust"))[1]
    status, answer = await clc.post(path, body)
    assert status == 400, answer
    assert message in answer["error"]
    assert (await clc.get("/v1/trust"))[1]["locked"] == before["locked"]
    assert (await clc.get("/v1/tokens"))[1] == {"tokens": []}


async def test_infinite_durations_in_raw_json_are_400(clc: Harness) -> None:
    for raw in (b'{"role": "cc", "ttl": 1e400}', b'{"open": true, "for": 1e999}'):
        path = "/v1/tokens" if b"role" in raw else "/v1/trust/install-window"
        status, answer = await clc.raw_post(path, raw)
        key = "ttl" if b"ttl" in raw else "for"
        assert status == 400
        assert answer["error"].startswith(f"{key}: must be")
        assert answer["error"].endswith("got inf")


async def test_a_registrar_without_its_cloud_ca_issues_no_tokens(tmp_path: Path) -> None:
    async with served(tmp_path, CC_SETTINGS, ca_known=False) as cc:
        status, answer = await cc.post("/v1/tokens", {"role": "nc"})
    assert (status, answer) == (
        400,
        {
            "error": "this registrar has no cloud CA yet (is its CC registered?)",
            "code": "no-cloud-ca",
        },
    )


def with_token(a: Announcement, token: str) -> Announcement:
    parsed = parse_token(token)
    stamp = int(time.time())
    proof = make_proof(parsed.secret, announcement_proof_message(a, stamp))
    return replace(a, token_id=parsed.token_id, token_stamp=stamp, token_proof=proof)


async def create(h: Harness, **body: Any) -> str:
    status, answer = await h.post("/v1/tokens", body)
    assert status == 200, answer
    token: str = answer["token"]
    # It names the token it created, with everything stored about it (never its secret).
    [change] = answer["changed"]
    token_id = parse_token(token).token_id
    assert (change["object"], change["id"], change["action"]) == ("token", token_id, "created")
    assert change["before"] is None and change["after"]["state"] in ("valid", "expired")
    assert token.split(".")[2] not in str(change)
    return token


async def test_tokens_are_listed_with_their_states_and_never_their_secrets(
    clc: Harness,
) -> None:
    valid = await create(clc, role="cc", cluster="cluster1", ttl="2h")
    revoked = await create(clc, role="sc")
    expired = await create(clc, role="walrus", ttl="1ms")
    used = await create(clc, role="cc", uses=1)
    assert parse_token(valid).ca_fingerprint == clc.cloud.fingerprint
    revoked_id = parse_token(revoked).token_id
    status, answer = await clc.post("/v1/tokens/revoke", {"token_id": revoked_id})
    assert (status, answer["revoked"]) == (200, revoked_id)
    [change] = answer["changed"]
    assert (change["object"], change["id"], change["action"]) == ("token", revoked_id, "updated")
    assert change["before"] == {"revoked_at": None, "state": "valid"}
    assert change["after"]["state"] == "revoked" and change["after"]["revoked_at"] > 0
    # A CC announcing with the one-use token is admitted and, once registered, uses it up.
    cc = with_token(ann(Role.CC, "cluster2"), used)
    clc.announce(cc)
    await clc.record_status(cc.component_id, "awaiting-key")
    fields = {"component_id": cc.component_id}
    assert (await clc.signed("/v1/credentials", key_of(cc), fields, "?wait=10"))[0] == 200
    await eventually(lambda: time.time() > parse_expiry(clc, expired), "the 1ms token to expire")
    status, answer = await clc.get("/v1/tokens")
    assert status == 200
    rows = {row["token_id"]: row for row in answer["tokens"]}
    states = {t: rows[parse_token(t).token_id]["state"] for t in (valid, revoked, expired, used)}
    assert states == {valid: "valid", revoked: "revoked", expired: "expired", used: "used-up"}
    row = rows[parse_token(used).token_id]
    assert (row["role"], row["uses"], row["used_by"], row["spent_by"]) == (
        "cc",
        1,
        [cc.component_id],
        [],
    )
    assert rows[parse_token(valid).token_id]["cluster"] == "cluster1"
    assert set(row) == {
        "token_id",
        "role",
        "cluster",
        "created_at",
        "expires_at",
        "revoked_at",
        "uses",
        "ca_fingerprint",
        "used_by",
        "spent_by",
        "state",
    }
    listing = str(answer)
    assert not any(t.split(".")[2] in listing for t in (valid, revoked, expired, used))
    # Revoking twice is refused; the registrations a token made stay.
    status, answer = await clc.post("/v1/tokens/revoke", {"token_id": revoked_id})
    assert (status, answer) == (
        400,
        {"error": f"no unrevoked token {revoked_id}", "code": "unknown-token"},
    )


def parse_expiry(h: Harness, token: str) -> float:
    token_id = parse_token(token).token_id
    return next(t.expires_at for t in h.registrar.tokens() if t.token_id == token_id)
