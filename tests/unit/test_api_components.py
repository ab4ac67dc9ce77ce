"""The component endpoints over HTTP against a real registrar: credential collection (202, 200
with the key layout, 403 for another key, 410 once revoked, also while long-polling) and HTTP
fallback announcements (only in mode any, only signed by the announced key).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eucareg.agent import collect as agent_collect
from eucareg.agent.locate import Endpoint
from eucareg.api import components
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred
from tests.factories import ann, sighting
from tests.unit.test_api_harness import (
    CC_SETTINGS,
    CLC_SETTINGS,
    CLOUD_CLC_ID,
    Harness,
    eventually,
    key_of,
    served,
)


@pytest.fixture
async def clc(tmp_path: Path) -> AsyncIterator[Harness]:
    async with served(tmp_path, CLC_SETTINGS) as harness:
        yield harness


def txt_of(a: Announcement) -> dict[str, str]:
    return dict(sighting(a).txt)


async def collect(
    h: Harness, a: Announcement, key: keypairs.PrivateKey | None = None, **fields: Any
) -> tuple[int, Any]:
    wait = fields.pop("wait", 0)
    return await h.signed(
        "/v1/credentials",
        key or key_of(a),
        {"component_id": a.component_id, **fields},
        query=f"?wait={wait}",
    )


async def registered_walrus(h: Harness) -> tuple[Announcement, dict[str, str]]:
    """A walrus registered through an install window; returns it and its credential files."""
    assert (await h.post("/v1/trust/install-window", {"open": True, "for": "10m"}))[0] == 200
    walrus = ann(Role.WALRUS)
    h.announce(walrus)
    await h.record_status(walrus.component_id, "awaiting-key")
    # The first signed request proves the key; the long-poll returns once it is registered.
    status, answer = await collect(h, walrus, wait=10)
    assert status == 200, answer
    return walrus, answer["files"]


async def test_an_unknown_component_is_told_to_wait(clc: Harness) -> None:
    status, answer = await collect(clc, ann(Role.WALRUS))
    assert status == 202
    assert answer == {"status": "unknown", "reason": "not known to this registrar (yet)"}


async def test_a_pending_component_gets_202_with_its_status(clc: Harness) -> None:
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "pending")
    status, answer = await collect(clc, walrus)
    assert status == 202
    assert answer["status"] == "pending"
    assert "waiting for the operator to approve" in answer["reason"]


async def test_a_registered_component_collects_its_key_layout(clc: Harness) -> None:
    walrus, files = await registered_walrus(clc)
    assert set(files) == {cred.CLOUD_CERT, cred.LAYOUTS[Role.WALRUS].cert}
    # The agent's own check: the certificate certifies our key and chains to the CA.
    cred.verify_bundle(files, Role.WALRUS, key_of(walrus))
    ca = certificates.load_cert_pem(files[cred.CLOUD_CERT])
    assert certificates.cert_fingerprint(ca) == clc.cloud.fingerprint
    record = clc.registrar.record(walrus.component_id)
    assert record is not None and record.credentials_collected_at is not None


async def test_another_key_for_a_registered_id_is_403(clc: Harness) -> None:
    walrus, _files = await registered_walrus(clc)
    status, answer = await collect(clc, walrus, key=keypairs.generate_key())
    assert status == 403
    assert answer == {
        "error": f"{walrus.component_id} is registered with another key",
        "code": "wrong-key",
    }


async def test_revoked_credentials_are_410_also_for_a_waiting_long_poll(clc: Harness) -> None:
    walrus, files = await registered_walrus(clc)
    cert = certificates.load_cert_pem(files[cred.LAYOUTS[Role.WALRUS].cert])
    serial = format(cert.serial_number, "x")
    # The agent's watch: a long-poll with the serial it holds; it must be woken, not time out.
    watch = asyncio.create_task(collect(clc, walrus, have=serial, wait=20))
    # Give the watch time to be waiting inside the registrar. Either order ends in 410; the
    # wait_for below fails only if a waiting watch is not woken (it would last 20 s).
    await asyncio.sleep(0.1)
    status, answer = await clc.post("/v1/deregister", {"component_id": walrus.component_id})
    assert (status, answer["deregistered"]) == (200, walrus.component_id)
    # What it changed: the record is gone, and the certificate the watch names is revoked.
    assert [(c["object"], c["id"], c["action"]) for c in answer["changed"]] == [
        ("component", walrus.component_id, "deleted"),
        ("certificate", serial, "updated"),
    ]
    assert answer["changed"][1]["after"] == {"revoked": True}
    status, answer = await asyncio.wait_for(watch, 10)
    assert (status, answer) == (
        410,
        {"error": "these credentials were revoked (deregistered)", "code": "revoked"},
    )
    assert (await collect(clc, walrus, have=serial))[0] == 410


@pytest.mark.parametrize(
    ("fields", "query", "message"),
    [
        ({"component_id": ["x"]}, "", "component_id: expected a component id (8-64 of"),
        ({"component_id": ""}, "", "component_id: '' is not a component id"),
        ({"component_id": "walrus-1\n"}, "", "component_id: 'walrus-1\\n' is not a component"),
        ({"have": 12}, "", "have must be a string, got the number 12"),
        ({"have": "not-hex"}, "", "have: 'not-hex' does not match"),
        ({"bogus": 1}, "", "unknown field 'bogus'"),
        ({}, "?wait=soon", "wait must be a number of seconds"),
        ({}, "?wait=nan", "wait must be a number of seconds"),
        ({}, "?wait=inf", "wait must be a number of seconds"),
        ({}, "?wait=%D9%A1", "wait must be a number of seconds"),  # an Arabic-Indic 1
        ({}, "?wait=1_0", "wait must be a number of seconds"),
    ],
)
async def test_malformed_credential_requests_are_400(
    clc: Harness, fields: dict[str, Any], query: str, message: str
) -> None:
    key = keypairs.generate_key()
    body = {"component_id": "walrus-000000000001", **fields}
    status, answer = await clc.signed("/v1/credentials", key, body, query=query)
    assert status == 400
    assert message in answer["error"]


# -- HTTP fallback announcements ---------------------------------------------------------------


async def fallback(
    h: Harness, a: Announcement, key: keypairs.PrivateKey | None = None, query: str = ""
) -> Any:
    return await h.signed("/v1/announce", key or key_of(a), {"txt": txt_of(a)}, query=query)


@pytest.fixture
async def lan_clc(tmp_path: Path) -> AsyncIterator[tuple[Harness, dict[str, str]]]:
    """A CLC whose /v1/announce requests come from `peer["remote"]` (a LAN host), while the
    operator's calls still come from loopback."""
    peer = {"remote": "10.77.0.2"}
    async with served(tmp_path, CLC_SETTINGS, middlewares=(from_lan(peer),)) as harness:
        yield harness, peer


def from_lan(peer: dict[str, str]) -> Any:
    """A middleware: /v1/announce requests come from `peer["remote"]` (a LAN host)."""

    @web.middleware
    async def from_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/v1/announce":
            request = request.clone(remote=peer["remote"])
        response: web.StreamResponse = await handler(request)
        return response

    return from_peer


async def test_http_announcements_need_mode_any_or_a_token_and_leave_nothing_when_refused(
    lan_clc: tuple[Harness, dict[str, str]],
) -> None:
    clc, peer = lan_clc
    assert (await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"}))[0] == 200
    walrus = ann(Role.WALRUS)
    peer["remote"] = str(walrus.address)
    status, answer = await fallback(clc, walrus)
    assert (status, answer["status"], answer["code"]) == (403, "refused", "fallback-not-allowed")
    assert "needs mode any" in answer["reason"]
    assert clc.registrar.record(walrus.component_id) is None  # nothing stored
    assert (await clc.post("/v1/trust/mode", {"mode": "any"}))[0] == 200
    status, answer = await fallback(clc, walrus)
    # Signed by its own key: possession is proven, so it goes straight to its hook.
    assert status == 200
    assert answer["status"] in ("registering", "registered"), answer
    await clc.record_status(walrus.component_id, "registered")
    assert (await clc.post("/v1/trust/mode", {"mode": "off"}))[0] == 200
    other = ann(Role.WALRUS)
    peer["remote"] = str(other.address)
    status, answer = await fallback(clc, other)
    assert (status, answer["code"]) == (403, "registration-off")


async def test_without_a_token_the_stated_address_must_be_the_callers(
    lan_clc: tuple[Harness, dict[str, str]],
) -> None:
    clc, peer = lan_clc
    assert (await clc.post("/v1/trust/mode", {"mode": "any"}))[0] == 200
    walrus = ann(Role.WALRUS)
    for remote in ("10.77.99.99", f"::ffff:{walrus.address}x", None):
        peer["remote"] = remote or ""
        status, answer = await fallback(clc, walrus)
        assert status == 403, answer
        assert "is not the address this request comes from" in answer["error"]
    assert clc.registrar.record(walrus.component_id) is None
    peer["remote"] = f"::ffff:{walrus.address}"  # a dual-stack socket's view of an IPv4 peer
    status, answer = await fallback(clc, walrus)
    assert status == 200, answer


async def test_a_fallback_announcement_must_be_signed_by_the_announced_key(
    clc: Harness,
) -> None:
    status, answer = await fallback(clc, ann(Role.WALRUS), key=keypairs.generate_key())
    assert (status, answer) == (
        403,
        {"error": "the request is not signed by the announced key", "code": "wrong-key"},
    )


async def test_a_fallback_announcement_for_another_registrar_is_ignored(tmp_path: Path) -> None:
    walrus = ann(Role.WALRUS)

    @web.middleware
    async def from_walrus(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request.clone(remote=str(walrus.address)))
        return response

    async with served(tmp_path, CC_SETTINGS, middlewares=(from_walrus,)) as cc:
        status, answer = await fallback(cc, walrus)
    assert (status, answer) == (200, {"status": "ignored", "reason": "not for this registrar"})


@pytest.mark.parametrize(
    ("txt", "message"),
    [
        (None, "txt must be a JSON object, got null"),
        (["type=walrus"], "txt must be a JSON object, got a list"),
        ({"type": 5}, "txt.type must be a string, got the number 5"),
        ({"type": "walrus", "id": "walrus_1"}, "txt.id: 'walrus_1' is not a component id"),
        ({f"k{n}": "v" for n in range(33)}, "txt may have at most 32 fields"),
        ({"type": "x" * 256}, "txt.type must be 0-255 characters long, got 256"),
        ({"type": "walrus"}, "bad-txt"),
    ],
)
async def test_malformed_fallback_announcements_are_400(
    clc: Harness, txt: Any, message: str
) -> None:
    status, answer = await clc.signed("/v1/announce", keypairs.generate_key(), {"txt": txt})
    assert status == 400
    assert message in answer["error"]


async def test_a_bad_address_in_a_fallback_announcement_is_400(clc: Harness) -> None:
    walrus = ann(Role.WALRUS)
    txt = {**txt_of(walrus), "addr": "127.0.0.1"}
    status, answer = await clc.signed("/v1/announce", key_of(walrus), {"txt": txt})
    assert status == 400
    assert "loopback" in answer["error"]
    assert clc.registrar.record(walrus.component_id) is None


async def test_peer_registry_answers_only_the_cloud_ca_key(clc: Harness, tmp_path: Path) -> None:
    status, answer = await clc.signed("/v1/peer/registry", clc.cloud.key, {})
    assert status == 200
    assert set(answer) == {"registrar", "local", "components"}
    status, answer = await clc.signed("/v1/peer/registry", keypairs.generate_key(), {})
    assert (status, answer) == (
        403,
        {"error": "only the cloud controller may read this registry", "code": "not-cloud-ca"},
    )
    async with served(tmp_path / "cc", CC_SETTINGS, ca_known=False) as cc:
        # A CC without its cloud CA (not registered yet) answers nobody.
        assert (await cc.signed("/v1/peer/registry", cc.cloud.key, {}))[0] == 403


async def test_a_long_poll_whose_client_hung_up_ends_at_once(clc: Harness) -> None:
    """An open long-poll counts as online; a component whose agent stopped must not be shown
    online for the rest of its 25 s wait."""
    # As the agent serves the API (web.AppRunner's default): aiohttp does not cancel the
    # handler of a client that went away. The test server would, and so hide the problem.
    runner_server = clc.client.server.runner.server
    assert runner_server is not None
    runner_server.handler_cancellation = False
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)  # no window: it waits for approval, and its request is held
    await clc.record_status(walrus.component_id, "pending")
    await clc.registrar.idle()  # the pending decision's own wake-up has gone out
    poll = asyncio.create_task(collect(clc, walrus, wait=25))
    await eventually(lambda: walrus.component_id in clc.registrar.polling, "the held long-poll")
    poll.cancel()  # the client closes its connection
    with pytest.raises(asyncio.CancelledError):
        await poll
    await eventually(
        lambda: walrus.component_id not in clc.registrar.polling, "the poll to end", timeout=5
    )
    status, _ = await collect(clc, walrus)  # and the desk still answers
    assert status == 202
    assert walrus.component_id not in clc.registrar._changed  # no waiter left behind


async def test_a_request_signed_with_another_key_leaves_nothing_behind(clc: Harness) -> None:
    """Anyone can sign a request naming any id. With a key that is not the component's it
    must not count as the component being heard (it would keep a silent machine "online"
    and stop its replacement), nor leave per-id state once it ends."""
    walrus = ann(Role.WALRUS)
    clc.announce(walrus)
    await clc.record_status(walrus.component_id, "pending")
    seen_before = clc.registrar.presence.last_seen.get(walrus.component_id)
    intruder = keypairs.generate_key()
    status, answer = await collect(clc, walrus, key=intruder, wait=1)
    assert status == 403, answer
    assert clc.registrar.presence.last_seen.get(walrus.component_id) == seen_before
    assert walrus.component_id not in clc.registrar.polling
    for _ in range(50):  # unknown ids, one key: nothing per id stays
        stranger = ann(Role.WALRUS)
        status, _ = await collect(clc, stranger, key=intruder)
        assert status == 202
    assert not clc.registrar._changed and not clc.registrar.polling
    assert len(clc.registrar.presence.last_seen) <= 1


async def test_a_certified_component_may_announce_over_https_in_mode_local(
    tmp_path: Path,
) -> None:
    """A component presenting, as its TLS client certificate, the certificate this cloud
    issued it is authenticated: its HTTP announcement is decided in mode local too. The same
    request without the certificate, or with one naming another component, is not."""
    peer = {"remote": "10.77.0.2"}
    served_ = served(
        tmp_path / "clc", CLC_SETTINGS, middlewares=(from_lan(peer),), tls_dir=tmp_path / "tls"
    )
    async with served_ as clc, aiohttp.ClientSession() as session:
        clc.local.append({"role": "clc", "component_id": CLOUD_CLC_ID})
        walrus = ann(Role.WALRUS)
        peer["remote"] = str(walrus.address)
        endpoint = Endpoint("127.0.0.1", clc.client.port or 0, CLOUD_CLC_ID)
        expect = tls.Expect(Role.CLC, component_id=CLOUD_CLC_ID, root=clc.cloud.issuer.cert)

        async def announce(client: tls.ClientCert | None) -> tuple[int, dict[str, Any]]:
            fields = {"txt": txt_of(walrus)}
            return await agent_collect._signed_post(
                session, endpoint, "/v1/announce", key_of(walrus), fields, expect, client
            )

        status, answer = await announce(None)
        assert (status, answer["code"]) == (403, "fallback-not-allowed")
        stranger = ann(Role.WALRUS)
        status, answer = await announce(certificate(tmp_path / "s", clc, stranger))
        assert (status, answer["code"]) == (403, "fallback-not-allowed")
        status, answer = await announce(certificate(tmp_path / "w", clc, walrus))
        assert status == 200, answer
        assert answer["status"] != "refused"
        assert clc.registrar.record(walrus.component_id) is not None


def certificate(where: Path, clc: Harness, a: Announcement) -> tls.ClientCert:
    """The certificate this cloud would have issued `a`, as client certificate files."""
    cert = certificates.issue_certificate(
        issuer_key=clc.cloud.key,
        issuer_cert=clc.cloud.issuer.cert,
        subject_key=key_of(a).public_key(),
        role=a.role,
        component_id=a.component_id,
        cluster=a.cluster,
    )
    where.mkdir(parents=True)
    tls.write_chain(where / "chain.pem", [cert])
    cred.write_atomic(where / "key.pem", keypairs.key_pem(key_of(a)))
    return tls.ClientCert(where / "chain.pem", where / "key.pem", format(cert.serial_number, "x"))


async def test_a_registered_components_watch_is_held_longer_than_any_other_long_poll(
    clc: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle agent's one periodic request: its watch (`have`, signed by its registered
    key) may be held MAX_WATCH; every other long-poll at most MAX_WAIT, also when it asks
    for more, and also a `have` signed by another key."""
    monkeypatch.setattr(components, "MAX_WAIT", 0.2)
    monkeypatch.setattr(components, "MAX_WATCH", 30.0)
    walrus, files = await registered_walrus(clc)
    serial = format(
        certificates.load_cert_pem(files[cred.LAYOUTS[Role.WALRUS].cert]).serial_number, "x"
    )
    watch = asyncio.create_task(collect(clc, walrus, have=serial, wait=20))
    stranger = ann(Role.WALRUS)
    assert (await collect(clc, stranger, wait=20))[0] == 202  # held 0.2 s, not 20
    assert (await collect(clc, walrus, key=keypairs.generate_key(), have=serial, wait=20))[0] == 403
    assert not watch.done()  # still held after both came back
    # A revocation ends the watch at once, as ever.
    assert (await clc.post("/v1/deregister", {"component_id": walrus.component_id}))[0] == 200
    assert (await asyncio.wait_for(watch, 10))[0] == 410


async def test_an_sc_over_http_hears_what_it_waits_on_and_may_wait_for_the_outcome(
    lan_clc: tuple[Harness, dict[str, str]],
) -> None:
    """The design's alternative: an SC before its CC is stored as pending, told on what, and
    may hold its request until that changes; the CC's report over HTTP is what changes it."""
    clc, peer = lan_clc
    assert (await clc.post("/v1/trust/mode", {"mode": "any"}))[0] == 200
    assert (await clc.post("/v1/trust/install-window", {"open": True, "for": "10m"}))[0] == 200
    sc = ann(Role.SC, "c1")
    peer["remote"] = str(sc.address)
    status, answer = await fallback(clc, sc)
    assert status == 200, answer
    assert answer["status"] == "pending"
    assert answer["waiting_for"] == "cluster c1"
    assert answer["refresh"] == clc.registrar.timing.report_interval
    loop = asyncio.get_running_loop()
    began = loop.time()
    waiting = asyncio.ensure_future(fallback(clc, sc, query="?wait=20"))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # held: nothing it waits on has moved
    cc = ann(Role.CC, "c1", api_port=8780)
    peer["remote"] = str(cc.address)
    assert (await fallback(clc, cc))[0] == 200
    await clc.record_status(cc.component_id, "registered")
    report = replace(cc, state=AnnouncedState.REGISTERED)
    assert (await fallback(clc, report))[0] == 200
    status, answer = await waiting
    assert status == 200, answer
    assert answer["status"] in ("registering", "registered"), answer
    assert loop.time() - began < 15  # answered by the change, not by the end of its wait
    # The wait has the grammar of the credential request's: plain digits, or 400.
    status, answer = await fallback(clc, sc, query="?wait=1e9")
    assert status == 400 and answer["code"] == "invalid-query", answer
