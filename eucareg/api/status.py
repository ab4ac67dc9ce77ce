"""What the registrar shows: health (open), and for the operator the flat registry and the cloud
as a tree (GET /v1/status; on the CLC with the NCs its CCs report), with the registrar's
event-loop lag (`registrar.loop_lag`; `?lag=reset` starts a new measuring period).
"""

from __future__ import annotations

import weakref
from typing import Any

from aiohttp import web

from eucareg.api.context import CONTEXT, REGISTRAR, ApiContext
from eucareg.api.pacing import PACER, Pacer
from eucareg.api.peer import fetch_peer_nodes
from eucareg.api.validate import bad
from eucareg.api.views import registry_json
from eucareg.core.grammar import shown
from eucareg.core.model import Role, Status
from eucareg.registrar import lag as lag_monitor
from eucareg.registrar.engine import Registrar

# When each registrar's current lag period began, once it was reset through the API; until
# then it began when the registrar started. (The monitor itself keeps only the figures.)
_LAG_SINCE: weakref.WeakKeyDictionary[lag_monitor.LagMonitor, float] = weakref.WeakKeyDictionary()


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def registry(request: web.Request) -> web.Response:
    return web.json_response(registry_json(request.app[REGISTRAR], request.app[CONTEXT]))


async def status(request: web.Request) -> web.Response:
    """GET /v1/status[?lag=reset]"""
    how = request.query.get("lag")
    if how not in (None, "", "reset"):
        bad(f"lag must be reset, got {shown(how)}", "invalid-query")
    # HEAD answers like GET but changes nothing.
    reset = how == "reset" and request.method == "GET"
    registrar = request.app[REGISTRAR]
    answer = await status_tree(registrar, request.app[CONTEXT], reset_lag=reset)
    answer["registrar"]["pacing"] = pacing_json(request.app.get(PACER))
    return web.json_response(answer)


def pacing_json(pacer: Pacer | None) -> dict[str, Any] | None:
    """How the HTTPS port spreads a burst (api/pacing.py); None when it is not paced."""
    if pacer is None:
        return None
    return {
        "waiting": pacer.waiting,
        "deferred": pacer.deferred,
        "slice_ms": round(pacer.allowance * 1000, 3),
        "target_ms": round(pacer.target * 1000, 3),
        "request_cost_ms": round(pacer.request_cost * 1000, 3),
    }


def loop_lag_json(registrar: Registrar, *, reset: bool = False) -> dict[str, Any]:
    """How late the registrar's event loop ran a short timer: the worst delay since `since`
    (the registrar's start or the last reset) and the latest one, in milliseconds. With
    `reset`, the figures are those of the period that ends now, and a new one begins."""
    monitor = registrar.lag
    since = _LAG_SINCE.get(monitor, registrar.started_at)
    last = monitor.last
    # Read and reset in one step: nothing can run in between (no await).
    worst = monitor.reset() if reset else monitor.worst
    if reset:
        _LAG_SINCE[monitor] = registrar.clock()
    return {
        "worst_ms": round(worst * 1000, 3),
        "last_ms": round(last * 1000, 3),
        "since": since,
        "interval_ms": lag_monitor.INTERVAL * 1000,
    }


async def status_tree(
    registrar: Registrar, ctx: ApiContext, *, reset_lag: bool = False
) -> dict[str, Any]:
    """The cloud as a tree. The CLC asks each live registered CC for its NCs."""
    own = registry_json(registrar, ctx)
    # Taken before asking the CCs: the lag of that wait belongs to the next period.
    own["registrar"]["loop_lag"] = loop_lag_json(registrar, reset=reset_lag)
    nodes, errors = await fetch_peer_nodes(registrar, ctx)
    return {
        "registrar": own["registrar"],
        "local": own["local"],
        "tree": tree([*own["components"], *nodes], own["local"]),
        "errors": errors,
        # What breaks the design's "only one" rules: a second CLC, a cluster claimed twice.
        "warnings": registrar.warnings(),
        # Pre-eucareg Eucalyptus components heard now: reported, never registered.
        "legacy": registrar.legacy_components(),
        "mdns": ctx.mdns(),
    }


def tree(components: list[dict[str, Any]], local: list[dict[str, Any]]) -> dict[str, Any]:
    """Arrange flat component rows as cloud -> walrus, clusters -> cc, sc, nodes."""
    clc = next((c for c in local if c.get("role") == Role.CLC.value), None)
    clusters: dict[str, dict[str, Any]] = {}
    walrus: list[dict[str, Any]] = []
    unmatched: list[dict[str, Any]] = []
    seen: set[str] = set()
    for comp in components:
        # Our own record of a component wins over a CC's: ours come first.
        if comp["component_id"] in seen:
            continue
        seen.add(comp["component_id"])
        role = comp["role"]
        if role == Role.WALRUS.value:
            walrus.append(comp)
        elif comp.get("status") == Status.UNMATCHED.value:
            unmatched.append(comp)
        elif role in (Role.CC.value, Role.SC.value, Role.NC.value):
            name = comp["cluster"]
            cluster = clusters.setdefault(name, {"name": name, "cc": [], "sc": [], "nc": []})
            cluster[role].append(comp)
    return {
        "clc": clc,
        "walrus": walrus,
        "clusters": [clusters[name] for name in sorted(clusters)],
        "unmatched": unmatched,
    }
