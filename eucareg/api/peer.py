"""Registrar to registrar: the CLC reads each CC's records for its status tree. The CC side
(POST /v1/peer/registry) answers only a request signed by the cloud CA key; the CLC side signs
each request with that key for that one CC (its announced id) and gives each CC a few seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509

from eucareg.api.bodies import read_signed_body
from eucareg.api.context import CONTEXT, REGISTRAR, ApiContext
from eucareg.api.validate import ApiError
from eucareg.api.views import registry_json
from eucareg.core.model import Announcement, IPAddress, Role, Status
from eucareg.pki import keypairs, tls
from eucareg.pki.signing import signed_body
from eucareg.registrar.engine import Registrar

PEER_TIMEOUT = 3.0  # when the CLC asks a CC for its NCs
PEER_PATH = "/v1/peer/registry"
# What the CLC's tree and the CLI read from each NC row a CC sends.
_ROW_STRINGS = ("component_id", "role", "cluster", "address", "status", "reason")


async def peer_registry(request: web.Request) -> web.Response:
    """POST /v1/peer/registry: this registrar's records, for the cloud CA's key only."""
    _payload, key = await read_signed_body(request)
    ctx = request.app[CONTEXT]
    allowed = ctx.ca_fingerprint()
    if allowed is None or keypairs.fingerprint(key) != allowed:
        raise ApiError(403, "only the cloud controller may read this registry", "not-cloud-ca")
    return web.json_response(registry_json(request.app[REGISTRAR], ctx))


def peer_ccs(registrar: Registrar) -> list[Announcement]:
    """CCs of other clusters that are registered here, announcing, and serving an API."""
    return [
        ann
        for ann in registrar.live.values()
        if ann.role is Role.CC
        and ann.api_port
        and ann.cluster != registrar.settings.own_cluster
        and (rec := registrar.record(ann.component_id)) is not None
        and rec.status is Status.REGISTERED
        and rec.role is Role.CC
        and rec.cluster == ann.cluster
        and rec.fingerprint == ann.fingerprint
        and rec.address == str(ann.address)
    ]


async def fetch_peer_nodes(
    registrar: Registrar, ctx: ApiContext
) -> tuple[list[dict[str, Any]], list[str]]:
    """The NC rows of every peer CC, and one error line per CC that did not answer."""
    peers = peer_ccs(registrar)
    if not peers or ctx.peer_key is None or ctx.cloud_cert is None:
        return [], []
    key, root = ctx.peer_key, ctx.cloud_cert
    timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(
            *(_fetch_nodes(session, key, root, a) for a in peers),
            return_exceptions=True,
        )
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for ann, result in zip(peers, results, strict=True):
        if isinstance(result, BaseException):
            problem = str(result) or type(result).__name__
            errors.append(f"CC {ann.cluster} at {ann.address}: {problem}")
        else:
            rows.extend(result)
    return rows, errors


def _url(address: IPAddress, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"https://{host}:{port}{PEER_PATH}"


async def _fetch_nodes(
    session: aiohttp.ClientSession,
    key: keypairs.PrivateKey,
    root: x509.Certificate,
    cc: Announcement,
) -> list[dict[str, Any]]:
    # Signed for this CC alone (its announced id): a CC cannot replay it to another.
    body, headers = signed_body(key, {}, method="POST", path=PEER_PATH, audience=cc.component_id)
    url = _url(cc.address, cc.api_port or 0)
    # Only the CC that announced itself, proving it over TLS with the certificate we issued.
    expect = tls.Expect(Role.CC, cc.cluster, cc.component_id, root=root)
    async with session.post(
        url,
        data=body,
        headers=headers,
        ssl=tls.client_context(expect),
        server_hostname=tls.SERVER_NAMES[Role.CC],
    ) as response:
        response.raise_for_status()
        data = await response.json()
    # A CC's answer goes straight into our own tree: check its shape rather than fail later.
    components = data.get("components") if isinstance(data, dict) else None
    if not isinstance(components, list) or not all(isinstance(c, dict) for c in components):
        raise ValueError("did not answer like an eucareg registrar")
    nodes = [c for c in components if c.get("role") == Role.NC.value]
    for row in nodes:
        if not all(isinstance(row.get(k), str) for k in _ROW_STRINGS):
            raise ValueError(f"sent a malformed NC row: {str(row)[:80]}")
    return nodes
