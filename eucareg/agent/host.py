"""The per-host agent: announces this host's components, collects their credentials, and runs
the registrar (with its HTTP API) when the host holds the CLC or a CC.

All of it shares one asyncio loop with python-zeroconf and aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509

from eucareg.api.app import ApiContext, build_app, signed_body
from eucareg.config.file import ComponentConfig, Config, usable_addresses
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.core.policy import RegistrarSettings
from eucareg.core.trust import (
    PROOF_MAX_AGE,
    ParsedToken,
    make_proof,
    new_master_key,
    parse_token,
    proof_message,
)
from eucareg.mdns.types import Change, ServiceSpec, Sighting
from eucareg.mdns.zeroconf_backend import ZeroconfBackend
from eucareg.pki import credentials as cred
from eucareg.registrar.engine import Issuer, Registrar, Timing
from eucareg.store.registry import Store, sqlite_url

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
LONG_POLL = 25.0  # seconds a collector waits inside one credential request
COLLECT_RETRY_MAX = 30.0


@dataclass
class Identity:
    """A component's own stable id and key pair, made at first start."""

    component_id: str
    key: cred.PrivateKey
    fingerprint: str


def load_or_create_identity(state_dir: Path, role: Role) -> Identity:
    directory = state_dir / "identity"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    id_file = directory / f"{role.value}.id"
    if id_file.exists():
        component_id = id_file.read_text().strip()
        if not txt.COMPONENT_ID_RE.match(component_id):
            raise cred.CredentialError(f"{id_file} holds no valid component id")
    else:
        component_id = f"{role.value}-{uuid.uuid4().hex[:12]}"
        cred.write_atomic(id_file, component_id.encode() + b"\n", mode=0o644)
    key = cred.load_or_create_key(directory / f"{role.value}.key.pem")
    return Identity(component_id, key, cred.fingerprint(key.public_key()))


def ensure_cloud_ca(key_dir: Path, identity: Identity) -> x509.Certificate:
    """The CLC's cloud CA: cloud-cert.pem certifies the CLC's own key, made once."""
    cert_path = key_dir / cred.CLOUD_CERT
    if cert_path.exists():
        cert = cred.load_cert(cert_path)
        if cred.cert_fingerprint(cert) == identity.fingerprint:
            return cert
        raise cred.CredentialError(f"{cert_path} does not belong to this CLC's key")
    cert = cred.create_cloud_ca(identity.key, identity.component_id)
    cred.write_atomic(key_dir / cred.LAYOUTS[Role.CLC].key, cred.key_pem(identity.key))
    cred.write_atomic(cert_path, cred.cert_pem(cert).encode())
    return cert


@dataclass
class Endpoint:
    address: str
    port: int
    component_id: str
    fingerprint: str = ""


@dataclass
class ComponentRuntime:
    config: ComponentConfig
    identity: Identity
    registered: bool = False
    announced: bool = False
    token: ParsedToken | None = None
    proof_stamp: int = 0  # when the announced token proof was made (0: make a new one)
    last_stamp: int = 0  # the previous stamp, so a renewed proof always differs
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # re-check announcement now
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # announced/registered moved

    @property
    def role(self) -> Role:
        return self.config.role


class Agent:
    """Everything one host runs, started and stopped as a unit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.components = [
            ComponentRuntime(
                c,
                load_or_create_identity(config.state_dir, c.role),
                token=parse_token(c.token) if c.token else None,
            )
            for c in config.components
        ]
        self.backend = ZeroconfBackend(ipv6=config.ipv6)
        self.store: Store | None = None
        self.registrar: Registrar | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._clc: dict[str, Endpoint] = {}  # instance -> CLC endpoint
        self._clusters: dict[str, tuple[str, Endpoint]] = {}  # instance -> (cluster, endpoint)
        self._registrars_changed = asyncio.Event()
        self._cloud_cert: x509.Certificate | None = None
        self._stopping = asyncio.Event()

    def runtime(self, role: Role) -> ComponentRuntime | None:
        return next((c for c in self.components if c.role is role), None)

    # -- startup --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        clc = self.runtime(Role.CLC)
        if clc is not None:
            self._cloud_cert = ensure_cloud_ca(cfg.key_dir, clc.identity)
        for comp in self.components:
            comp.registered = self._credentials_present(comp)
        if cfg.runs_registrar:
            await self._start_registrar()
        await self.backend.start()
        self.backend.watch(self._on_sighting)
        if self.registrar is not None:
            self.backend.watch(self.registrar.on_sighting)
        for comp in self.components:
            self._tasks.append(asyncio.create_task(self._announce_loop(comp)))
            if comp.role is not Role.CLC:
                self._tasks.append(asyncio.create_task(self._collect_loop(comp)))
        log.info(
            "agent started: %s",
            ", ".join(f"{c.role.value}={c.identity.component_id}" for c in self.components),
        )

    async def _start_registrar(self) -> None:
        cfg = self.config
        cc = self.runtime(Role.CC)
        registers: set[Role] = set()
        if self.runtime(Role.CLC) is not None:
            registers |= {Role.WALRUS, Role.CC, Role.SC}
        if cc is not None:
            registers.add(Role.NC)
        settings = RegistrarSettings(
            registers=frozenset(registers),
            own_cluster=cc.config.cluster if cc else None,
            observes_unmatched_nodes=self.runtime(Role.CLC) is not None,
        )
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(sqlite_url(cfg.database))
        master_key = read_or_create_secret(
            cfg.state_dir / "registrar.key", new_master_key().hex().encode()
        )
        admin_token = read_or_create_secret(
            cfg.state_dir / ADMIN_TOKEN_FILE, secrets.token_urlsafe(32).encode()
        ).decode()
        self.registrar = Registrar(
            self.store,
            settings,
            hook_dir=cfg.hook_dir,
            timing=Timing(cfg.pending_timeout, cfg.hook_timeout, cfg.retry_base, cfg.retry_max),
            issuer_for=self._issuer_for,
            self_registered=lambda: cc is not None and cc.registered,
            master_key=master_key,
        )
        await self.registrar.start()
        clc = self.runtime(Role.CLC)
        context = ApiContext(
            admin_token=admin_token,
            local_components=self.local_components,
            ca_fingerprint=self._ca_fingerprint,
            peer_key=clc.identity.key if clc else None,
        )
        app = build_app(self.registrar, context)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host=None, port=cfg.api_port, reuse_address=True)
        await site.start()
        log.info("registrar API listening on port %d", cfg.api_port)

    def local_components(self) -> list[dict[str, Any]]:
        return [
            {
                "role": c.role.value,
                "component_id": c.identity.component_id,
                "cluster": c.config.cluster,
                "address": str(c.config.address),
                "fingerprint": c.identity.fingerprint,
                "registered": c.registered,
                "announced": c.announced,
            }
            for c in self.components
        ]

    def _ca_fingerprint(self) -> str | None:
        """The cloud CA this host belongs to: its own on the CLC, else from cloud-cert.pem."""
        if self._cloud_cert is not None:
            return cred.cert_fingerprint(self._cloud_cert)
        path = self.config.key_dir / cred.CLOUD_CERT
        cc = self.runtime(Role.CC)
        if cc is None or not cc.registered or not path.exists():
            return None
        try:
            return cred.cert_fingerprint(cred.load_cert(path))
        except cred.CredentialError:
            return None

    def _issuer_for(self, role: Role) -> Issuer | None:
        if role is Role.NC:
            cc = self.runtime(Role.CC)
            if cc is None or not cc.registered:
                return None
            key_dir = self.config.key_dir
            return Issuer(
                key=cc.identity.key,
                cert=cred.load_cert(key_dir / cred.LAYOUTS[Role.CC].cert),
                cloud_cert=cred.load_cert(key_dir / cred.CLOUD_CERT),
            )
        clc = self.runtime(Role.CLC)
        if clc is None or self._cloud_cert is None:
            return None
        return Issuer(key=clc.identity.key, cert=self._cloud_cert, cloud_cert=self._cloud_cert)

    def _credentials_present(self, comp: ComponentRuntime) -> bool:
        return cred.credentials_present(self.config.key_dir, comp.role, comp.identity.key)

    # -- announcing -----------------------------------------------------------------------

    def _spec(self, comp: ComponentRuntime) -> ServiceSpec:
        cfg = self.config
        registered = comp.role is Role.CLC or comp.registered
        state = (
            AnnouncedState.REGISTERED
            if comp.role is Role.CC and registered
            else AnnouncedState.READY
        )
        serves_api = comp.role is Role.CLC or (comp.role is Role.CC and registered)
        record = txt.encode(
            role=comp.role,
            component_id=comp.identity.component_id,
            cluster=comp.config.cluster,
            state=state,
            address=comp.config.address,
            fingerprint=comp.identity.fingerprint,
            api_port=cfg.api_port if serves_api else None,
            eucavers=cfg.eucavers,
            token=self._token_proof(comp) if not registered else None,
        )
        # A registered CC announces on all its interfaces (design), so offer every address.
        addresses = (
            tuple(sorted({str(comp.config.address), *map(str, usable_addresses())}))
            if comp.role is Role.CC and registered
            else (str(comp.config.address),)
        )
        return ServiceSpec(
            instance=f"{comp.role.txt_type}-{comp.identity.component_id}",
            port=cfg.api_port,
            txt=record,
            addresses=addresses,
            server=f"eucareg-{str(comp.config.address).replace('.', '-').replace(':', '-')}.local.",
        )

    def _token_proof(self, comp: ComponentRuntime) -> tuple[str, int, str] | None:
        """(token id, stamp, proof) to announce; the stamp is renewed well within its life."""
        if comp.token is None:
            return None
        now = int(time.time())
        if now - comp.proof_stamp > PROOF_MAX_AGE / 3:
            comp.proof_stamp = max(now, comp.last_stamp + 1)
            comp.last_stamp = comp.proof_stamp
        message = proof_message(
            component_id=comp.identity.component_id,
            fingerprint=comp.identity.fingerprint,
            role=comp.role,
            cluster=comp.config.cluster,
            address=str(comp.config.address),
            stamp=comp.proof_stamp,
        )
        return comp.token.token_id, comp.proof_stamp, make_proof(comp.token.secret, message)

    async def _preconditions(self, comp: ComponentRuntime) -> str | None:
        """Why this component must not announce now, or None when it may."""
        installed = comp.config.installed
        if installed is not None and not installed.exists():
            return f"not installed ({installed} is missing)"
        sshd = self.config.sshd
        if sshd is not None and not await sshd_answers(*sshd):
            return f"sshd does not answer on {sshd[0]}:{sshd[1]}"
        return None

    async def _announce_loop(self, comp: ComponentRuntime) -> None:
        last_problem: str | None = "startup"
        while not self._stopping.is_set():
            if comp.role is not Role.CLC:
                present = self._credentials_present(comp)
                if present != comp.registered:
                    self._set_registered(comp, present)
            problem = await self._preconditions(comp)
            if problem is None:
                await self.backend.publish(self._spec(comp))
                if not comp.announced:
                    comp.announced = True
                    comp.changed.set()
                if last_problem is not None:
                    log.info("announcing %s %s", comp.role.value, comp.identity.component_id)
            elif comp.announced or last_problem == "startup":
                log.info("not announcing %s: %s", comp.role.value, problem)
                comp.announced = False
                comp.changed.set()
                await self.backend.withdraw(self._spec(comp).instance)
            last_problem = problem
            comp.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(comp.wake.wait(), self.config.recheck_interval)

    def _set_registered(self, comp: ComponentRuntime, registered: bool) -> None:
        comp.registered = registered
        if not registered:
            # A fresh proof makes a fresh TXT record; browsers may not report a record that
            # comes back unchanged within seconds.
            comp.proof_stamp = 0
        log.info(
            "%s %s is %s",
            comp.role.value,
            comp.identity.component_id,
            "registered" if registered else "no longer registered (credentials missing)",
        )
        comp.wake.set()
        comp.changed.set()
        if comp.role is Role.CC and self.registrar is not None and registered:
            self.registrar.self_registration_changed()

    # -- finding registrars ---------------------------------------------------------------

    def _on_sighting(self, sighting: Sighting) -> None:
        if sighting.change is Change.REMOVED:
            changed = bool(self._clc.pop(sighting.instance, None)) or bool(
                self._clusters.pop(sighting.instance, None)
            )
        else:
            ann = txt.decode(sighting.instance, sighting.txt, sighting.addresses)
            if not isinstance(ann, Announcement) or ann.api_port is None:
                return
            endpoint = Endpoint(str(ann.address), ann.api_port, ann.component_id, ann.fingerprint)
            if ann.role is Role.CLC:
                self._clc[sighting.instance] = endpoint
                changed = True
            elif ann.role is Role.CC and ann.state is AnnouncedState.REGISTERED and ann.cluster:
                self._clusters[sighting.instance] = (ann.cluster, endpoint)
                changed = True
            else:
                changed = False
        if changed:
            log.debug("registrars changed: %s %s", sighting.change.value, sighting.instance)
            self._registrars_changed.set()

    def _registrar_for(self, comp: ComponentRuntime) -> Endpoint | None:
        if comp.role is Role.NC:
            found = next(
                (ep for cluster, ep in self._clusters.values() if cluster == comp.config.cluster),
                None,
            )
            return found or self._fallback_endpoint()
        pin = self._pin(comp)
        candidates = [ep for ep in self._clc.values() if pin is None or ep.fingerprint == pin]
        if len(self._clc) > 1 and len(candidates) != 1:
            log.warning("more than one CLC announces itself: %s", list(self._clc))
        if not candidates and self._clc:
            log.warning(
                "no announced CLC has the CA key our token pins (%s); ignoring %s",
                pin,
                ", ".join(ep.address for ep in self._clc.values()),
            )
        if candidates:
            return candidates[0]
        return self._fallback_endpoint()

    def _fallback_endpoint(self) -> Endpoint | None:
        if self.config.fallback_registrar is None:
            return None
        host, port = self.config.fallback_registrar
        return Endpoint(host, port, component_id="", fingerprint="")

    # -- collecting credentials -----------------------------------------------------------

    async def _collect_loop(self, comp: ComponentRuntime) -> None:
        """Collect credentials while unregistered; once registered, watch for revocation."""
        delay = 1.0
        timeout = aiohttp.ClientTimeout(total=LONG_POLL + 10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stopping.is_set():
                if not comp.registered and not comp.announced:
                    comp.changed.clear()
                    await self._sleep(comp.changed, self.config.recheck_interval)
                    continue
                endpoint = self._registrar_for(comp)
                if endpoint is None:
                    self._registrars_changed.clear()
                    await self._sleep(self._registrars_changed, self.config.recheck_interval)
                    continue
                have = self._own_serial(comp) if comp.registered else None
                if not comp.registered and not endpoint.component_id:
                    # No registrar heard on the LAN: announce over HTTP (the design's fallback).
                    try:
                        await self._announce_over_http(session, comp, endpoint)
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        log.warning("fallback announcement to %s failed: %s", endpoint.address, exc)
                        await asyncio.sleep(delay)
                        delay = min(COLLECT_RETRY_MAX, delay * 2)
                        continue
                comp.changed.clear()
                request = asyncio.ensure_future(
                    collect_credentials(
                        session,
                        comp.identity,
                        comp.role,
                        endpoint,
                        self.config.key_dir,
                        have=have,
                        pin=self._pin(comp),
                    )
                )
                change = asyncio.ensure_future(comp.changed.wait())
                await asyncio.wait({request, change}, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
                if not request.done():
                    # Our own state moved (e.g. a credential file vanished): ask afresh.
                    request.cancel()
                    await asyncio.gather(request, return_exceptions=True)
                    continue
                try:
                    outcome = request.result()
                    delay = 1.0
                except (aiohttp.ClientError, TimeoutError, cred.CredentialError, ValueError) as exc:
                    log.warning(
                        "credentials for %s from %s:%d: %s",
                        comp.identity.component_id,
                        endpoint.address,
                        endpoint.port,
                        str(exc) or type(exc).__name__,
                    )
                    await asyncio.sleep(delay)
                    delay = min(COLLECT_RETRY_MAX, delay * 2)
                    continue
                if outcome == "written" and not comp.registered:
                    self._set_registered(comp, True)
                elif outcome == "revoked":
                    remove_credentials(self.config.key_dir, comp.role)
                    self._set_registered(comp, False)

    async def _announce_over_http(
        self, session: aiohttp.ClientSession, comp: ComponentRuntime, endpoint: Endpoint
    ) -> None:
        body, headers = signed_body(comp.identity.key, {"txt": dict(self._spec(comp).txt)})
        url = f"http://{endpoint.address}:{endpoint.port}/v1/announce"
        async with session.post(url, data=body, headers=headers) as response:
            data = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}: {data.get('error', data)}")
        log.info(
            "fallback announcement of %s to %s: %s (%s)",
            comp.identity.component_id,
            endpoint.address,
            data.get("status"),
            data.get("reason"),
        )

    def _pin(self, comp: ComponentRuntime) -> str | None:
        """The cloud CA this component accepts: its token's, else the configured one."""
        return comp.token.ca_fingerprint if comp.token else self.config.ca_fingerprint

    def _own_serial(self, comp: ComponentRuntime) -> str | None:
        try:
            cert = cred.load_cert(self.config.key_dir / cred.LAYOUTS[comp.role].cert)
        except cred.CredentialError:
            return None
        return format(cert.serial_number, "x")

    @staticmethod
    async def _sleep(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    # -- shutdown -------------------------------------------------------------------------

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close()
        if self.registrar is not None:
            await self.registrar.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.store is not None:
            self.store.close()
        log.info("agent stopped")

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


async def collect_credentials(
    session: aiohttp.ClientSession,
    identity: Identity,
    role: Role,
    endpoint: Endpoint,
    key_dir: Path,
    wait: float = LONG_POLL,
    have: str | None = None,
    pin: str | None = None,
) -> str:
    """One signed, long-polling credential request: "written", "pending", or, when watching
    credentials we hold (`have`: our certificate's serial), "unchanged" or "revoked".

    The signature proves we hold the announced key; the registrar answers only that key, and
    we accept only a bundle that certifies it and chains to the pinned CA, if any.
    """
    fields: dict[str, Any] = {"component_id": identity.component_id}
    if have is not None:
        fields["have"] = have
    body, headers = signed_body(identity.key, fields)
    url = f"http://{endpoint.address}:{endpoint.port}/v1/credentials?wait={wait:g}"
    log.debug("requesting credentials for %s from %s", identity.component_id, url)
    async with session.post(url, data=body, headers=headers) as response:
        data = await response.json(content_type=None)
        if response.status == 410 and have is not None:
            log.warning("credentials of %s revoked: %s", identity.component_id, data.get("error"))
            return "revoked"
        if response.status == 202:
            log.debug("%s not registered yet: %s", identity.component_id, data)
            return "pending"
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}: {data.get('error', data)}")
    files = cred.verify_bundle(data["files"], role, identity.key)
    if pin is not None:
        ca = cred.cert_fingerprint(cred.load_cert_pem(files[cred.CLOUD_CERT]))
        if ca != pin:
            raise cred.CredentialError(
                f"registrar at {endpoint.address} belongs to CA {ca}, but our token pins {pin}: "
                "refusing a rogue registrar"
            )
    if have is not None and cred.load_cert_pem(files[cred.LAYOUTS[role].cert]).serial_number == int(
        have, 16
    ):
        return "unchanged"
    cred.write_credentials(key_dir, role, files)
    log.info("credentials for %s %s written to %s", role.value, identity.component_id, key_dir)
    return "written"


def remove_credentials(key_dir: Path, role: Role) -> None:
    """Drop a deregistered component's own certificate and key copy (never cloud-cert.pem,
    which other components on the host may share)."""
    layout = cred.LAYOUTS[role]
    for name in (layout.cert, layout.key):
        (key_dir / name).unlink(missing_ok=True)


def read_or_create_secret(path: Path, fresh: bytes) -> bytes:
    """A root-only secret file, made once (the admin credential, the token master key)."""
    if path.exists():
        return path.read_bytes().strip()
    cred.write_atomic(path, fresh + b"\n")
    return fresh


async def sshd_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when an SSH server answers with its banner (the design's "sshd is running")."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        banner = await asyncio.wait_for(reader.readline(), timeout)
        # Say who we are, so sshd logs a named probe rather than a mystery connection.
        writer.write(b"SSH-2.0-eucareg-precondition-probe\r\n")
        await writer.drain()
    except (OSError, TimeoutError):
        banner = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return banner.startswith(b"SSH-")
