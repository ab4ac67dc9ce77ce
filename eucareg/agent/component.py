"""One component of this host at run time: its state (registered, announced) and its two loops,
announcing while its preconditions hold, and collecting its credentials (or, once it holds
them, watching for their revocation). Both wait for events, not timers; failures back off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp

from eucareg.config.components import ComponentConfig
from eucareg.config.file import Config
from eucareg.core.model import Role
from eucareg.core.trust import parse_token
from eucareg.mdns.types import Announcer, ServiceSpec
from eucareg.pki import certificates, keypairs, names, tls
from eucareg.pki import credentials as cred

from . import collect, expiry
from .announce import TokenProver, instance_name, preconditions, service_spec
from .euca_keys import EucaKeys
from .identity import Identity, identity_key
from .locate import Endpoint, Registrars
from .presence import CredentialPresence, HeldRoot, write_client_chain
from .timing import AgentTiming, Backoff, first_of, wait_event
from .watch import FileWatch

log = logging.getLogger(__name__)


class Component:
    """A component's state and loops; the Agent runs the loops under its Supervisor."""

    def __init__(
        self,
        cfg: Config,
        conf: ComponentConfig,
        identity: Identity,
        *,
        announcer: Announcer,
        registrars: Registrars,
        session: Callable[[], aiohttp.ClientSession],
        api_port: Callable[[], int],
        on_registered: Callable[[Component], None],
        timing: AgentTiming,
    ) -> None:
        self.cfg, self.conf, self.identity = cfg, conf, identity
        self.prover = TokenProver(parse_token(conf.token)) if conf.token else None
        self.presence = CredentialPresence(cfg.key_dir, conf.role, identity.key)
        self.root = HeldRoot(cfg.key_dir / cred.CLOUD_CERT)
        self.chain = collect.HeldChain()  # the chain we hold, sent with each watch
        # Eucalyptus's own key files, asked for with our credentials when configured.
        self.euca = (
            EucaKeys(cfg.eucalyptus, conf.role, conf.cluster, cfg.key_dir)
            if cfg.eucalyptus.deliver and conf.role is not Role.CLC
            else None
        )
        self._proven: Endpoint | None = None  # the registrar that last proved itself
        self.client_cert: tls.ClientCert | None = None  # presented once we are registered
        self.registered = False
        self.announced = False
        self.wake = asyncio.Event()  # re-check preconditions and credentials now
        self.changed = asyncio.Event()  # `announced` or `registered` moved
        self._announcer = announcer
        self._registrars = registrars
        self._session = session
        self._api_port = api_port
        self._on_registered = on_registered
        self._timing = timing

    @property
    def role(self) -> Role:
        return self.conf.role

    @property
    def instance(self) -> str:
        return instance_name(self.conf, self.identity)

    @property
    def pin(self) -> str | None:
        """The cloud CA this component accepts: its token's, else the configured one."""
        return self.prover.token.ca_fingerprint if self.prover else self.cfg.ca_fingerprint

    def spec(self) -> ServiceSpec:
        return service_spec(
            self.cfg,
            self.conf,
            self.identity,
            registered=self.registered,
            api_port=self._api_port(),
            prover=self.prover,
        )

    async def load_state(self) -> None:
        """The state found at start: registered if the credentials are already there."""
        await self.root.check()
        self.registered = (await self.presence.check()).present
        await self._refresh_client_cert()

    def watched(self) -> list[Path]:
        """The files whose change may change what this component does: its credentials
        (which the CLC makes itself, so it does not watch them) and its `installed` file."""
        role, key_dir = self.role, self.cfg.key_dir
        paths = [] if role is Role.CLC else [key_dir / n for n in cred.required_files(role)]
        if self.conf.installed is not None:
            paths.append(self.conf.installed)
        return paths

    async def refresh(self) -> None:
        """Re-check key presence (cheap unless the files changed) and act on a change."""
        root, now_root = self.root.cert, await self.root.check()
        renewed_root = root is not None and now_root is not None and now_root != root
        before = self.presence.held
        held = await self.presence.check()
        if held.present != self.registered:
            self.set_registered(held.present)
        elif held.present and before.present and (held != before or renewed_root):
            # Renewed in place (another serial, or another chain above it): still registered,
            # no hook; the host serves its new certificate and hands on the new chain.
            log.info("%s %s holds renewed credentials", self.role.value, self.instance)
            self._on_registered(self)
        await self._refresh_client_cert()

    async def _refresh_client_cert(self) -> None:
        """The TLS client certificate we present once registered (docs/security.md)."""
        held = self.presence.held
        if not (self.registered and held.present and held.serial):
            self.client_cert = None
            return
        if self.client_cert is not None and self.client_cert.serial == held.serial:
            return
        path = self.cfg.state_dir / "tls" / f"{self.role.value}-client.pem"
        try:
            await asyncio.to_thread(write_client_chain, self.cfg.key_dir, self.role, path)
        except (OSError, keypairs.CredentialError) as exc:
            log.warning("cannot present %s's certificate over TLS: %s", self.instance, exc)
            self.client_cert = None
            return
        self.client_cert = tls.ClientCert(path, identity_key(self.cfg, self.role), held.serial)

    def set_registered(self, registered: bool) -> None:
        self.registered = registered
        if not registered and self.prover is not None:
            self.prover.renew()
        log.info(
            "%s %s is %s",
            self.role.value,
            self.identity.component_id,
            "registered" if registered else "no longer registered (credentials missing)",
        )
        self.wake.set()
        self.changed.set()
        self._on_registered(self)

    # -- announcing -----------------------------------------------------------------------

    async def announce_loop(self) -> None:
        # Armed before the first round: a change from here on wakes us, none is missed.
        with FileWatch(self.watched(), self.wake.set) as files:
            await self._announce(files)

    def _recheck(self, files: FileWatch) -> float | None:
        """The longest we wait before checking again unwoken: only what nothing tells us of is
        polled, sshd (if configured) and the files where they cannot be watched; else never."""
        if files.polling or self.cfg.sshd is not None:
            return self.cfg.recheck_interval
        return None

    async def _announce(self, files: FileWatch) -> None:
        last_problem: str | None = "startup"
        backoff = Backoff(self._timing.retry_base, self._timing.retry_max)
        while True:
            self.wake.clear()
            if self.role is not Role.CLC:
                await self.refresh()
            problem = await preconditions(self.cfg, self.conf)
            try:
                await self._apply(problem, last_problem)
            except OSError as exc:
                # The mDNS sockets failed under us (an interface went away, say).
                log.warning("announcing %s %s failed: %s", self.role.value, self.instance, exc)
                await backoff.sleep()
                continue
            backoff.reset()
            last_problem = problem
            await wait_event(self.wake, self._recheck(files))

    async def _apply(self, problem: str | None, last_problem: str | None) -> None:
        if problem is None:
            await self._announcer.publish(self.spec())
            if not self.announced:
                self.announced = True
                self.changed.set()
            if last_problem is not None:
                log.info("announcing %s %s", self.role.value, self.identity.component_id)
        elif self.announced or last_problem == "startup":
            log.info("not announcing %s: %s", self.role.value, problem)
            self.announced = False
            self.changed.set()
            await self._announcer.withdraw(self.instance)

    # -- collecting -----------------------------------------------------------------------

    async def collect_loop(self) -> None:
        """Collect credentials while unregistered; once registered, watch for revocation."""
        backoff = Backoff(self._timing.retry_base, self._timing.retry_max)
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before reading our state, so a change from here on is never missed.
            self.changed.clear()
            if not self.registered and not self.announced:
                await self.changed.wait()
                continue
            held = self.presence.held
            issuer = held.issuer_fingerprint if self.registered else None
            # Once registered, the CA we hold decides (expect()); a token's or the
            # configuration's pin must not hide the registrar that certified us.
            endpoints = self._registrars.candidates(
                self.role,
                self.conf.cluster,
                pin=None if self.registered else self.pin,
                issuer=issuer,
            )
            if not endpoints:
                # Woken by a registrar heard, our own change, or the fallback's time coming.
                wait = self._registrars.wait_changed(self._registrars.fallback_in())
                await first_of(wait, self.changed.wait())
                continue
            started = loop.time()
            try:
                outcome = await self._ask_each(endpoints, held.serial if self.registered else None)
                if outcome is not None:
                    await self._settle(outcome)
            except collect.COLLECT_ERRORS as exc:
                asked = getattr(exc, "retry_after", None)
                delay = backoff.next(at_least=asked)
                log.warning(
                    "collecting credentials of %s failed: %s; retrying in %.1f s%s",
                    self.identity.component_id,
                    str(exc) or type(exc).__name__,
                    delay,
                    await expiry.held_note(self.cfg.key_dir, self.role) if self.registered else "",
                )
                # A registrar heard meanwhile cuts the wait short: after a decoy, the genuine
                # registrar is asked as soon as it announces itself. Not sooner than a second,
                # though: a decoy that re-announces itself all the time must not make us
                # hammer it (or anyone) in a loop. A registrar's own Retry-After is waited out.
                floor = delay if asked else min(delay, self._timing.min_request_interval)
                await asyncio.sleep(floor)
                await self._registrars.wait_changed(delay - floor)
                continue
            backoff.reset()
            # None: our own state moved (a credential file vanished, say), so we ask afresh.
            if outcome in (
                collect.Outcome.PENDING,
                collect.Outcome.UNCHANGED,
                collect.Outcome.RENEWED,
            ):
                # A registrar answering at once (woken, or not holding requests) is not asked
                # again straight away, or we would spin on it.
                pause = self._timing.min_request_interval - (loop.time() - started)
                if pause > 0:
                    await wait_event(self.changed, pause)

    def expect(self, endpoint: Endpoint) -> tls.Expect:
        """Whom we accept as `endpoint`: once we hold a cloud CA, only a registrar it signed
        (the pin sticks); before, the token's or the configuration's pin, if any."""
        root, pin = self.root.cert, self.pin
        if root is None and (self.registered or self.root.unusable):
            # A damaged or vanished pin must not turn into trusting the first to answer.
            raise keypairs.CredentialError(
                f"{self.root.path} is missing or not a CA certificate we can pin; refusing "
                "every registrar until it is restored (or removed together with this "
                "component's credentials, to join a cloud afresh)"
            )
        joining = root is not None and pin is not None and not self.registered
        if joining and root is not None and certificates.cert_fingerprint(root) != pin:
            root = None  # joining another cloud with a token that says so: the token decides
        return tls.Expect(
            Role.CC if self.role is Role.NC else Role.CLC,
            cluster=self.conf.cluster if self.role is Role.NC else None,
            component_id=endpoint.component_id or None,
            root=root,
            pin=None if root is not None else pin,
        )

    def named(self) -> names.CertIdentity:
        """What our certificate must name."""
        cluster = self.conf.cluster if self.role in (Role.CC, Role.SC, Role.NC) else None
        return names.CertIdentity(self.role, cluster, self.identity.component_id)

    async def _ask_each(
        self, endpoints: list[Endpoint], have: str | None
    ) -> collect.Outcome | None:
        """Ask the candidates in turn, the one that last proved itself first, until one that
        proves itself answers: a decoy costs one connect timeout, a rogue one handshake."""
        if self._proven in endpoints:
            endpoints = [self._proven, *(ep for ep in endpoints if ep != self._proven)]
        problems: list[str] = []
        asked: list[float] = []  # the Retry-After of each registrar that sent us away
        for endpoint in endpoints:
            try:
                outcome = await self._ask(endpoint, have)
            except collect.COLLECT_ERRORS as exc:
                if self._proven == endpoint:
                    self._proven = None
                problems.append(f"{endpoint.url}: {_reason(exc)}")
                later = getattr(exc, "retry_after", None)
                if later is not None:
                    asked.append(later)
                if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                    log.warning(
                        "refusing registrar %s for %s: %s",
                        endpoint.url,
                        self.identity.component_id,
                        _reason(exc),
                    )
                elif len(endpoints) > 1:
                    log.info("no usable answer from registrar %s: %s", endpoint.url, _reason(exc))
                continue
            self._proven = endpoint
            return outcome
        # Asked again when the first registrar that sent us away will have us back.
        raise collect.ProtocolError("; ".join(problems), min(asked) if asked else None)

    async def _ask(self, endpoint: Endpoint, have: str | None) -> collect.Outcome | None:
        """Announce over HTTP if need be, then one credential request; None when our own state
        changes meanwhile (the request is abandoned)."""
        session = self._session()
        watch, poll = self._timing.watch_poll, self._timing.long_poll
        if not endpoint.component_id:
            # No registrar heard on the LAN: announce over HTTP (the design's fallback), and
            # keep doing so once registered, or the registrar stops hearing us (what waits
            # on us, our SC for one, would wait again).
            client = self.client_cert if have is not None else None
            try:
                refresh = await collect.announce_over_http(
                    session,
                    self.identity,
                    endpoint,
                    self.spec().txt,
                    self.expect(endpoint),
                    client,
                )
            except collect.COLLECT_ERRORS as exc:
                reason = str(exc) or type(exc).__name__
                if have is None:
                    raise collect.ProtocolError(
                        f"fallback announcement failed: {reason}",
                        getattr(exc, "retry_after", None),
                    ) from exc
                # Registered: the watch below must still go out, or a revocation is never
                # heard; the report is tried again after the watch.
                log.warning("report of %s to %s failed: %s", self.instance, endpoint.url, reason)
                refresh = collect.DEFAULT_REFRESH
            # Asked again within the registrar's refresh, so that its lease never lapses.
            watch, poll = min(watch, refresh), min(poll, refresh)
        request = asyncio.create_task(
            collect.collect_credentials(
                session,
                self.identity,
                self.role,
                endpoint,
                self.cfg.key_dir,
                # Watching, the request is held until revoked: a few minutes per request.
                wait=watch if have is not None else poll,
                have=have,
                expect=self.expect(endpoint),
                named=self.named(),
                client=self.client_cert if have is not None else None,
                euca=self.euca,
                chain=self.chain,
            )
        )
        change = asyncio.create_task(self.changed.wait())
        try:
            await asyncio.wait({request, change}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Both are ours: neither outlives this call, even when we are cancelled.
            for task in (change, request):
                if not task.done():
                    task.cancel()
            await asyncio.wait({request, change})
            if not request.cancelled():
                request.exception()  # retrieved here, even if we are cancelled and drop it
        if request.cancelled():
            return None
        return request.result()

    async def _settle(self, outcome: collect.Outcome) -> None:
        if outcome in (collect.Outcome.WRITTEN, collect.Outcome.RENEWED):
            # Verify what was written, through the same cache the re-checks use.
            await self.refresh()
            if not self.registered:
                log.warning("credentials for %s were written but do not verify", self.instance)
        elif outcome is collect.Outcome.REVOKED:
            collect.remove_credentials(self.cfg.key_dir, self.role)
            await self.refresh()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return str(exc.certificate_error)
    return str(exc) or type(exc).__name__
