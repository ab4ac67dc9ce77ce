"""The registrar a host runs when it holds the CLC or a CC: its store, secrets and HTTP API, and
the issuers that sign the certificates it hands out. Started and closed with the agent; closing
wakes every held long-poll and bounds how long the API waits for handlers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from eucareg.api.app import ApiContext, build_app
from eucareg.api.limits import RateLimits
from eucareg.api.pacing import PacedTLSSite, Pacer
from eucareg.config.file import SOCKET_FILE, Config
from eucareg.core.model import Role
from eucareg.core.trust import new_master_key
from eucareg.core.view import RegistrarSettings
from eucareg.pki import certificates, handover, keypairs, tls
from eucareg.pki import credentials as cred
from eucareg.registrar.batch import Batching
from eucareg.registrar.engine import Issuer, Registrar, Retention, Timing
from eucareg.registrar.euca_keys import EucaKeySource
from eucareg.registrar.quietgc import QuietCollector
from eucareg.store.registry import Store, sqlite_url

from .cloudca import CloudCA
from .component import Component
from .identity import identity_key, read_or_create_secret

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
MASTER_KEY_FILE = "registrar.key"
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (sun_path, with its terminating NUL)


class RegistrarService:
    """The registrar and its API on this host (the CLC's, a CC's, or one doing both)."""

    def __init__(
        self,
        cfg: Config,
        *,
        clc: Component | None,
        cc: Component | None,
        cloud_cert: x509.Certificate | None,
        local_components: Callable[[], list[dict[str, Any]]],
        shutdown_timeout: float,
        mdns: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self._mdns = mdns
        self._clc, self._cc, self._cloud_cert = clc, cc, cloud_cert
        self._local_components = local_components
        self._shutdown_timeout = shutdown_timeout
        self.store: Store | None = None
        self.registrar: Registrar | None = None
        self._runner: web.AppRunner | None = None
        self._collector: QuietCollector | None = None
        self._site: PacedTLSSite | None = None
        self._contexts: dict[Role, ssl.SSLContext] = {}
        self._pacer: Pacer | None = None
        self._tls_lock = asyncio.Lock()
        self._ca: CloudCA | None = None  # the CLC's: renewed when due (agent/cloudca.py)
        self._ca_task: asyncio.Task[None] | None = None
        # When a CA handover ends: the contexts are built again without the old CA, which a
        # context keeps trusting for client certificates for as long as it is in use.
        self._overlap_timer: asyncio.TimerHandle | None = None
        self._overlap_task: asyncio.Task[None] | None = None
        self.port = cfg.api_port  # the bound port once started (differs only for port 0)

    async def start(self) -> None:
        cfg, cc = self.cfg, self._cc
        registers: set[Role] = set()
        if self._clc is not None:
            registers |= {Role.WALRUS, Role.CC, Role.SC}
        if cc is not None:
            registers.add(Role.NC)
        settings = RegistrarSettings(
            registers=frozenset(registers),
            own_cluster=cc.conf.cluster if cc else None,
            observes_unmatched_nodes=self._clc is not None,
            replace_after=cfg.replace_after,
            max_unadmitted=cfg.max_unadmitted,
            allowed_ranges=cfg.allowed_ranges,
            own_clc=self._clc.identity.component_id if self._clc else None,
        )
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if self._clc is not None and self._cloud_cert is not None:
            self._ca = CloudCA(
                cfg.key_dir, self._clc.identity.key, self._cloud_cert, self._ca_changed
            )
            await self._ca.check()  # renewed now if it is due
        master_key = await asyncio.to_thread(
            read_or_create_secret, cfg.state_dir / MASTER_KEY_FILE, new_master_key().hex().encode()
        )
        admin_token = await asyncio.to_thread(
            read_or_create_secret,
            cfg.state_dir / ADMIN_TOKEN_FILE,
            secrets.token_urlsafe(32).encode(),
        )
        # Opening may migrate the schema and copy the database first: not on the event loop.
        self.store = await asyncio.to_thread(Store, sqlite_url(cfg.database))
        self.registrar = Registrar(
            self.store,
            settings,
            hook_dir=cfg.hook_dir,
            timing=Timing(
                cfg.pending_timeout,
                cfg.hook_timeout,
                cfg.retry_base,
                cfg.retry_max,
                cfg.report_interval,
            ),
            issuer_for=self._issuer_for,
            self_registered=lambda: cc is not None and cc.registered,
            master_key=master_key,
            retention=Retention(cfg.keep_history, cfg.max_events, cfg.max_hook_runs),
            hooks_at_once=cfg.max_hooks_running,
            batching=Batching(cfg.batch_hooks, cfg.batch_max, cfg.batch_wait),
            # Eucalyptus's own key files, served with credentials only when configured.
            euca_keys=(EucaKeySource(cfg.eucalyptus.keys_dir) if cfg.eucalyptus.deliver else None),
        )
        await self.registrar.start()
        context = ApiContext(
            admin_token=admin_token.decode(),
            local_components=self._local_components,
            ca_fingerprint=self._ca_fingerprint,
            peer_key=self._clc.identity.key if self._clc else None,
            cloud_cert=self._cloud_cert,
            limits=RateLimits(cfg.rate_limit, cfg.rate_burst, cfg.rate_sources, cfg.max_in_flight),
            **({"mdns": self._mdns} if self._mdns is not None else {}),
        )
        # A small shutdown_timeout: held long-polls are woken by registrar.close(), and what
        # still runs after that is cut rather than waited for (SIGTERM must stop us quickly).
        # One pacer for the HTTPS port's handshakes and its requests (api/pacing.py).
        self._pacer = Pacer(asyncio.get_running_loop())
        self._runner = web.AppRunner(
            build_app(self.registrar, context, self._pacer),
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await self._runner.setup()
        await self._serve_operator()
        await self.refresh_tls()
        self._collector = QuietCollector(lambda: self.registrar.busy_at if self.registrar else 0.0)
        self._collector.start()
        if self._ca is not None:
            self._ca_task = asyncio.get_running_loop().create_task(self._ca.run())

    async def _ca_changed(self) -> None:
        """The cloud CA certificate was renewed (same key): serve it, and hand it on."""
        assert self._ca is not None
        self._cloud_cert = self._ca.cert
        if self._site is not None:
            await self.refresh_tls()
        if self.registrar is not None:
            self.registrar.desk.chain_changed()

    async def _serve_operator(self) -> None:
        """The operator's socket: every route, for root on this host (docs/cli.md)."""
        assert self._runner is not None
        path = self.socket_path
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise OSError(f"the operator socket path {path} is too long for a Unix socket")
        site = web.UnixSite(self._runner, str(path))
        await site.start()
        await asyncio.to_thread(os.chmod, path, 0o600)
        log.info("operator API on %s", path)

    @property
    def socket_path(self) -> Path:
        return self.cfg.state_dir / SOCKET_FILE

    async def refresh_tls(self) -> None:
        """Serve HTTPS on the API port once this host's registrar holds its certificate: the
        CLC at once (its cloud CA names it), a CC once registered. Called again whenever the
        CC's registration changes; a CC that loses it stops serving components."""
        async with self._tls_lock:
            contexts, overlap_ends = await asyncio.to_thread(self._tls_contexts)
            self._contexts = contexts
            self._end_overlap_at(overlap_ends)
            if not contexts:
                if self._site is not None:
                    await self._site.stop()
                    self._site = None
                    log.info("registrar API closed: this host holds no registrar certificate")
                return
            default = contexts.get(Role.CLC) or contexts[Role.CC]
            if self._site is not None:
                return  # the front context picks up self._contexts at every handshake
            assert self._runner is not None
            default.sni_callback = self._choose
            self._site = PacedTLSSite(
                self._runner,
                host=None,
                port=self.port,
                reuse_address=True,
                ssl_context=default,
                pacer=self._pacer,
            )
            await self._site.start()
            self.port = self._bound_port()
            log.info(
                "registrar API (HTTPS, as %s) listening on port %d",
                " and ".join(sorted(r.value for r in contexts)),
                self.port,
            )

    def _choose(self, sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        """SNI: a component asking for the CLC or for a CC gets that registrar's certificate."""
        for role, server_name in tls.SERVER_NAMES.items():
            if name == server_name and role in self._contexts:
                sslobj.context = self._contexts[role]
                return
        # Anything else (or no name) gets the default certificate, the client decides; from
        # the contexts built last, not the site's first (which trusts what it trusted then:
        # the old CA of a handover that has ended, say).
        current = self._contexts.get(Role.CLC) or self._contexts.get(Role.CC)
        if current is not None:
            sslobj.context = current

    def _end_overlap_at(self, ends: float | None) -> None:
        """Build the contexts again (without the old CA) once the handover they trust ends."""
        pending = self._overlap_timer is not None
        if self._overlap_timer is not None:
            self._overlap_timer.cancel()
            self._overlap_timer = None
        if ends is None and pending and self.registrar is not None:
            # Another refresh saw the end first (a certificate's end is whole seconds, the
            # timer a second after it): its bundles drop the handover all the same.
            self.registrar.desk.chain_changed()
        if ends is not None:
            # A second late: the handover must be over by the clock load_held_cached reads.
            delay = max(0.0, ends - time.time()) + 1.0
            loop = asyncio.get_running_loop()
            self._overlap_timer = loop.call_later(delay, self._overlap_ended)

    def _overlap_ended(self) -> None:
        self._overlap_timer = None
        log.info("the cloud CA handover ended: certificates of the old CA are refused from now")
        self._overlap_task = asyncio.get_running_loop().create_task(self._after_overlap())

    async def _after_overlap(self) -> None:
        await self.refresh_tls()
        if self.registrar is not None:
            self.registrar.desk.chain_changed()  # bundles no longer carry the handover

    def _tls_contexts(self) -> tuple[dict[Role, ssl.SSLContext], float | None]:
        """Build the server contexts from the certificates held now (blocking: files), and
        when the earliest handover they trust ends (None: none)."""
        cfg = self.cfg
        out: dict[Role, ssl.SSLContext] = {}
        ends: list[float] = []
        tls_dir = cfg.state_dir / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        if self._clc is not None and self._cloud_cert is not None:
            # While the CA key hands over: the cross-certificate and the old CA after ours,
            # and the old CA's certificates still accepted from components not moved yet.
            passed = self._handover(self._cloud_cert)
            ends += [passed.ends] if passed else []
            tls.write_chain(tls_dir / "clc.pem", [self._cloud_cert, *_certs(passed)])
            out[Role.CLC] = tls.server_context(
                tls_dir / "clc.pem",
                identity_key(cfg, Role.CLC),
                client_ca=self._cloud_cert,
                also_trusted=passed.old if passed else None,
            )
        cc = self._cc
        if cc is not None and cc.registered:
            try:
                own = certificates.load_cert(cfg.key_dir / cred.LAYOUTS[Role.CC].cert)
                root = certificates.load_cert(cfg.key_dir / cred.CLOUD_CERT)
                passed = self._handover(root)
                ends += [passed.ends] if passed else []
                tls.write_chain(tls_dir / "cc.pem", [own, root, *_certs(passed)])
                out[Role.CC] = tls.server_context(
                    tls_dir / "cc.pem",
                    identity_key(cfg, Role.CC),
                    client_ca=root,
                    also_trusted=passed.old if passed else None,
                )
            except (keypairs.CredentialError, ssl.SSLError, OSError) as exc:
                log.warning("cannot serve as the CC yet: %s", exc)
        return out, min(ends, default=None)

    def _handover(self, root: x509.Certificate) -> handover.Handover | None:
        """The handover to `root` held in key_dir, while it runs (blocking: the file)."""
        return handover.load_held_cached(self.cfg.key_dir / handover.HANDOVER, root, time.time())

    def _bound_port(self) -> int:
        """The IPv4 port (with port 0, the IPv4 and IPv6 sockets get different ones)."""
        assert self._runner is not None
        for address in self._runner.addresses:
            if isinstance(address, tuple) and len(address) == 2:
                return int(address[1])
        return self.cfg.api_port

    async def close(self) -> None:
        """Wake held long-polls and kill running hooks, then stop the API, then the store."""
        try:
            if self._overlap_timer is not None:
                self._overlap_timer.cancel()
            for task in (self._ca_task, self._overlap_task):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self._collector is not None:
                await self._collector.stop()
            if self.registrar is not None:
                try:
                    await asyncio.wait_for(self.registrar.close(), self._shutdown_timeout * 2)
                except TimeoutError:
                    log.warning("the registrar did not close within %.1f s", self._shutdown_timeout)
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            if self.store is not None:
                self.store.close()

    def _ca_fingerprint(self) -> str | None:
        """The cloud CA this host belongs to: its own on the CLC, else the one its registered
        CC holds (known from the CC's last credential check; nothing is read here)."""
        if self._cloud_cert is not None:
            return certificates.cert_fingerprint(self._cloud_cert)
        cc = self._cc
        if cc is None or not cc.registered:
            return None
        return cc.presence.held.issuer_fingerprint

    def _issuer_for(self, role: Role) -> Issuer | None:
        if role is Role.NC:
            cc = self._cc
            if cc is None or not cc.registered:
                return None
            key_dir = self.cfg.key_dir
            root = certificates.load_cert_cached(key_dir / cred.CLOUD_CERT)
            passed = self._handover(root)  # our CC's, handed on to its nodes
            return Issuer(
                key=cc.identity.key,
                cert=certificates.load_cert_cached(key_dir / cred.LAYOUTS[Role.CC].cert),
                cloud_cert=root,
                policy=self.cfg.certificates,
                handover=passed.pem() if passed else None,
            )
        if self._clc is None or self._cloud_cert is None:
            return None
        passed = self._handover(self._cloud_cert)
        return Issuer(
            key=self._clc.identity.key,
            cert=self._cloud_cert,
            cloud_cert=self._cloud_cert,
            policy=self.cfg.certificates,
            handover=passed.pem() if passed else None,
        )


def _certs(passed: handover.Handover | None) -> list[x509.Certificate]:
    return passed.certs() if passed is not None else []
