"""One component of this host at run time: its state (registered, announced, the credentials and
cloud CA it holds, whom it accepts as its registrar) and its announce loop, announcing while its
preconditions hold. Its collect loop is eucareg/agent/collector.py's; both wait for events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from eucareg.config.components import ComponentConfig
from eucareg.config.file import Config
from eucareg.core.model import Role
from eucareg.core.trust import parse_token
from eucareg.mdns.types import Announcer, ServiceSpec
from eucareg.pki import certificates, keypairs, names, tls
from eucareg.pki import credentials as cred

from . import collect
from .announce import TokenProver, instance_name, preconditions, service_spec
from .euca_keys import EucaKeys
from .identity import Identity, identity_key
from .locate import Endpoint
from .presence import CredentialPresence, HeldRoot, write_client_chain
from .timing import AgentTiming, Backoff, wait_event
from .watch import FileWatch

log = logging.getLogger(__name__)


class Component:
    """A component's state and announce loop; the Agent runs the loop under its Supervisor
    (and the component's Collector's collect loop beside it)."""

    def __init__(
        self,
        cfg: Config,
        conf: ComponentConfig,
        identity: Identity,
        *,
        announcer: Announcer,
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
        self.client_cert: tls.ClientCert | None = None  # presented once we are registered
        self.registered = False
        self.announced = False
        self.wake = asyncio.Event()  # re-check preconditions and credentials now
        self.changed = asyncio.Event()  # `announced` or `registered` moved
        self._announcer = announcer
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

    # -- trust ----------------------------------------------------------------------------

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
