"""What the registrar shows: health (open), and for the operator the flat registry and the cloud
as a tree (GET /v1/status; on the CLC with the NCs its CCs report).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from eucareg.api.context import CONTEXT, REGISTRAR, ApiContext
from eucareg.api.peer import fetch_peer_nodes
from eucareg.api.views import registry_json
from eucareg.core.model import Role, Status
from eucareg.registrar.engine import Registrar


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def registry(request: web.Request) -> web.Response:
    return web.json_response(registry_json(request.app[REGISTRAR], request.app[CONTEXT]))


async def status(request: web.Request) -> web.Response:
    return web.json_response(await status_tree(request.app[REGISTRAR], request.app[CONTEXT]))


async def status_tree(registrar: Registrar, ctx: ApiContext) -> dict[str, Any]:
    """The cloud as a tree. The CLC asks each live registered CC for its NCs."""
    own = registry_json(registrar, ctx)
    nodes, errors = await fetch_peer_nodes(registrar, ctx)
    return {
        "registrar": own["registrar"],
        "local": own["local"],
        "tree": tree([*own["components"], *nodes], own["local"]),
        "errors": errors,
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
