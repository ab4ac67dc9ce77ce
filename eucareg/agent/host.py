"""The per-host agent: loads this host's component identities, runs the registrar when the host
holds the CLC or a CC, and owns every background task from start to stop. SIGTERM stops it
within a few seconds: goodbyes first, then the API (long-polls cut), then the sessions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from eucareg.config.file import Config
from eucareg.core.model import IPAddress, Role
from eucareg.mdns.choice import ChosenBackend
from eucareg.mdns.types import Announcer, Sighting, Watcher
from eucareg.pki import tls

from .collect import collect_credentials
from .collector import Collector
from .component import Component
from .greet import Serving, greeting_for
from .identity import Identity, ensure_cloud_ca, load_or_create_identity, read_or_create_secret
from .locate import Endpoint, Registrars
from .sessions import Sessions
from .statedir import secure_state_dir
from .systemd import Notifier, status_line
from .tasks import AgentFailed, RestartPolicy, Supervisor
from .timing import AgentTiming

# What other packages import from here (bench, the CLI, the lab), wherever it now lives.
__all__ = [
    "Agent",
    "AgentFailed",
    "AgentTiming",
    "Endpoint",
    "Identity",
    "MdnsBackend",
    "collect_credentials",
    "load_or_create_identity",
    "read_or_create_secret",
]

if TYPE_CHECKING:  # the registrar side (SQLAlchemy, aiohttp's server) loads only when used
    from eucareg.registrar.engine import Registrar

    from .service import RegistrarService

log = logging.getLogger(__name__)


class MdnsBackend(Announcer, Watcher, Protocol):
    """What the agent needs of mDNS: a ChosenBackend (python-zeroconf or Avahi), or a fake."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


def choose_backend(config: Config) -> MdnsBackend:
    """mDNS through the backend `[mdns] backend` names (`auto`: Avahi when it runs in this
    network namespace, python-zeroconf otherwise; chosen at start); or, with a `[dnssd]` table,
    DNS-SD through the site's DNS server as well (or instead, with `dnssd.mdns = false`).
    dnspython is loaded only then."""
    mdns = ChosenBackend(config.mdns_backend, ipv6=config.ipv6)
    if config.dnssd is None:
        return mdns
    from eucareg.dnssd.backend import DnssdBackend
    from eucareg.dnssd.composite import CompositeBackend

    # A host without a registrar looks only for registrars (CLCs and registered CCs).
    dnssd = DnssdBackend(config.dnssd, registrars_only=not config.runs_registrar)
    if not config.dnssd.mdns:
        return dnssd
    return CompositeBackend([mdns, dnssd])


def mdns_in_use(backend: object) -> dict[str, Any]:
    """What `eucareg status` shows under "mdns": the backend in use, the setting, and why."""
    for part in [backend, *getattr(backend, "backends", ())]:
        if isinstance(part, ChosenBackend):
            return part.describe()
    return {"backend": "none", "setting": None, "reason": "no mDNS (dnssd.mdns = false)"}


class Agent:
    """Everything one host runs, started and stopped as a unit.

    A background task that dies is logged and restarted by the Supervisor; one that keeps
    dying makes run_forever stop the agent and raise AgentFailed (exit status non-zero), as
    does a task failing while the agent stops.
    """

    def __init__(
        self,
        config: Config,
        *,
        backend: MdnsBackend | None = None,
        timing: AgentTiming | None = None,
        restart: RestartPolicy | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.backend: MdnsBackend = backend or choose_backend(config)
        self.timing = timing or AgentTiming()
        self.supervisor = Supervisor(restart)
        self.registrars = Registrars(
            config.fallback_registrar,
            config.allowed_ranges,
            fallback_after=config.fallback_after,
            fallback_spread=self.timing.fallback_spread,
        )
        self.components: list[Component] = []
        self.service: RegistrarService | None = None
        self.sessions: Sessions | None = None
        self._stopped = False
        self._tls_due = asyncio.Event()
        self._deadline = 0.0  # loop time by which stop() must be done
        # Read (and unset) now, before any hook can be started: docs/systemd.md.
        self.notifier = notifier if notifier is not None else Notifier.from_environment()

    @property
    def registrar(self) -> Registrar | None:
        return self.service.registrar if self.service else None

    def runtime(self, role: Role) -> Component | None:
        return next((c for c in self.components if c.role is role), None)

    # -- startup --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        tls.shrink_read_buffers()  # a registrar holds one TLS connection per component
        # Keys, tokens and the registry live here: private, or we do not start.
        await asyncio.to_thread(secure_state_dir, cfg.state_dir)
        # Key loads (and, at first start, key generation) validate RSA: not on the loop.
        identities = await asyncio.gather(
            *(
                asyncio.to_thread(load_or_create_identity, cfg.state_dir, c.role)
                for c in cfg.components
            )
        )
        self.components = [
            Component(
                cfg,
                conf,
                identity,
                announcer=self.backend,
                api_port=self._api_port,
                on_registered=self._registration_changed,
                timing=self.timing,
            )
            for conf, identity in zip(cfg.components, identities, strict=True)
        ]
        clc, cc = self.runtime(Role.CLC), self.runtime(Role.CC)
        cloud_cert = (
            await asyncio.to_thread(ensure_cloud_ca, cfg.key_dir, clc.identity) if clc else None
        )
        for comp in self.components:
            await comp.load_state()
        self.sessions = Sessions(
            aiohttp.ClientTimeout(
                total=self.timing.long_poll + 10, sock_connect=self.timing.connect
            )
        )
        if cfg.runs_registrar:
            from .service import RegistrarService  # only hosts with a registrar load it

            self.service = RegistrarService(
                cfg,
                clc=clc,
                cc=cc,
                cloud_cert=cloud_cert,
                local_components=self.local_components,
                shutdown_timeout=self.timing.stop_step / 2,
                mdns=lambda: mdns_in_use(self.backend),
            )
            await self.service.start()
        await self.backend.start()
        self.backend.watch(self.registrars.on_sighting)
        if self.registrar is not None:
            self.backend.watch(self.registrar.on_sighting)
            self.backend.watch(self._greet)
        if self.service is not None and cc is not None:
            self.supervisor.spawn("tls", self._tls_loop)
        for comp in self.components:
            self.supervisor.spawn(f"announce-{comp.role.value}", comp.announce_loop)
            if comp.role is not Role.CLC:
                collector = Collector(
                    comp,
                    registrars=self.registrars,
                    session=functools.partial(self._client, comp.conf.address),
                    timing=self.timing,
                )
                self.supervisor.spawn(f"collect-{comp.role.value}", collector.collect_loop)
        log.info(
            "agent started: %s",
            ", ".join(f"{c.role.value}={c.identity.component_id}" for c in self.components),
        )
        # The API listens and every component's loop runs: systemd may call us started.
        self.notifier.started(self.supervisor, lambda: status_line(self.components, self.registrar))

    def _greet(self, sighting: Sighting) -> None:
        instance = greeting_for(sighting, self._serving())
        if instance is not None:
            self.backend.greet(instance)

    def _serving(self) -> dict[Role, Serving]:
        """This host's registrars that can hand out credentials now (a CC once registered)."""
        out: dict[Role, Serving] = {}
        for comp in self.components:
            if comp.role is Role.CLC or (comp.role is Role.CC and comp.registered):
                out[comp.role] = Serving(comp.instance, comp.conf.cluster)
        return out

    def _client(self, address: IPAddress) -> aiohttp.ClientSession:
        """The HTTP session of the components announcing `address`."""
        if self.sessions is None:
            raise RuntimeError("the agent has not started")
        return self.sessions.for_address(address)

    def _api_port(self) -> int:
        return self.service.port if self.service else self.config.api_port

    def _registration_changed(self, comp: Component) -> None:
        if comp.role is Role.CC:
            self._tls_due.set()  # serve NCs over HTTPS with the new certificate, or stop
        # NCs waiting for this host's CC to be registered may now proceed.
        if comp.role is Role.CC and comp.registered and self.registrar is not None:
            self.registrar.self_registration_changed()

    async def _tls_loop(self) -> None:
        """Follow the CC's registration with the certificate the registrar serves."""
        assert self.service is not None
        while True:
            await self._tls_due.wait()
            self._tls_due.clear()
            await self.service.refresh_tls()

    def local_components(self) -> list[dict[str, Any]]:
        return [
            {
                "role": c.role.value,
                "component_id": c.identity.component_id,
                "cluster": c.conf.cluster,
                "address": str(c.conf.address),
                "fingerprint": c.identity.fingerprint,
                "registered": c.registered,
                "announced": c.announced,
            }
            for c in self.components
        ]

    # -- shutdown -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop everything, each step bounded (one over its budget is logged and left
        behind); raise AgentFailed, once all is stopped, if a step or a task failed."""
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping()
        loop = asyncio.get_running_loop()
        began = loop.time()
        self._deadline = began + self.timing.stop_budget
        # No loop may publish again once we say goodbye, so the tasks go first.
        problems = await self.supervisor.close()
        withdrawals = [self.backend.withdraw(c.instance) for c in self.components]
        await self._step("mDNS goodbyes", asyncio.gather(*withdrawals), problems)
        if self.service is not None:
            # registrar.close() wakes held long-polls before the API stops waiting for them.
            await self._step("the registrar and its API", self.service.close(), problems, 2)
        if self.sessions is not None:
            await self._step("the HTTP clients", self.sessions.close(), problems)
        await self._step("mDNS", self.backend.close(), problems)
        log.info("agent stopped in %.2f s", loop.time() - began)
        if problems:
            raise AgentFailed("; ".join(problems))

    async def _step(
        self, what: str, step: Awaitable[Any], problems: list[str], budget: float = 1
    ) -> None:
        # Each step has its own budget, and all of them together the stop budget.
        loop = asyncio.get_running_loop()
        limit = max(0.1, min(self.timing.stop_step * budget, self._deadline - loop.time()))
        try:
            await asyncio.wait_for(step, limit)
        except TimeoutError:
            log.warning("stopping %s took over %.1f s; going on", what, limit)
        except Exception as exc:
            log.exception("stopping %s failed", what)
            problems.append(f"stopping {what} failed: {exc!r}")

    async def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT; raise AgentFailed when the agent could not go on."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            waits = {
                asyncio.create_task(stop.wait()),
                asyncio.create_task(self.supervisor.failed.wait()),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        finally:
            # Signal handlers stay until we have stopped: a second SIGTERM must not kill us
            # before the goodbyes are out.
            try:
                await self.stop()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        if self.supervisor.failure is not None:
            raise AgentFailed(self.supervisor.failure)
