"""Operator endpoints about components: the event log, hook runs, what is pending, and the
operator's decisions (approve, reject, deregister), each answered with what it changed. Every
handler here is wrapped by `operator_only` in app.py; it only reads its input (checked against
its schema, eucareg/api/bodies.py) and calls the registrar facade.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from eucareg.api.answers import changed
from eucareg.api.bodies import read_body
from eucareg.api.components import WAIT
from eucareg.api.context import REGISTRAR
from eucareg.api.validate import MAX_SEQ, ApiError, bad, query_int
from eucareg.api.views import record_json
from eucareg.core import grammar
from eucareg.core.model import HookRun, Record, Role, Status
from eucareg.registrar.engine import Registrar
from eucareg.upgrade import plan

MAX_EVENTS = 100_000
# The longest an operator's `deregister` may wait for the deregister hook (its retries too).
MAX_DEREGISTER_WAIT = 600.0
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
    wait = _deregister_wait(request.query.get("wait", "0"))
    outcome = await registrar.deregister(record)
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
    hook = await _hook_outcome(outcome, component_id, wait)
    return web.json_response({"deregistered": component_id, "changed": changes, "hook": hook})


def _deregister_wait(raw: str) -> float:
    if not WAIT.fullmatch(raw):
        bad(f"wait must be a number of seconds, got {grammar.shown(raw)}", "invalid-query")
    return min(MAX_DEREGISTER_WAIT, float(raw))


async def _hook_outcome(
    outcome: asyncio.Future[HookRun] | None, component_id: str, wait: float
) -> dict[str, Any]:
    """What became of the deregister hook: none owed, its last run, or still running (the
    operator follows it with `eucareg hooks`)."""
    if outcome is None:
        reason = "no deregister hook: its registration hook never ran"
        return {"state": "none", "reason": reason, "run": None}
    if not outcome.done() and wait > 0:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            # Shielded: the operator's giving up must not cancel the hook.
            await asyncio.wait_for(asyncio.shield(outcome), wait)
    if outcome.cancelled():
        reason = "the registrar stopped while the deregister hook ran (GET /v1/hooks shows it)"
        return {"state": "stopped", "reason": reason, "run": None}
    if not outcome.done():
        follow = f"eucareg events --component {component_id} --kind hook"
        reason = f"the deregister hook is still running; follow it with `{follow}`"
        return {"state": "running", "reason": reason, "run": None}
    run = outcome.result()
    reason = f"deregister hook {run.outcome.value} (attempt {run.attempt})"
    return {"state": "done", "reason": reason, "run": asdict(run)}


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


async def import_components(request: web.Request) -> web.Response:
    """POST /v1/import {"components": [{"role", "address", "cluster"?, "fingerprint"?}], "dry_run"?,
    "source"?} -> {"plan": [PLAN ROW], "imported": N, "dry_run", "changed": [..]}; 409
    `import-conflict` (nothing stored) when a row conflicts or is refused (`eucareg import`)."""
    registrar = request.app[REGISTRAR]
    data = await read_body(request)
    candidates = [
        plan.Candidate(
            Role(c["role"]), c.get("cluster"), c["address"], fingerprint=c.get("fingerprint") or ""
        )
        for c in data["components"]
    ]
    dry_run = bool(data.get("dry_run", False))
    source = data.get("source") or "an euca_conf listing"
    rows = await registrar.admin.import_components(candidates, dry_run=dry_run, source=source)
    blocked = [r for r in rows if r.action in plan.BLOCKING]
    if blocked and not dry_run:
        shown = "; ".join(
            f"{plan.what(r.role, r.cluster, r.address)}: {r.reason}" for r in blocked[:5]
        )
        more = f" (and {len(blocked) - 5} more)" if len(blocked) > 5 else ""
        raise ApiError(
            409,
            f"nothing imported: {len(blocked)} of {len(rows)} cannot be imported: {shown}{more}",
            "import-conflict",
        )
    changes: list[dict[str, Any]] = []
    done = [r for r in rows if r.action is plan.Action.IMPORT and not dry_run]
    for row in done:
        record = registrar.record(row.component_id or "")
        if record is not None:
            changes += changed("component", record.component_id, None, stored(record))
    return web.json_response(
        {
            "plan": [r.json() for r in rows],
            "imported": len(done),
            "dry_run": dry_run,
            "changed": changes,
        }
    )
