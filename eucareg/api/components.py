"""Endpoints a component calls, each request signed by its own key: collecting its credentials
(POST /v1/credentials, a long-poll that also watches for revocation) and announcing itself over
HTTP when mDNS cannot reach its registrar (POST /v1/announce, `fallback_registrar`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from aiohttp import web

from eucareg.api.auth import read_signed
from eucareg.api.context import REGISTRAR
from eucareg.api.validate import ApiError, as_object, bad, error
from eucareg.core.grammar import peer_address
from eucareg.core.model import DecisionKind
from eucareg.core.txt import Rejected, decode
from eucareg.pki import credentials as cred
from eucareg.registrar.engine import CredentialRefused

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_WAIT = 30.0  # longest long-poll a component may ask for
HANGUP_CHECK = 0.25  # how often a held long-poll looks whether its client is still there


async def collect(request: web.Request) -> web.Response:
    """POST /v1/credentials?wait=SECONDS: 200 with the files, 202 while not registered, 403
    for another key, 410 when `have` names revoked credentials."""
    wait = _wait(request.query.get("wait", "0"))
    payload, public_key = await read_signed(request)
    component_id = payload.get("component_id")
    if not isinstance(component_id, str) or not component_id:
        bad("malformed credential request: component_id must be a non-empty string")
    have = payload.get("have")
    if have is not None and not isinstance(have, str):
        bad("malformed credential request: have must be a certificate serial (a string)")
    registrar = request.app[REGISTRAR]
    try:
        answer = await _unless_gone(
            request, registrar.credentials(component_id, public_key, wait, have or None)
        )
    except CredentialRefused as exc:
        if exc.status != 410:
            log.warning("credential request for %s refused: %s", component_id, exc)
        return error(exc.status, str(exc))
    if answer.files is None:
        status = answer.status.value if answer.status else "unknown"
        return web.json_response({"status": status, "reason": answer.reason}, status=202)
    await registrar.mark_collected(component_id)
    return web.json_response({"status": "registered", "files": answer.files})


def _wait(raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        bad(f"malformed credential request: wait must be a number of seconds, got {raw[:20]!r}")
    if math.isnan(seconds):
        bad("malformed credential request: wait must be a number of seconds, got nan")
    return min(MAX_WAIT, max(0.0, seconds))


async def _unless_gone(request: web.Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` while the client is connected. An open long-poll counts as "online", so a
    component that hung up (its agent stopped) must stop counting at once, not when its
    wait runs out; aiohttp does not cancel a handler whose client went away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HANGUP_CHECK)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ApiError(499, "the client hung up")
    finally:
        task.cancel()


async def announce(request: web.Request) -> web.Response:
    """POST /v1/announce: a TXT record sent over HTTP, decided like an mDNS announcement."""
    payload, public_key = await read_signed(request)
    raw = as_object(payload.get("txt"), "malformed announcement: txt")
    if not all(isinstance(v, str) for v in raw.values()):
        bad("malformed announcement: every txt value must be a string")
    registrar = request.app[REGISTRAR]
    decoded = decode(f"fallback:{request.remote}", raw, (), registrar.settings.allowed_ranges)
    if isinstance(decoded, Rejected):
        bad(f"{decoded.code}: {decoded.reason}")
    if decoded.fingerprint != cred.fingerprint(public_key):
        raise ApiError(403, "the request is not signed by the announced key")
    if decoded.token_id is None and decoded.address != peer_address(request.remote):
        # Without a token (whose proof binds addr=), nothing vouches for an address the
        # request does not come from: it could name any machine on the LAN.
        raise ApiError(
            403,
            f"addr={decoded.address} is not the address this request comes from "
            f"({request.remote}); announce your own address, or use a join token",
        )
    try:
        decision, record = await registrar.fallback(replace(decoded, source="fallback"))
    except CredentialRefused as exc:
        return error(exc.status, str(exc))
    if record is not None:
        return web.json_response({"status": record.status.value, "reason": record.reason})
    if decision.kind is DecisionKind.IGNORE:
        return web.json_response({"status": "ignored", "reason": "not for this registrar"})
    # Refused outright, and nothing kept (docs/security.md, "The fallback in its place").
    return web.json_response(
        {"status": "refused", "code": decision.code, "reason": decision.reason}, status=403
    )
