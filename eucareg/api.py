"""The registrar's HTTP API (aiohttp): status, events, hook runs and credential collection.

Operators' commands read status and events here. Components collect their credentials here with
a request signed by their own key; the registrar answers only the key whose fingerprint it
registered, and only with certificates (no private key crosses the network).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import aiohttp
from aiohttp import web

from eucareg import credentials as cred
from eucareg.model import Record, Role, Status
from eucareg.registrar import CredentialRefused, Registrar

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Eucareg-Signature"
CLOCK_SKEW = 300.0  # seconds a signed request may be early or late
MAX_WAIT = 30.0  # longest long-poll a component may ask for
PEER_TIMEOUT = 3.0  # when the CLC asks a CC for its NCs

REGISTRAR_KEY: web.AppKey[Registrar] = web.AppKey("registrar", Registrar)
IDENTITY_KEY: web.AppKey[Callable[[], list[dict[str, Any]]]] = web.AppKey("identity")


def record_json(record: Record, online: bool) -> dict[str, Any]:
    data = asdict(record)
    data["role"] = record.role.value
    data["status"] = record.status.value
    data["online"] = online
    return data


class NonceCache:
    """Remembers nonces of signed requests until they are too old to be accepted anyway."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def fresh(self, nonce: str, now: float) -> bool:
        if len(self._seen) > 10_000:
            self._seen = {n: t for n, t in self._seen.items() if t > now - 2 * CLOCK_SKEW}
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def build_app(
    registrar: Registrar, local_components: Callable[[], list[dict[str, Any]]]
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[REGISTRAR_KEY] = registrar
    app[IDENTITY_KEY] = local_components
    nonces = NonceCache()

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def registry(_request: web.Request) -> web.Response:
        return web.json_response(_registry(registrar, local_components))

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await _status_tree(registrar, local_components))

    async def events(request: web.Request) -> web.Response:
        query = request.query
        try:
            since = int(query.get("since", "0"))
            limit = min(int(query.get("limit", "1000")), 100_000)
        except ValueError:
            return _error(400, "since and limit must be integers")
        rows = registrar.store.events(
            since_seq=since,
            component_id=query.get("component") or None,
            kind=query.get("kind") or None,
            role=query.get("role") or None,
            cluster=query.get("cluster") or None,
            limit=limit,
        )
        return web.json_response({"events": [asdict(e) for e in rows]})

    async def hooks(request: web.Request) -> web.Response:
        runs = registrar.store.hook_runs(request.query.get("component") or None)
        return web.json_response({"hook_runs": [asdict(r) for r in runs]})

    async def collect(request: web.Request) -> web.Response:
        log.debug("credential request from %s", request.remote)
        body = await request.read()
        signature = request.headers.get(SIGNATURE_HEADER, "")
        try:
            payload = json.loads(body)
            component_id = str(payload["component_id"])
            public_key = cred.load_public_pem(str(payload["public_key"]))
            stamp = float(payload["timestamp"])
            nonce = str(payload["nonce"])
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except (ValueError, KeyError, TypeError, cred.CredentialError) as exc:
            return _error(400, f"malformed credential request: {exc}")
        now = time.time()
        if not cred.verify(public_key, body, signature):
            return _error(401, "signature does not verify with the enclosed key")
        if abs(now - stamp) > CLOCK_SKEW:
            return _error(401, f"request time is {now - stamp:+.0f}s off; check the clocks")
        if not nonces.fresh(nonce, now):
            return _error(401, "replayed request (nonce already used)")
        try:
            answer = await registrar.credentials(component_id, public_key, wait)
        except CredentialRefused as exc:
            log.warning("credential request for %s refused: %s", component_id, exc)
            return _error(exc.status, str(exc))
        if answer.files is None:
            return web.json_response(
                {
                    "status": answer.status.value if answer.status else "unknown",
                    "reason": answer.reason,
                },
                status=202,
            )
        registrar.mark_collected(component_id)
        return web.json_response({"status": "registered", "files": answer.files})

    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/registry", registry)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/hooks", hooks)
    app.router.add_post("/v1/credentials", collect)
    return app


def _sort_key(record: Record) -> tuple[str, str, str]:
    return (record.role.value, record.cluster or "", record.address)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _registry(
    registrar: Registrar, local_components: Callable[[], list[dict[str, Any]]]
) -> dict[str, Any]:
    records = registrar.store.records()
    settings = registrar.settings
    return {
        "registrar": {
            "registers": sorted(r.value for r in settings.registers),
            "cluster": settings.own_cluster,
            "started_at": registrar.started_at,
        },
        "local": local_components(),
        "components": [
            record_json(r, r.component_id in registrar.live)
            for r in sorted(
                records.values(), key=lambda r: (r.role.value, r.cluster or "", r.address)
            )
        ],
    }


async def _status_tree(
    registrar: Registrar, local_components: Callable[[], list[dict[str, Any]]]
) -> dict[str, Any]:
    """The cloud as a tree. The CLC asks each live registered CC for its NCs."""
    own = _registry(registrar, local_components)
    components: list[dict[str, Any]] = list(own["components"])
    errors: list[str] = []
    peers = [
        ann
        for ann in registrar.live.values()
        if ann.role is Role.CC
        and ann.api_port
        and ann.cluster != registrar.settings.own_cluster
        and (rec := registrar.store.get(ann.component_id)) is not None
        and rec.status is Status.REGISTERED
    ]
    if peers:
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(
                *(_fetch(session, f"http://{a.address}:{a.api_port}/v1/registry") for a in peers),
                return_exceptions=True,
            )
        for ann, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(
                    f"CC {ann.cluster} at {ann.address}: {result or type(result).__name__}"
                )
                continue
            components.extend(
                c for c in result.get("components", []) if c.get("role") == Role.NC.value
            )
    return {
        "registrar": own["registrar"],
        "local": own["local"],
        "tree": tree(components, own["local"]),
        "errors": errors,
    }


async def _fetch(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        response.raise_for_status()
        data: dict[str, Any] = await response.json()
        return data


def tree(components: list[dict[str, Any]], local: list[dict[str, Any]]) -> dict[str, Any]:
    """Arrange flat component rows as cloud -> walrus, clusters -> cc, sc, nodes."""
    clc = next((c for c in local if c.get("role") == Role.CLC.value), None)
    clusters: dict[str, dict[str, Any]] = {}

    def cluster(name: str) -> dict[str, Any]:
        return clusters.setdefault(name, {"name": name, "cc": [], "sc": [], "nc": []})

    walrus: list[dict[str, Any]] = []
    unmatched: list[dict[str, Any]] = []
    seen: set[str] = set()
    for comp in components:
        if comp["component_id"] in seen:
            continue
        seen.add(comp["component_id"])
        role = comp["role"]
        if role == Role.WALRUS.value:
            walrus.append(comp)
        elif comp.get("status") == Status.UNMATCHED.value:
            unmatched.append(comp)
        elif role in (Role.CC.value, Role.SC.value, Role.NC.value):
            cluster(comp["cluster"])[role].append(comp)
    return {
        "clc": clc,
        "walrus": walrus,
        "clusters": [clusters[name] for name in sorted(clusters)],
        "unmatched": unmatched,
    }
