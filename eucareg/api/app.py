"""The registrar's HTTP API (aiohttp): operator endpoints, and the component endpoints.

Operator (admin) endpoints answer only on loopback and only with the local admin credential,
a bearer token in a root-only file. Component endpoints answer only requests signed by a
component key: the registrar hands certificates to the key it registered, nothing else, and no
private key ever crosses the network. The CLC reads CC registries with requests signed by the
cloud CA key. docs/security.md describes the model.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web

from eucareg.config.file import ConfigError, parse_duration
from eucareg.core.model import Record, Role, Status
from eucareg.core.trust import Mode, Task
from eucareg.core.txt import Rejected, decode
from eucareg.pki import credentials as cred
from eucareg.registrar.engine import CredentialRefused, Registrar

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Eucareg-Signature"
CLOCK_SKEW = 300.0  # seconds a signed request may be early or late
MAX_WAIT = 30.0  # longest long-poll a component may ask for
PEER_TIMEOUT = 3.0  # when the CLC asks a CC for its NCs

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiContext:
    """What the API needs from the agent besides the registrar."""

    admin_token: str
    local_components: Callable[[], list[dict[str, Any]]]
    # The cloud CA's fingerprint: who may read this registry as a peer, and what tokens pin.
    ca_fingerprint: Callable[[], str | None]
    # The CLC's key, to sign its requests to CC registrars (None elsewhere).
    peer_key: cred.PrivateKey | None = None


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


class SignedRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def signed_body(key: cred.PrivateKey, fields: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A request body carrying our public key, a time and a nonce, and its signature header."""
    body = json.dumps(
        {
            **fields,
            "public_key": cred.public_pem(key.public_key()),
            "timestamp": time.time(),
            "nonce": secrets.token_hex(16),
        }
    ).encode()
    return body, {SIGNATURE_HEADER: cred.sign(key, body), "Content-Type": "application/json"}


def verify_signed(
    body: bytes, signature: str, nonces: NonceCache
) -> tuple[dict[str, Any], cred.PublicKey]:
    """Check a signed request: well formed, signature, freshness, no replay."""
    try:
        payload = json.loads(body)
        public_key = cred.load_public_pem(str(payload["public_key"]))
        stamp = float(payload["timestamp"])
        nonce = str(payload["nonce"])
    except (ValueError, KeyError, TypeError, cred.CredentialError) as exc:
        raise SignedRequestError(400, f"malformed signed request: {exc}") from exc
    now = time.time()
    if not cred.verify(public_key, body, signature):
        raise SignedRequestError(401, "signature does not verify with the enclosed key")
    if abs(now - stamp) > CLOCK_SKEW:
        raise SignedRequestError(401, f"request time is {now - stamp:+.0f}s off; check the clocks")
    if not nonces.fresh(nonce, now):
        raise SignedRequestError(401, "replayed request (nonce already used)")
    return payload, public_key


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def build_app(registrar: Registrar, ctx: ApiContext) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    nonces = NonceCache()

    def admin(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if not _is_loopback(request.remote):
                return _error(403, "operator endpoints answer on loopback only")
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given, ctx.admin_token):
                return _error(401, "the local admin credential is required (see docs/security.md)")
            try:
                return await handler(request)
            except (KeyError, ValueError, ConfigError) as exc:
                message = exc.args[0] if exc.args else str(exc)
                return _error(400, str(message))

        return checked

    async def read_json(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")
        return data

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def registry(_request: web.Request) -> web.Response:
        return web.json_response(_registry(registrar, ctx))

    async def peer_registry(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            _payload, key = verify_signed(body, request.headers.get(SIGNATURE_HEADER, ""), nonces)
        except SignedRequestError as exc:
            return _error(exc.status, str(exc))
        allowed = ctx.ca_fingerprint()
        if allowed is None or cred.fingerprint(key) != allowed:
            return _error(403, "only the cloud controller may read this registry")
        return web.json_response(_registry(registrar, ctx))

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await _status_tree(registrar, ctx))

    async def events(request: web.Request) -> web.Response:
        query = request.query
        try:
            since = int(query.get("since", "0"))
            limit = min(int(query.get("limit", "1000")), 100_000)
        except ValueError:
            return _error(400, "since and limit must be integers")
        if since < 0 or limit < 1:
            return _error(400, "since must be >= 0 and limit >= 1")
        rows = await registrar.events(
            since_seq=since,
            component_id=query.get("component") or None,
            kind=query.get("kind") or None,
            role=query.get("role") or None,
            cluster=query.get("cluster") or None,
            limit=limit,
        )
        return web.json_response({"events": [asdict(e) for e in rows]})

    async def hooks(request: web.Request) -> web.Response:
        runs = await registrar.hook_runs(request.query.get("component") or None)
        return web.json_response({"hook_runs": [asdict(r) for r in runs]})

    async def trust(_request: web.Request) -> web.Response:
        return web.json_response(_trust_json(registrar))

    async def set_mode(request: web.Request) -> web.Response:
        data = await read_json(request)
        await registrar.set_mode(Mode(str(data.get("mode"))))
        return web.json_response(_trust_json(registrar))

    async def set_lock(request: web.Request) -> web.Response:
        data = await read_json(request)
        tasks = _tasks(registrar, data.get("tasks"))
        await registrar.set_locked(tasks, bool(data.get("locked", True)))
        return web.json_response(_trust_json(registrar))

    async def install_window(request: web.Request) -> web.Response:
        data = await read_json(request)
        if data.get("open"):
            seconds = parse_duration(data.get("for"), "for")
            await registrar.open_install_window(seconds)
        else:
            await registrar.close_install_window()
        return web.json_response(_trust_json(registrar))

    async def pending(_request: web.Request) -> web.Response:
        waiting = {Status.PENDING, Status.AWAITING_KEY, Status.EXPIRED, Status.REFUSED}
        rows = [
            record_json(r, registrar.online(r.component_id))
            for r in sorted(registrar.records().values(), key=lambda r: r.first_seen)
            if r.status in waiting
        ]
        return web.json_response({"pending": rows})

    def decide_on_component(action: Callable[[Record], Awaitable[Record]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            data = await read_json(request)
            record = registrar.find(data.get("component_id"), data.get("fingerprint"))
            updated = await action(record)
            online = registrar.online(updated.component_id)
            return web.json_response({"component": record_json(updated, online)})

        return handler

    approve = decide_on_component(registrar.approve)
    reject = decide_on_component(registrar.reject)

    async def deregister(request: web.Request) -> web.Response:
        data = await read_json(request)
        record = registrar.find(data.get("component_id"), data.get("fingerprint"))
        await registrar.deregister(record)
        return web.json_response({"deregistered": record.component_id})

    async def create_token(request: web.Request) -> web.Response:
        data = await read_json(request)
        ca = ctx.ca_fingerprint()
        if ca is None:
            raise ValueError("this registrar has no cloud CA yet (is its CC registered?)")
        try:
            role = Role(str(data.get("role")))
        except ValueError:
            raise ValueError(f"role {data.get('role')!r}: expected walrus, cc, sc or nc") from None
        uses = data.get("uses")
        token = await registrar.create_token(
            role,
            data.get("cluster") or None,
            parse_duration(data.get("ttl", "1h"), "ttl"),
            int(uses) if uses is not None else None,
            ca,
        )
        return web.json_response({"token": token})

    async def list_tokens(_request: web.Request) -> web.Response:
        now = time.time()
        rows = []
        for token in registrar.tokens():
            row = asdict(token)
            row["role"] = token.role.value
            row["used_by"] = sorted(token.used_by)
            row["spent_by"] = sorted(token.spent_by)
            row["state"] = (
                "revoked"
                if token.revoked_at
                else "expired"
                if now >= token.expires_at
                else "used-up"
                if token.uses is not None and len(token.used_by) >= token.uses
                else "valid"
            )
            rows.append(row)
        return web.json_response({"tokens": rows})

    async def revoke_token(request: web.Request) -> web.Response:
        data = await read_json(request)
        await registrar.revoke_token(str(data.get("token_id")))
        return web.json_response({"revoked": data.get("token_id")})

    async def announce(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload, public_key = verify_signed(
                body, request.headers.get(SIGNATURE_HEADER, ""), nonces
            )
            raw = payload["txt"]
            if not isinstance(raw, dict):
                raise ValueError("txt must be an object")
        except SignedRequestError as exc:
            return _error(exc.status, str(exc))
        except (KeyError, ValueError) as exc:
            return _error(400, f"malformed announcement: {exc}")
        decoded = decode(f"fallback:{request.remote}", {str(k): str(v) for k, v in raw.items()})
        if isinstance(decoded, Rejected):
            return _error(400, f"{decoded.code}: {decoded.reason}")
        if decoded.fingerprint != cred.fingerprint(public_key):
            return _error(403, "the request is not signed by the announced key")
        record = await registrar.fallback(replace(decoded, source="fallback"))
        if record is None:
            return web.json_response({"status": "ignored", "reason": "not for this registrar"})
        return web.json_response({"status": record.status.value, "reason": record.reason})

    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload, public_key = verify_signed(
                body, request.headers.get(SIGNATURE_HEADER, ""), nonces
            )
            component_id = str(payload["component_id"])
            have = payload.get("have")
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except SignedRequestError as exc:
            return _error(exc.status, str(exc))
        except (KeyError, ValueError) as exc:
            return _error(400, f"malformed credential request: {exc}")
        try:
            answer = await registrar.credentials(
                component_id, public_key, wait, str(have) if have else None
            )
        except CredentialRefused as exc:
            if exc.status != 410:
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
        await registrar.mark_collected(component_id)
        return web.json_response({"status": "registered", "files": answer.files})

    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/credentials", collect)
    app.router.add_post("/v1/announce", announce)
    app.router.add_post("/v1/peer/registry", peer_registry)
    reads: tuple[tuple[str, Handler], ...] = (
        ("/v1/registry", registry),
        ("/v1/status", status),
        ("/v1/events", events),
        ("/v1/hooks", hooks),
        ("/v1/trust", trust),
        ("/v1/pending", pending),
        ("/v1/tokens", list_tokens),
    )
    for path, handler in reads:
        app.router.add_get(path, admin(handler))
    writes: tuple[tuple[str, Handler], ...] = (
        ("/v1/trust/mode", set_mode),
        ("/v1/trust/lock", set_lock),
        ("/v1/trust/install-window", install_window),
        ("/v1/approve", approve),
        ("/v1/reject", reject),
        ("/v1/deregister", deregister),
        ("/v1/tokens", create_token),
        ("/v1/tokens/revoke", revoke_token),
    )
    for path, handler in writes:
        app.router.add_post(path, admin(handler))
    return app


def _tasks(registrar: Registrar, raw: Any) -> frozenset[Task]:
    mine = {Task.CLC} if Role.WALRUS in registrar.settings.registers else set()
    if Role.NC in registrar.settings.registers:
        mine.add(Task.CC)
    if raw in (None, "all", []):
        return frozenset(mine)
    names = [raw] if isinstance(raw, str) else list(raw)
    tasks = set()
    for name in names:
        try:
            task = Task(str(name))
        except ValueError:
            raise ValueError(f"task {name!r}: expected clc, cc or all") from None
        if task not in mine:
            raise ValueError(f"this registrar has no {task.value} task")
        tasks.add(task)
    return frozenset(tasks)


def _trust_json(registrar: Registrar) -> dict[str, Any]:
    trust = registrar.trust
    now = time.time()
    until = trust.install_until
    return {
        "mode": trust.mode.value,
        "locked": sorted(t.value for t in trust.locked),
        "install_until": until,
        "install_open": trust.install_open(now),
        "install_remaining": max(0.0, until - now) if until is not None else 0.0,
    }


def _sort_key(record: Record) -> tuple[str, str, str]:
    return (record.role.value, record.cluster or "", record.address)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _registry(registrar: Registrar, ctx: ApiContext) -> dict[str, Any]:
    records = registrar.records()
    settings = registrar.settings
    return {
        "registrar": {
            "registers": sorted(r.value for r in settings.registers),
            "cluster": settings.own_cluster,
            "started_at": registrar.started_at,
            "trust": _trust_json(registrar),
        },
        "local": ctx.local_components(),
        "components": [
            record_json(r, registrar.online(r.component_id))
            for r in sorted(records.values(), key=_sort_key)
        ],
    }


async def _status_tree(registrar: Registrar, ctx: ApiContext) -> dict[str, Any]:
    """The cloud as a tree. The CLC asks each live registered CC for its NCs."""
    own = _registry(registrar, ctx)
    components: list[dict[str, Any]] = list(own["components"])
    errors: list[str] = []
    peers = [
        ann
        for ann in registrar.live.values()
        if ann.role is Role.CC
        and ann.api_port
        and ann.cluster != registrar.settings.own_cluster
        and (rec := registrar.record(ann.component_id)) is not None
        and rec.status is Status.REGISTERED
        and rec.fingerprint == ann.fingerprint
        and rec.address == str(ann.address)
    ]
    if peers and ctx.peer_key is not None:
        key = ctx.peer_key
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(
                *(
                    _fetch_peer(session, key, f"http://{a.address}:{a.api_port}/v1/peer/registry")
                    for a in peers
                ),
                return_exceptions=True,
            )
        for ann, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                problem = str(result) or type(result).__name__
                errors.append(f"CC {ann.cluster} at {ann.address}: {problem}")
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


async def _fetch_peer(
    session: aiohttp.ClientSession, key: cred.PrivateKey, url: str
) -> dict[str, Any]:
    body, headers = signed_body(key, {})
    async with session.post(url, data=body, headers=headers) as response:
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
