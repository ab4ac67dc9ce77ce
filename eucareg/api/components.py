"""Endpoints a component calls, each request signed by its own key: collecting its credentials
(POST /v1/credentials, a long-poll that also watches for revocation) and announcing itself over
HTTP when mDNS cannot reach its registrar (POST /v1/announce, `fallback_registrar`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from aiohttp import web

from eucareg.api import limits
from eucareg.api.bodies import read_signed_body
from eucareg.api.context import REGISTRAR
from eucareg.api.validate import ApiError, bad, error
from eucareg.core.grammar import peer_address, shown
from eucareg.core.model import Announcement, DecisionKind, Record, Status
from eucareg.core.txt import Rejected, decode
from eucareg.pki import keypairs, names, tls
from eucareg.registrar.engine import CredentialRefused, Registrar

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_WAIT = 30.0  # longest long-poll a component may ask for
# ... and a registered component watching its own certificate (`have`, signed by its key): its
# one periodic request while idle, so a few minutes (docs/credentials.md).
MAX_WATCH = 300.0
# How often a held long-poll looks whether its client is still there: soon after it came, then
# less often (a thousand NCs watching, each checked 4 times a second, were 4,000 wake-ups a
# second on the CC's loop; aiohttp here offers no event for a client that went away).
HANGUP_CHECK = 0.25
HANGUP_CHECK_MAX = 2.0
# ?wait=SECONDS in ASCII digits (float() also takes Arabic-Indic digits, ' 1', '1_0', 'inf').
WAIT = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?", re.ASCII)
# The codes of the refusals the credential desk and the fallback give (docs/cli.md).
REFUSAL_CODES = {403: "wrong-key", 409: "conflict", 410: "revoked", 503: "unavailable"}


async def collect(request: web.Request) -> web.Response:
    """POST /v1/credentials?wait=SECONDS: 200 with the files, 202 while not registered, 403
    for another key, 410 when `have` names revoked credentials."""
    asked = _wait(request.query.get("wait", "0"))
    payload, public_key = await read_signed_body(request)
    component_id: str = payload["component_id"]
    have: str | None = payload.get("have")
    # The digest of the Eucalyptus key set it holds ("" for none): it asks for those files.
    euca: str | None = payload.get("euca")
    # The digest of the chain above its certificate that it holds (pki/chain.py).
    chain: str | None = payload.get("chain")
    registrar = request.app[REGISTRAR]
    record = registrar.record(component_id)
    watching = (
        have is not None
        and record is not None
        and record.status is Status.REGISTERED
        and record.fingerprint == keypairs.fingerprint(public_key)
    )
    wait = limits.hold_for(request, min(asked, MAX_WATCH if watching else MAX_WAIT))
    try:
        answer = await _unless_gone(
            request, registrar.credentials(component_id, public_key, wait, have, euca, chain)
        )
    except CredentialRefused as exc:
        if exc.status != 410:
            log.warning("credential request for %s refused: %s", component_id, exc)
        return _refused(exc)
    if answer.files is None:
        status = answer.status.value if answer.status else "unknown"
        return web.json_response({"status": status, "reason": answer.reason}, status=202)
    await registrar.mark_collected(component_id)
    body: dict[str, Any] = {"status": "registered", "files": answer.files}
    if answer.eucalyptus is not None:
        body["eucalyptus"] = answer.eucalyptus.answer()
    return web.json_response(body)


def _wait(raw: str) -> float:
    if not WAIT.fullmatch(raw):
        bad(f"wait must be a number of seconds, got {shown(raw)}", "invalid-query")
    return min(MAX_WATCH, float(raw))


def _refused(exc: CredentialRefused) -> web.Response:
    return error(exc.status, str(exc), REFUSAL_CODES.get(exc.status))


async def _unless_gone(request: web.Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` while the client is connected. An open long-poll counts as "online", so a
    component that hung up (its agent stopped) must stop counting at once, not when its
    wait runs out; aiohttp does not cancel a handler whose client went away."""
    task = asyncio.ensure_future(work)
    check = HANGUP_CHECK
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=check)
            check = min(HANGUP_CHECK_MAX, check * 2)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ApiError(499, "the client hung up", "client-closed")
    finally:
        task.cancel()


def _certified(request: web.Request, ann: Announcement) -> bool:
    transport = request.transport
    peer = tls.peer_identity(transport.get_extra_info("ssl_object") if transport else None)
    return (
        peer is not None
        and peer.fingerprint == ann.fingerprint
        and peer.named == names.CertIdentity(ann.role, ann.cluster, ann.component_id)
    )


async def announce(request: web.Request) -> web.Response:
    """POST /v1/announce?wait=SECONDS: a TXT record sent over HTTP, decided like an mDNS
    announcement; with `wait`, answered when the outcome is known (or the wait is over)."""
    asked = min(_wait(request.query.get("wait", "0")), MAX_WAIT)
    payload, public_key = await read_signed_body(request)
    wait = limits.hold_for(request, asked)  # charged (or found authenticated) by now
    raw: dict[str, str] = payload["txt"]  # every value a string (bodies.TXT)
    registrar = request.app[REGISTRAR]
    refresh = registrar.timing.report_interval
    decoded = decode(f"fallback:{request.remote}", raw, (), registrar.settings.allowed_ranges)
    if isinstance(decoded, Rejected):
        bad(f"{decoded.code}: {decoded.reason}", decoded.code)
    if decoded.fingerprint != keypairs.fingerprint(public_key):
        raise ApiError(403, "the request is not signed by the announced key", "wrong-key")
    # Proven by the certificate we issued it (its TLS client certificate names this very
    # component and key): authenticated, so not bound to mode any (docs/security.md).
    certified = _certified(request, decoded)
    record = registrar.record(decoded.component_id)
    # A registered component reporting its registered address needs no proof of it: its
    # certificate is the proof, and behind NAT the request comes from another address.
    known = certified and record is not None and record.address == str(decoded.address)
    if decoded.token_id is None and not known and decoded.address != peer_address(request.remote):
        # Without a token (whose proof binds addr=), nothing vouches for an address the
        # request does not come from: it could name any machine on the LAN.
        raise ApiError(
            403,
            f"addr={decoded.address} is not the address this request comes from "
            f"({request.remote}); announce your own address, or use a join token",
            "address-mismatch",
        )
    source = "certified" if certified else "fallback"
    try:
        decision, record = await registrar.fallback(replace(decoded, source=source))
    except CredentialRefused as exc:
        return _refused(exc)
    if record is not None:
        if wait > 0 and record.status in UNDECIDED:
            record = await _unless_gone(request, _outcome(registrar, record, wait))
        return web.json_response(_answer(record, refresh))
    if decision.kind is DecisionKind.IGNORE:
        return web.json_response({"status": "ignored", "reason": "not for this registrar"})
    if decision.kind is DecisionKind.PENDING:
        # Not stored (an unauthenticated caller leaves nothing), but not refused either: it
        # is told what it waits on, and asks again.
        answer = {"status": "pending", "reason": decision.reason, "refresh": refresh}
        if decision.waiting_for:
            answer["waiting_for"] = decision.waiting_for
        return web.json_response(answer)
    # Refused outright, and nothing kept (docs/security.md, "The fallback in its place").
    return web.json_response(
        {"status": "refused", "code": decision.code, "reason": decision.reason}, status=403
    )


# A caller waiting on /v1/announce is answered when its record changes, or after its wait.
UNDECIDED = frozenset({Status.PENDING, Status.AWAITING_KEY, Status.REGISTERING, Status.FAILED})


async def _outcome(registrar: Registrar, record: Record, wait: float) -> Record:
    """The record once it changes, or as it is after `wait`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with registrar.waiting_on(record.component_id):
        while True:
            # The event first, then the record: a change between the two cannot be missed.
            event = registrar.change_event(record.component_id)
            current = registrar.record(record.component_id)
            left = deadline - loop.time()
            if current is None or current.status not in UNDECIDED or current != record:
                return current or record
            if left <= 0:
                return current
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)


def _answer(record: Record, refresh: float) -> dict[str, Any]:
    """What a component hears back: where it stands, why, what it waits on, and how often
    to announce itself again to stay heard (docs/registration.md)."""
    answer: dict[str, Any] = {
        "status": record.status.value,
        "reason": record.reason,
        "refresh": refresh,
    }
    if record.waiting_for:
        answer["waiting_for"] = record.waiting_for
    return answer
