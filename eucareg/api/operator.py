"""Operator endpoints about components: the event log, hook runs, what is pending, and the
operator's decisions (approve, reject, deregister), each answered with what it changed. Every
handler here is wrapped by `operator_only` in app.py; it only reads its input (checked against
its schema, eucareg/api/schemas.py) and calls the registrar facade.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from eucareg.api.context import REGISTRAR
from eucareg.api.schemas import changed, read_body
from eucareg.api.validate import MAX_SEQ, ApiError, bad, query_int
from eucareg.api.views import record_json
from eucareg.core import grammar
from eucareg.core.model import Record, Role, Status
from eucareg.registrar.engine import Registrar

MAX_EVENTS = 100_000
# What `eucareg pending` lists: not registered, and not kept out for good.
WAITING = frozenset({Status.PENDING, Status.AWAITING_KEY, Status.EXPIRED, Status.REFUSED})


async def events(request: web.Request) -> web.Response:
    """GET /v1/events?since=&limit=&component=&kind=&role=&cluster="""
    since = query_int(request, "since", 0)
    limit = min(query_int(request, "limit", 1000), MAX_EVENTS)
    if since < 0 or limit < 1:
        bad("since must be >= 0 and limit >= 1", "invalid-query")
    if since > MAX_SEQ:
        bad(f"since must be at most {MAX_SEQ}", "invalid-query")
    query = request.query
    rows = await request.app[REGISTRAR].events(
        since_seq=since,
        component_id=query.get("component") or None,
        kind=query.get("kind") or None,
        role=query.get("role") or None,
        cluster=query.get("cluster") or None,
        limit=limit,
    )
    return web.json_response({"events": [asdict(e) for e in rows]})


async def hooks(request: web.Request) -> web.Response:
    """GET /v1/hooks?component="""
    runs = await request.app[REGISTRAR].hook_runs(request.query.get("component") or None)
    return web.json_response({"hook_runs": [asdict(r) for r in runs]})


async def pending(request: web.Request) -> web.Response:
    """GET /v1/pending: waiting records, oldest first."""
    registrar = request.app[REGISTRAR]
    rows = [
        record_json(r, registrar.online(r.component_id))
        for r in sorted(registrar.records().values(), key=lambda r: r.first_seen)
        if r.status in WAITING
    ]
    return web.json_response({"pending": rows})


def named_record(registrar: Registrar, data: dict[str, Any]) -> Record:
    """The record a checked body names by `component_id` (which wins) or `fingerprint`."""
    try:
        return registrar.find(data.get("component_id"), data.get("fingerprint"))
    except KeyError as exc:
        bad(str(exc.args[0]) if exc.args else str(exc), "unknown-component")


def stored(record: Record) -> dict[str, Any]:
    """A record's stored fields, as ROW shows them (without `online`, which is not stored)."""
    row = record_json(record, False)
    del row["online"]
    return row


async def _decide(
    request: web.Request, action: Callable[[Registrar, Record], Awaitable[Record]]
) -> web.Response:
    registrar = request.app[REGISTRAR]
    record = named_record(registrar, await read_body(request))
    try:
        updated = await action(registrar, record)
    except ValueError as exc:  # not allowed in the record's status
        bad(str(exc), "wrong-status")
    online = registrar.online(updated.component_id)
    return web.json_response(
        {
            "component": record_json(updated, online),
            "changed": changed("component", record.component_id, stored(record), stored(updated)),
        }
    )


async def approve(request: web.Request) -> web.Response:
    """POST /v1/approve {"component_id"|"fingerprint"} -> {"component": ROW, "changed": [..]}"""
    return await _decide(request, lambda registrar, record: registrar.approve(record))


async def reject(request: web.Request) -> web.Response:
    """POST /v1/reject {"component_id"|"fingerprint"} -> {"component": ROW, "changed": [..]}"""
    return await _decide(request, lambda registrar, record: registrar.reject(record))


async def deregister(request: web.Request) -> web.Response:
    """POST /v1/deregister {"component_id"|"fingerprint"} -> {"deregistered": ID, "changed":
    [the record deleted, its certificate revoked, the token uses it spent]}"""
    registrar = request.app[REGISTRAR]
    record = named_record(registrar, await read_body(request))
    component_id = record.component_id
    certificate = registrar.memory.certificates.get(component_id)
    spent_before = {t.token_id: t.spent_by for t in registrar.tokens()}
    await registrar.deregister(record)
    changes = changed("component", component_id, stored(record), None)
    if certificate is not None:
        revoked = certificate.serial in registrar.memory.revoked
        changes += changed(
            "certificate", certificate.serial, {"revoked": False}, {"revoked": revoked}
        )
    for token in registrar.tokens():
        before = spent_before.get(token.token_id, frozenset())
        if component_id in token.spent_by and component_id not in before:
            changes += changed(
                "token",
                token.token_id,
                {"spent_by": sorted(before)},
                {"spent_by": sorted(token.spent_by)},
            )
    return web.json_response({"deregistered": component_id, "changed": changes})


async def register(request: web.Request) -> web.Response:
    """POST /v1/register {"role", "address", "cluster"?, "fingerprint"?} -> {"component": ROW,
    "changed": [..]}; 409 with the check's code when it cannot be registered now."""
    registrar = request.app[REGISTRAR]
    data = await read_body(request)
    role = Role(data["role"])
    try:
        address = grammar.address(data["address"], "address", registrar.settings.allowed_ranges)
    except grammar.Invalid as exc:
        bad(str(exc), "invalid-field")
    cluster = data.get("cluster")
    if role.needs_cluster and not cluster:
        bad(f"a {role.value} needs its cluster", "missing-field")
    if not role.needs_cluster and cluster:
        bad(f"a {role.value} has no cluster", "invalid-field")
    if role not in registrar.settings.registers or (
        role is Role.NC and cluster != registrar.settings.own_cluster
    ):
        mine = ", ".join(sorted(r.value for r in registrar.settings.registers))
        own = registrar.settings.own_cluster
        bad(
            f"this registrar does not register {role.value}s"
            + (f" of cluster {cluster}" if role is Role.NC else "")
            + f" (it registers: {mine}"
            + (f" of cluster {own})" if own else ")"),
            "not-mine",
        )
    decision, record = await registrar.admin.register(
        role, address, cluster, data.get("fingerprint")
    )
    if record is None:
        raise ApiError(409, decision.reason, decision.code)
    return web.json_response(
        {
            "component": record_json(record, False),
            "changed": changed("component", record.component_id, None, stored(record)),
        }
    )
