"""Shared set-up of the API and CLI tests (no tests of its own): a real Registrar on a SQLite
file in tmp_path, its API served on 127.0.0.1 port 0, and clients for the operator (admin
bearer token) and for components (requests signed by their own key). Each test module makes
its own fixtures from `served`, so nothing here depends on fixture discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Middleware

from eucareg.api.app import ApiContext, build_app, signed_body
from eucareg.api.auth import NONCES, NonceCache
from eucareg.api.limits import RateLimits
from eucareg.core.model import Announcement, Role
from eucareg.core.view import RegistrarSettings
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred
from eucareg.pki.signing import socket_audience
from eucareg.registrar.engine import Issuer, Registrar, Timing
from eucareg.store.registry import Store, sqlite_url
from tests.factories import KEYS, sighting

ADMIN_TOKEN = "test-admin-token-0123456789"
CLC_SETTINGS = RegistrarSettings(
    registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), observes_unmatched_nodes=True
)
CC_SETTINGS = RegistrarSettings(registers=frozenset({Role.NC}), own_cluster="cluster1")


@dataclass(frozen=True)
class Cloud:
    """The cloud CA: the CLC's key and its self-signed certificate."""

    key: keypairs.PrivateKey
    issuer: Issuer

    @property
    def fingerprint(self) -> str:
        return keypairs.fingerprint(self.key.public_key())


CLOUD_CLC_ID = "clc-0000000000c1"  # the CLC the cloud CA names (and serves TLS as)


@functools.cache
def the_cloud() -> Cloud:
    """One cloud CA for the session (key generation is slow)."""
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, CLOUD_CLC_ID)
    return Cloud(key, Issuer(key=key, cert=ca, cloud_cert=ca))


async def make_registrar(tmp_path: Path, settings: RegistrarSettings, cloud: Cloud) -> Registrar:
    """A registrar as the agent makes one; no hook scripts, so registering skips the hook."""
    await asyncio.to_thread(tmp_path.mkdir, parents=True, exist_ok=True)
    registrar = Registrar(
        Store(sqlite_url(tmp_path / "registry.db")),
        settings,
        hook_dir=tmp_path / "hooks",
        timing=Timing(retry_base=0.05, retry_max=0.2, hook_timeout=5),
        issuer_for=lambda _role: cloud.issuer,
        self_registered=lambda: True,
        master_key=b"test-master-key",
    )
    await registrar.start()
    return registrar


@dataclass
class Harness:
    registrar: Registrar
    client: TestClient[Any, Any]
    cloud: Cloud
    local: list[dict[str, Any]]
    socket: str = ""  # "unix:PATH": the operator socket, as the CLI talks to the agent

    @property
    def audience(self) -> str:
        """This registrar as a client connecting to it names it in a signed request."""
        return socket_audience(str(self.client.host), self.client.port or 0)

    @property
    def base(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def admin(
        self, method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.client.request(method, path, json=body, headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        return await self.admin("GET", path, params=params)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        return await self.admin("POST", path, body)

    async def raw_post(self, path: str, data: bytes) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        async with self.client.post(path, data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def signed(
        self,
        path: str,
        key: keypairs.PrivateKey,
        fields: dict[str, Any],
        query: str = "",
        body_and_headers: tuple[bytes, dict[str, str]] | None = None,
    ) -> tuple[int, Any]:
        body, headers = body_and_headers or signed_body(
            key, fields, method="POST", path=path + query, audience=self.audience
        )
        async with self.client.post(path + query, data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    def announce(self, ann: Announcement) -> None:
        """The registrar hears `ann` over mDNS."""
        self.registrar.on_sighting(sighting(ann))

    async def record_status(self, component_id: str, wanted: str) -> None:
        def done() -> bool:
            record = self.registrar.record(component_id)
            return record is not None and record.status.value == wanted

        await eventually(done, f"{component_id} to be {wanted}")


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for something that must happen (never used to show that something does not)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def key_of(ann: Announcement) -> keypairs.PrivateKey:
    return KEYS[ann.fingerprint]


def _serve_as_clc(tls_dir: Path, cloud: Cloud) -> ssl.SSLContext:
    tls_dir.mkdir(parents=True, exist_ok=True)
    tls.write_chain(tls_dir / "chain.pem", [cloud.issuer.cert])
    cred.write_atomic(tls_dir / "key.pem", keypairs.key_pem(cloud.key))
    return tls.server_context(
        tls_dir / "chain.pem", tls_dir / "key.pem", client_ca=cloud.issuer.cert
    )


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path,
    settings: RegistrarSettings,
    *,
    ca_known: bool = True,
    peer_key: keypairs.PrivateKey | None = None,
    middlewares: Sequence[Middleware] = (),
    outer: Sequence[Middleware] = (),
    tls_dir: Path | None = None,
    limits: RateLimits | None = None,
    nonces: NonceCache | None = None,
) -> AsyncIterator[Harness]:
    """A registrar and its API on 127.0.0.1, port 0; closed again on the way out.
    `middlewares` run inside the API's own, e.g. to pretend a request came from elsewhere;
    `outer` outside all of them (before the rate limits see the request). `limits` and
    `nonces` replace the API's defaults.
    With `tls_dir`, it serves HTTPS as the CLC (the test client then cannot call it; the
    agent's functions can)."""
    cloud = the_cloud()
    registrar = await make_registrar(tmp_path, settings, cloud)
    local: list[dict[str, Any]] = []
    ctx = ApiContext(
        admin_token=ADMIN_TOKEN,
        local_components=lambda: local,
        ca_fingerprint=lambda: cloud.fingerprint if ca_known else None,
        peer_key=peer_key,
        cloud_cert=cloud.issuer.cert if peer_key else None,
        **({"limits": limits} if limits is not None else {}),
    )
    app = build_app(registrar, ctx)
    app.middlewares.extend(middlewares)
    for middleware in reversed(outer):
        app.middlewares.insert(0, middleware)
    if nonces is not None:
        app[NONCES] = nonces
    server = TestServer(app)
    if tls_dir is not None:
        context = await asyncio.to_thread(_serve_as_clc, tls_dir, cloud)
        await server.start_server(ssl=context)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    assert server.runner is not None
    socket_path = tmp_path / "api.sock"
    await web.UnixSite(server.runner, str(socket_path)).start()
    try:
        yield Harness(registrar, client, cloud, local, f"unix:{socket_path}")
    finally:
        await client.close()
        await registrar.close()
