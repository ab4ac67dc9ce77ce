"""Test doubles for the agent tests: an in-memory mDNS backend, a scripted registrar on
127.0.0.1 (port 0), a test cloud CA, and configs. Its own tests check the doubles themselves,
since every agent test leans on them.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509

from eucareg.config.file import Config, from_mapping
from eucareg.core.model import Role
from eucareg.mdns.types import Change, ServiceSpec, Sighting, SightingHandler
from eucareg.pki import certificates, keypairs, tls
from eucareg.pki import credentials as cred

_KEYS: list[keypairs.PrivateKey] = []


def key(n: int) -> keypairs.PrivateKey:
    """Real RSA keys, made once per session (generation is slow)."""
    while len(_KEYS) <= n:
        _KEYS.append(keypairs.generate_key())
    return _KEYS[n]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds (a positive check; fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


# -- mDNS ----------------------------------------------------------------------------------


class FakeMdns:
    """The agent's mDNS surface in memory: records every call, delivers sightings on demand.

    Our own announcements are not echoed back to watchers, so nothing makes the agent connect
    to the documentation addresses the configs announce.
    """

    def __init__(self) -> None:
        self.published: dict[str, ServiceSpec] = {}
        self.calls: list[tuple[str, str]] = []  # ("publish" | "withdraw" | "start" | "close", …)
        self.handlers: list[SightingHandler] = []
        self.publishes = 0

    async def start(self) -> None:
        self.calls.append(("start", ""))

    async def close(self) -> None:
        for instance in list(self.published):
            await self.withdraw(instance)
        self.calls.append(("close", ""))

    async def publish(self, spec: ServiceSpec) -> None:
        self.published[spec.instance] = spec
        self.publishes += 1
        self.calls.append(("publish", spec.instance))

    async def withdraw(self, instance: str) -> None:
        if self.published.pop(instance, None) is not None:
            self.calls.append(("withdraw", instance))

    def greet(self, instance: str) -> bool:
        if instance not in self.published:
            return False
        self.calls.append(("greet", instance))
        return True

    def watch(self, handler: SightingHandler) -> None:
        self.handlers.append(handler)

    def hear(self, sighting: Sighting) -> None:
        for handler in self.handlers:
            handler(sighting)


# -- a cloud CA and configs ----------------------------------------------------------------


@dataclass
class FakeCloud:
    """A cloud CA that certifies component keys the way a CLC registrar does."""

    key: keypairs.PrivateKey = field(default_factory=lambda: key(0))
    cert: x509.Certificate = field(init=False)
    issued: dict[str, x509.Certificate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cert = certificates.create_cloud_ca(self.key, "test-cloud")

    @property
    def fingerprint(self) -> str:
        return keypairs.fingerprint(self.key.public_key())

    def bundle(self, role: Role, subject: keypairs.PublicKey, component_id: str) -> dict[str, str]:
        """The bundle for a key; issued once, so asking again gets the same certificate."""
        issued = self.issued.get(keypairs.fingerprint(subject))
        if issued is None:
            issued = certificates.issue_certificate(
                issuer_key=self.key,
                issuer_cert=self.cert,
                subject_key=subject,
                role=role,
                component_id=component_id,
                cluster=None,
            )
            self.issued[keypairs.fingerprint(subject)] = issued
        return {
            cred.CLOUD_CERT: certificates.cert_pem(self.cert),
            cred.LAYOUTS[role].cert: certificates.cert_pem(issued),
        }

    def serial(self, subject: keypairs.PublicKey) -> str:
        return format(self.issued[keypairs.fingerprint(subject)].serial_number, "x")


def seed_identity(state_dir: Path, role: Role, component_id: str, own: keypairs.PrivateKey) -> None:
    """An identity as the agent makes it at first start, with a pooled key (no RSA generation)."""
    directory = state_dir / "identity"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{role.value}.id").write_text(component_id + "\n")
    cred.write_atomic(directory / f"{role.value}.key.pem", keypairs.key_pem(own))


def make_config(tmp_path: Path, components: dict[str, dict[str, Any]], **top: Any) -> Config:
    """A host config as the parser makes it: documentation address, no sshd, fast re-checks."""
    raw: dict[str, Any] = {
        "address": "10.0.2.10",
        "state_dir": str(tmp_path / "state"),
        "hook_dir": str(tmp_path / "hooks"),
        "preconditions": {"sshd": False, "recheck_interval": 0.05},
        "components": {role: {"installed": True, **extra} for role, extra in components.items()},
        **top,
    }
    if "fallback_registrar" in top:
        raw.setdefault("fallback_after", 0)  # mDNS has nothing to say in these tests
    return from_mapping(raw)


# -- a scripted registrar ------------------------------------------------------------------

Reply = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


class FakeRegistrar:
    """A registrar API on 127.0.0.1 answering credential requests from a script of replies.

    Each request pops the next reply; when the script is empty, `default` answers (by default
    it holds the request until released). Every request's JSON body is recorded.
    """

    def __init__(self, default: Reply | None = None, cloud: FakeCloud | None = None) -> None:
        self.cloud = cloud or FakeCloud()  # whose CLC this registrar is (its TLS certificate)
        self.script: list[Reply] = []
        self.default = default or self.hold
        self.requests: list[dict[str, Any]] = []
        self.announcements = 0
        self.announced: list[dict[str, Any]] = []  # each /v1/announce body
        self.refresh: Any = None  # the `refresh` its announce answers carry, if any
        self.waits: list[str] = []  # the ?wait= of each credential request
        self.release = asyncio.Event()  # ends every held request (teardown)
        self.held = 0  # requests being held right now
        self.server: TestServer | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> str:
        """Serve HTTPS as the cloud's CLC (its certificate is the cloud CA, which names it)."""
        app = web.Application()
        app.router.add_post("/v1/credentials", self._credentials)
        app.router.add_post("/v1/announce", self._announce)
        app.router.add_get("/v1/health", self._health)
        self._dir = tempfile.TemporaryDirectory()
        where = Path(self._dir.name)
        tls.write_chain(where / "chain.pem", [self.cloud.cert])
        cred.write_atomic(where / "key.pem", keypairs.key_pem(self.cloud.key))
        context = tls.server_context(where / "chain.pem", where / "key.pem")
        self.server = TestServer(app, host="127.0.0.1", port=0)
        await self.server.start_server(ssl=context)
        return f"https://127.0.0.1:{self.server.port}"

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()
        if self._dir is not None:
            self._dir.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _announce(self, request: web.Request) -> web.Response:
        self.announcements += 1
        self.announced.append(json.loads(await request.read()))
        answer: dict[str, Any] = {"status": "pending", "reason": "fake registrar"}
        if self.refresh is not None:
            answer["refresh"] = self.refresh
        return web.json_response(answer)

    async def _credentials(self, request: web.Request) -> web.StreamResponse:
        payload = json.loads(await request.read())
        self.requests.append(payload)
        self.waits.append(request.query.get("wait", ""))
        reply = self.script.pop(0) if self.script else self.default
        return await reply(payload)

    async def hold(self, _payload: dict[str, Any]) -> web.StreamResponse:
        """A long-poll that never completes by itself."""
        self.held += 1
        try:
            await asyncio.wait_for(self.release.wait(), 30)
        finally:
            self.held -= 1
        return web.json_response({"status": "pending", "reason": "released"}, status=202)


def json_reply(body: Any, status: int = 200) -> Reply:
    async def reply(_payload: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(body, status=status)

    return reply


def text_reply(text: str, status: int = 200) -> Reply:
    async def reply(_payload: dict[str, Any]) -> web.StreamResponse:
        return web.Response(text=text, status=status)

    return reply


def bundle_reply(cloud: FakeCloud, role: Role, watch: float = 0.3) -> Reply:
    """The genuine answer: a bundle certifying the key that signed the request. A request
    watching credentials (`have`) is held `watch` seconds first, as a registrar holds it."""

    async def reply(payload: dict[str, Any]) -> web.StreamResponse:
        subject = keypairs.load_public_pem(payload["public_key"])
        if payload.get("have"):
            await asyncio.sleep(watch)
        files = cloud.bundle(role, subject, payload["component_id"])
        return web.json_response({"status": "registered", "files": files})

    return reply


# -- the doubles' own checks ---------------------------------------------------------------


async def test_fake_mdns_says_goodbye_for_everything_still_published_when_closed() -> None:
    mdns = FakeMdns()
    spec = ServiceSpec("cloud-x", 1, {}, ("10.0.2.1",), "h.local.")
    await mdns.publish(spec)
    await mdns.publish(ServiceSpec("node-y", 1, {}, ("10.0.2.2",), "h.local."))
    await mdns.withdraw("node-y")
    heard: list[Sighting] = []
    mdns.watch(heard.append)
    mdns.hear(Sighting("cloud-z", Change.ADDED))
    await mdns.close()
    assert mdns.calls[-2:] == [("withdraw", "cloud-x"), ("close", "")]
    assert [s.instance for s in heard] == ["cloud-z"]


async def test_fake_registrar_follows_its_script_then_the_default() -> None:
    fake = FakeRegistrar(json_reply({"status": "pending"}, status=202))
    fake.script = [text_reply("boom", status=500)]
    url = await fake.start()
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for n in range(2):
                async with session.post(
                    f"{url}/v1/credentials", json={"n": n}, ssl=False
                ) as response:
                    statuses.append(response.status)
    finally:
        await fake.close()
    assert statuses == [500, 202]
    assert fake.requests == [{"n": 0}, {"n": 1}]
