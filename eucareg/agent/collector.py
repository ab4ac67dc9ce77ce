"""A component's second loop: collecting its credentials from the registrars it finds, asking
each in turn until one proves itself, or, once it holds them, watching them for revocation.
It waits for events, not timers; failures back off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from . import collect, expiry
from .component import Component
from .locate import Endpoint, Registrars
from .timing import AgentTiming, Backoff, first_of, wait_event

# The component's logger, as before this loop had a module of its own: operators and tests
# find its warnings under it ("collecting credentials of … failed").
log = logging.getLogger("eucareg.agent.component")


class Collector:
    """A component's collect loop; the Agent runs it under its Supervisor."""

    def __init__(
        self,
        component: Component,
        *,
        registrars: Registrars,
        session: Callable[[], aiohttp.ClientSession],
        timing: AgentTiming,
    ) -> None:
        self.component = component
        self._proven: Endpoint | None = None  # the registrar that last proved itself
        self._registrars = registrars
        self._session = session
        self._timing = timing

    async def collect_loop(self) -> None:
        """Collect credentials while unregistered; once registered, watch for revocation."""
        comp = self.component
        backoff = Backoff(self._timing.retry_base, self._timing.retry_max)
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before reading our state, so a change from here on is never missed.
            comp.changed.clear()
            if not comp.registered and not comp.announced:
                await comp.changed.wait()
                continue
            held = comp.presence.held
            issuer = held.issuer_fingerprint if comp.registered else None
            # Once registered, the CA we hold decides (expect()); a token's or the
            # configuration's pin must not hide the registrar that certified us.
            endpoints = self._registrars.candidates(
                comp.role,
                comp.conf.cluster,
                pin=None if comp.registered else comp.pin,
                issuer=issuer,
            )
            if not endpoints:
                # Woken by a registrar heard, our own change, or the fallback's time coming.
                wait = self._registrars.wait_changed(self._registrars.fallback_in())
                await first_of(wait, comp.changed.wait())
                continue
            started = loop.time()
            try:
                outcome = await self._ask_each(endpoints, held.serial if comp.registered else None)
                if outcome is not None:
                    await self._settle(outcome)
            except collect.COLLECT_ERRORS as exc:
                asked = getattr(exc, "retry_after", None)
                delay = backoff.next(at_least=asked)
                log.warning(
                    "collecting credentials of %s failed: %s; retrying in %.1f s%s",
                    comp.identity.component_id,
                    str(exc) or type(exc).__name__,
                    delay,
                    await expiry.held_note(comp.cfg.key_dir, comp.role) if comp.registered else "",
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
                    await wait_event(comp.changed, pause)

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
                        self.component.identity.component_id,
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
        comp = self.component
        session = self._session()
        watch, poll = self._timing.watch_poll, self._timing.long_poll
        if not endpoint.component_id:
            # No registrar heard on the LAN: announce over HTTP (the design's fallback), and
            # keep doing so once registered, or the registrar stops hearing us (what waits
            # on us, our SC for one, would wait again).
            client = comp.client_cert if have is not None else None
            try:
                refresh = await collect.announce_over_http(
                    session,
                    comp.identity,
                    endpoint,
                    comp.spec().txt,
                    comp.expect(endpoint),
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
                log.warning("report of %s to %s failed: %s", comp.instance, endpoint.url, reason)
                refresh = collect.DEFAULT_REFRESH
            # Asked again within the registrar's refresh, so that its lease never lapses.
            watch, poll = min(watch, refresh), min(poll, refresh)
        request = asyncio.create_task(
            collect.collect_credentials(
                session,
                comp.identity,
                comp.role,
                endpoint,
                comp.cfg.key_dir,
                # Watching, the request is held until revoked: a few minutes per request.
                wait=watch if have is not None else poll,
                have=have,
                expect=comp.expect(endpoint),
                named=comp.named(),
                client=comp.client_cert if have is not None else None,
                euca=comp.euca,
                chain=comp.chain,
            )
        )
        change = asyncio.create_task(comp.changed.wait())
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
        comp = self.component
        if outcome in (collect.Outcome.WRITTEN, collect.Outcome.RENEWED):
            # Verify what was written, through the same cache the re-checks use.
            await comp.refresh()
            if not comp.registered:
                log.warning("credentials for %s were written but do not verify", comp.instance)
        elif outcome is collect.Outcome.REVOKED:
            collect.remove_credentials(comp.cfg.key_dir, comp.role)
            await comp.refresh()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return str(exc.certificate_error)
    return str(exc) or type(exc).__name__
