"""One component of this host at run time: its state (registered, announced) and its two loops,
announcing while its preconditions hold, and collecting its credentials (or, once it holds
them, watching for their revocation). Expected failures are logged and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from eucareg.config.file import ComponentConfig, Config
from eucareg.core.model import Role
from eucareg.core.trust import parse_token
from eucareg.mdns.types import Announcer, ServiceSpec

from . import collect
from .announce import TokenProver, instance_name, preconditions, service_spec
from .identity import Identity
from .locate import Endpoint, Registrars
from .presence import CredentialPresence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentTiming:
    """The agent's own time constants (the configuration holds the operator's)."""

    long_poll: float = collect.LONG_POLL  # `wait` of one credential request
    retry_base: float = 1.0  # first delay after a failed collection or announcement
    retry_max: float = 30.0  # longest such delay
    min_request_interval: float = 1.0  # a registrar answering at once is not asked faster
    stop_step: float = 1.0  # most any one shutdown step (goodbyes, API) may take
    stop_budget: float = 2.5  # most all shutdown steps together may take (SIGTERM: < 3 s)


class Backoff:
    """Doubling delays between retries, reset by a success."""

    def __init__(self, base: float, maximum: float) -> None:
        self._base, self._max = base, maximum
        self.delay = base

    def reset(self) -> None:
        self.delay = self._base

    async def sleep(self) -> None:
        delay, self.delay = self.delay, min(self._max, self.delay * 2)
        await asyncio.sleep(delay)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


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
        self.registered = (await self.presence.check()).present

    async def refresh(self) -> None:
        """Re-check key presence (cheap unless the files changed) and act on a change."""
        held = await self.presence.check()
        if held.present != self.registered:
            self.set_registered(held.present)

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
            await wait_event(self.wake, self.cfg.recheck_interval)

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
                await wait_event(self.changed, self.cfg.recheck_interval)
                continue
            held = self.presence.held
            issuer = held.issuer_fingerprint if self.registered else None
            endpoint = self._registrars.for_component(
                self.role, self.conf.cluster, pin=self.pin, issuer=issuer
            )
            if endpoint is None:
                await self._registrars.wait_changed(self.cfg.recheck_interval)
                continue
            started = loop.time()
            try:
                outcome = await self._ask(endpoint, held.serial if self.registered else None)
                if outcome is not None:
                    await self._settle(outcome)
            except collect.COLLECT_ERRORS as exc:
                log.warning(
                    "collecting credentials of %s from %s failed: %s; retrying in %.1f s",
                    self.identity.component_id,
                    endpoint.url,
                    str(exc) or type(exc).__name__,
                    backoff.delay,
                )
                await backoff.sleep()
                continue
            backoff.reset()
            # None: our own state moved (a credential file vanished, say), so we ask afresh.
            if outcome in (collect.Outcome.PENDING, collect.Outcome.UNCHANGED):
                # A registrar answering at once (woken, or not holding requests) is not asked
                # again straight away, or we would spin on it.
                pause = self._timing.min_request_interval - (loop.time() - started)
                if pause > 0:
                    await wait_event(self.changed, pause)

    async def _ask(self, endpoint: Endpoint, have: str | None) -> collect.Outcome | None:
        """Announce over HTTP if need be, then one credential request; None when our own state
        changes meanwhile (the request is abandoned)."""
        session = self._session()
        if have is None and not endpoint.component_id:
            # No registrar heard on the LAN: announce over HTTP (the design's fallback).
            try:
                await collect.announce_over_http(session, self.identity, endpoint, self.spec().txt)
            except collect.COLLECT_ERRORS as exc:
                reason = str(exc) or type(exc).__name__
                raise collect.ProtocolError(f"fallback announcement failed: {reason}") from exc
        request = asyncio.create_task(
            collect.collect_credentials(
                session,
                self.identity,
                self.role,
                endpoint,
                self.cfg.key_dir,
                wait=self._timing.long_poll,
                have=have,
                pin=self.pin,
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
        if outcome is collect.Outcome.WRITTEN:
            # Verify what was written, through the same cache the re-checks use.
            await self.refresh()
            if not self.registered:
                log.warning("credentials for %s were written but do not verify", self.instance)
        elif outcome is collect.Outcome.REVOKED:
            collect.remove_credentials(self.cfg.key_dir, self.role)
            await self.refresh()
