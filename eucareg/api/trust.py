"""Operator endpoints about trust: the mode, locks and install window (each answers the
resulting settings), and join tokens (create, list without secrets, revoke). Wrapped by
`operator_only` in app.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from eucareg.api.context import CONTEXT, REGISTRAR
from eucareg.api.validate import (
    MAX_USES,
    bad,
    count,
    duration,
    flag,
    json_object,
    required_text,
    text,
)
from eucareg.api.views import trust_json
from eucareg.core.model import Role
from eucareg.core.trust import Mode, Task, Token
from eucareg.registrar.engine import Registrar


async def show(request: web.Request) -> web.Response:
    """GET /v1/trust"""
    return web.json_response(trust_json(request.app[REGISTRAR]))


async def set_mode(request: web.Request) -> web.Response:
    """POST /v1/trust/mode {"mode": "local" | "any" | "off"}"""
    registrar = request.app[REGISTRAR]
    name = required_text(await json_object(request), "mode")
    try:
        mode = Mode(name)
    except ValueError:
        bad(f"mode {name!r}: expected local, any or off")
    await registrar.set_mode(mode)
    return web.json_response(trust_json(registrar))


async def set_lock(request: web.Request) -> web.Response:
    """POST /v1/trust/lock {"tasks": "clc" | "cc" | "all" | [...], "locked": bool}"""
    registrar = request.app[REGISTRAR]
    data = await json_object(request)
    tasks = tasks_of(registrar, data.get("tasks"))
    await registrar.set_locked(tasks, flag(data, "locked", True))
    return web.json_response(trust_json(registrar))


def tasks_of(registrar: Registrar, raw: Any) -> frozenset[Task]:
    """The tasks a lock request names; "all" (or nothing) is every task this registrar has."""
    mine = {Task.CLC} if Role.WALRUS in registrar.settings.registers else set()
    if Role.NC in registrar.settings.registers:
        mine.add(Task.CC)
    if raw in (None, "all", []):
        return frozenset(mine)
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        bad("tasks must be clc, cc, all or a list of those")
    tasks = set()
    for name in names:
        try:
            task = Task(name)
        except ValueError:
            bad(f"task {name!r}: expected clc, cc or all")
        if task not in mine:
            bad(f"this registrar has no {task.value} task")
        tasks.add(task)
    return frozenset(tasks)


async def install_window(request: web.Request) -> web.Response:
    """POST /v1/trust/install-window {"open": true, "for": "30m"} or {"open": false}"""
    registrar = request.app[REGISTRAR]
    data = await json_object(request)
    if flag(data, "open", False):
        await registrar.open_install_window(duration(data.get("for"), "for"))
    else:
        await registrar.close_install_window()
    return web.json_response(trust_json(registrar))


async def create_token(request: web.Request) -> web.Response:
    """POST /v1/tokens {"role", "cluster", "ttl", "uses"} -> {"token": "eucareg1...."}"""
    registrar = request.app[REGISTRAR]
    data = await json_object(request)
    name = required_text(data, "role")
    try:
        role = Role(name)
    except ValueError:
        bad(f"role {name!r}: expected walrus, cc, sc or nc")
    cluster = text(data, "cluster")
    ttl = duration(data.get("ttl", "1h"), "ttl")
    uses = count(data, "uses", MAX_USES)
    ca = request.app[CONTEXT].ca_fingerprint()
    if ca is None:
        bad("this registrar has no cloud CA yet (is its CC registered?)")
    try:
        token = await registrar.create_token(role, cluster, ttl, uses, ca)
    except ValueError as exc:  # a role or cluster this registrar does not register
        bad(str(exc))
    return web.json_response({"token": token})


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
    """POST /v1/tokens/revoke {"token_id"} -> {"revoked": ID}"""
    token_id = required_text(await json_object(request), "token_id")
    try:
        await request.app[REGISTRAR].revoke_token(token_id)
    except KeyError as exc:
        bad(str(exc.args[0]) if exc.args else str(exc))
    return web.json_response({"revoked": token_id})
