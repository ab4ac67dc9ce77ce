"""Operator endpoints about trust: the mode, locks and install window (each answers the
resulting settings and what changed), and join tokens (create, list without secrets, revoke).
Wrapped by `operator_only` in app.py; bodies are checked against eucareg/api/bodies.py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from eucareg.api.answers import changed
from eucareg.api.bodies import read_body
from eucareg.api.context import CONTEXT, REGISTRAR
from eucareg.api.validate import bad, duration
from eucareg.api.views import trust_json
from eucareg.core.model import Role
from eucareg.core.trust import Mode, Task, Token, parse_token
from eucareg.registrar.engine import Registrar


async def show(request: web.Request) -> web.Response:
    """GET /v1/trust"""
    return web.json_response(trust_json(request.app[REGISTRAR]))


def _settings(registrar: Registrar) -> dict[str, Any]:
    """The stored trust settings (the rest of the trust object follows from them)."""
    trust = trust_json(registrar)
    return {k: trust[k] for k in ("mode", "locked", "install_until")}


async def _changing(registrar: Registrar, change: Awaitable[object]) -> web.Response:
    """Make a trust change; answer the settings and what changed in them."""
    before = _settings(registrar)
    await change
    answer = trust_json(registrar)
    answer["changed"] = changed("trust", "trust", before, _settings(registrar))
    return web.json_response(answer)


async def set_mode(request: web.Request) -> web.Response:
    """POST /v1/trust/mode {"mode": "local" | "any" | "off"}"""
    registrar = request.app[REGISTRAR]
    mode = Mode((await read_body(request))["mode"])
    return await _changing(registrar, registrar.set_mode(mode))


async def set_lock(request: web.Request) -> web.Response:
    """POST /v1/trust/lock {"tasks": "clc" | "cc" | "all" | [...], "locked": bool}"""
    registrar = request.app[REGISTRAR]
    data = await read_body(request)
    tasks = tasks_of(registrar, data.get("tasks"))
    return await _changing(registrar, registrar.set_locked(tasks, data.get("locked", True)))


def tasks_of(registrar: Registrar, raw: Any) -> frozenset[Task]:
    """The tasks a lock request names; "all" (or nothing) is every task this registrar has."""
    mine = {Task.CLC} if Role.WALRUS in registrar.settings.registers else set()
    if Role.NC in registrar.settings.registers:
        mine.add(Task.CC)
    if raw in (None, "all", []):
        return frozenset(mine)
    # A task name or a list of them (fields.TASKS).
    tasks = {Task(name) for name in ([raw] if isinstance(raw, str) else raw)}
    for task in sorted(tasks - mine):
        bad(f"this registrar has no {task.value} task", "out-of-scope")
    return frozenset(tasks)


async def install_window(request: web.Request) -> web.Response:
    """POST /v1/trust/install-window {"open": true, "for": "30m"} or {"open": false}"""
    registrar = request.app[REGISTRAR]
    data = await read_body(request)
    if data.get("open", False):
        seconds = duration(data["for"], "for")  # the schema bounds numbers, not '9999d'
        return await _changing(registrar, registrar.open_install_window(seconds))
    return await _changing(registrar, registrar.close_install_window())


async def create_token(request: web.Request) -> web.Response:
    """POST /v1/tokens {"role", "cluster", "ttl", "uses"} -> {"token": "eucareg1....",
    "changed": [the token created]}"""
    registrar = request.app[REGISTRAR]
    data = await read_body(request)
    role = Role(data["role"])
    ttl = duration(data.get("ttl", "1h"), "ttl")
    ca = request.app[CONTEXT].ca_fingerprint()
    if ca is None:
        bad("this registrar has no cloud CA yet (is its CC registered?)", "no-cloud-ca")
    try:
        token = await registrar.create_token(role, data.get("cluster"), ttl, data.get("uses"), ca)
    except ValueError as exc:  # a role or cluster this registrar does not register
        bad(str(exc), "out-of-scope")
    token_id = parse_token(token).token_id
    now = time.time()
    row = next(token_json(t, now) for t in registrar.tokens() if t.token_id == token_id)
    return web.json_response({"token": token, "changed": changed("token", token_id, None, row)})


def token_json(token: Token, now: float) -> dict[str, Any]:
    row = asdict(token)
    row["role"] = token.role.value
    row["used_by"] = sorted(token.used_by)
    row["spent_by"] = sorted(token.spent_by)
    if token.revoked_at:
        row["state"] = "revoked"
    elif now >= token.expires_at:
        row["state"] = "expired"
    elif token.uses is not None and len(token.used_by) >= token.uses:
        row["state"] = "used-up"
    else:
        row["state"] = "valid"
    return row


async def list_tokens(request: web.Request) -> web.Response:
    """GET /v1/tokens, oldest first, never with their secrets."""
    now = time.time()
    rows = [token_json(t, now) for t in request.app[REGISTRAR].tokens()]
    return web.json_response({"tokens": rows})


async def revoke_token(request: web.Request) -> web.Response:
    """POST /v1/tokens/revoke {"token_id"} -> {"revoked": ID, "changed": [the token]}"""
    registrar = request.app[REGISTRAR]
    token_id: str = (await read_body(request))["token_id"]
    now = time.time()
    before = next((token_json(t, now) for t in registrar.tokens() if t.token_id == token_id), None)
    try:
        await registrar.revoke_token(token_id)
    except KeyError as exc:
        bad(str(exc.args[0]) if exc.args else str(exc), "unknown-token")
    after = next(token_json(t, now) for t in registrar.tokens() if t.token_id == token_id)
    return web.json_response(
        {"revoked": token_id, "changed": changed("token", token_id, before, after)}
    )
