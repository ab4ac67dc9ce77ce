"""Operator endpoints about components: the event log, hook runs, what is pending, and the
operator's decisions (approve, reject, deregister). Every handler here is wrapped by
`operator_only` in app.py; it only reads its input and calls the registrar facade.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from eucareg.api.context import REGISTRAR
from eucareg.api.validate import MAX_SEQ, bad, json_object, query_int, text
from eucareg.api.views import record_json
from eucareg.core.model import Record, Status
from eucareg.registrar.engine import Registrar

MAX_EVENTS = 100_000
# What `eucareg pending` lists: not registered, and not kept out for good.
WAITING = frozenset({Status.PENDING, Status.AWAITING_KEY, Status.EXPIRED, Status.REFUSED})


async def events(request: web.Request) -> web.Response:
    """GET /v1/events?since=&limit=&component=&kind=&role=&cluster="""
    since = query_int(request, "since", 0)
    limit = min(query_int(request, "limit", 1000), MAX_EVENTS)
    if since < 0 or limit < 1:
        bad("since must be >= 0 and limit >= 1")
    if since > MAX_SEQ:
        bad(f"since must be at most {MAX_SEQ}")
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
    """The record a body names by `component_id` (which wins) or `fingerprint`."""
    component_id = text(data, "component_id")
    fingerprint = text(data, "fingerprint")
    if component_id is None and fingerprint is None:
        bad("name the component: component_id or fingerprint is required")
    try:
        return registrar.find(component_id, fingerprint)
    except KeyError as exc:
        bad(str(exc.args[0]) if exc.args else str(exc))


async def _decide(
    request: web.Request, action: Callable[[Registrar, Record], Awaitable[Record]]
) -> web.Response:
    registrar = request.app[REGISTRAR]
    record = named_record(registrar, await json_object(request))
    try:
        updated = await action(registrar, record)
    except ValueError as exc:  # not allowed in the record's status
        bad(str(exc))
    online = registrar.online(updated.component_id)
    return web.json_response({"component": record_json(updated, online)})


async def approve(request: web.Request) -> web.Response:
    """POST /v1/approve {"component_id"|"fingerprint"} -> {"component": ROW}"""
    return await _decide(request, lambda registrar, record: registrar.approve(record))


async def reject(request: web.Request) -> web.Response:
    """POST /v1/reject {"component_id"|"fingerprint"} -> {"component": ROW}"""
    return await _decide(request, lambda registrar, record: registrar.reject(record))


async def deregister(request: web.Request) -> web.Response:
    """POST /v1/deregister {"component_id"|"fingerprint"} -> {"deregistered": ID}"""
    registrar = request.app[REGISTRAR]
    record = named_record(registrar, await json_object(request))
    await registrar.deregister(record)
    return web.json_response({"deregistered": record.component_id})
