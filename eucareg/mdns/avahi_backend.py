"""mDNS/DNS-SD through the host's avahi-daemon over D-Bus (dbus-fast): the same Announcer and
Watcher as the python-zeroconf backend, for hosts where Avahi already owns port 5353.

It follows the daemon: one that is not running yet, or restarts, or re-registers its host name,
gets every service and the browser again once it runs (docs/mdns.md, "Using the host's Avahi").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns.avahi_browse import AvahiBrowser
from eucareg.mdns.avahi_publish import AvahiPublisher, retry_delay
from eucareg.mdns.types import ServiceSpec, Sighting, SightingHandler

log = logging.getLogger(__name__)

PUBLISH_ATTEMPTS = 10  # after a failed publish, tried again with backoff this often (~6 min)


class AvahiBackend:
    """Announcer and Watcher over one D-Bus connection to avahi-daemon."""

    name = "avahi"

    def __init__(self, *, ipv6: bool = False, bus_address: str | None = None) -> None:
        self.ipv6 = ipv6
        self.bus_address = bus_address
        self._protocol = ad.PROTO_UNSPEC if ipv6 else ad.PROTO_INET
        self._bus: MessageBus | None = None
        self._publisher: AvahiPublisher | None = None
        self._browser: AvahiBrowser | None = None
        self._handlers: list[SightingHandler] = []
        self._watching = False
        self._running = False  # the daemon is there and in state RUNNING
        self._server2 = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.version = ""
        # The bus's unique name of avahi-daemon now: signals from any other sender are
        # ignored, since the system bus lets every local client send signals to us.
        self._owner: str | None = None

    @property
    def running(self) -> bool:
        return self._running

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the bus (AvahiError if it cannot be reached); publishing and browsing
        start now if avahi-daemon runs, or as soon as it does."""
        await self._connect()
        self._spawn(self._follow_bus())

    async def _connect(self) -> None:
        bus = await ad.connect(self.bus_address)
        self._bus = bus
        if self._browser is None or self._publisher is None:
            self._browser = AvahiBrowser(bus, self._protocol, self._emit)
            self._publisher = AvahiPublisher(
                bus,
                self._protocol,
                self.ipv6,
                spawn=self._spawn,
                make_room=self._browser.make_room,
                taken=self._browser.foreign,
            )
        else:  # connected again: what is wanted (the publisher's specs) is kept
            self._browser.bus = self._publisher.bus = bus
        bus.add_message_handler(self._on_message)
        # Avahi addresses its signals to us; these rules also let the bus tell us when the
        # daemon comes and goes, and when its server state changes.
        try:
            await ad.add_match(
                bus,
                f"type='signal',sender='{ad.BUS}',member='NameOwnerChanged',arg0='{ad.AVAHI}'",
            )
            await ad.add_match(bus, f"type='signal',sender='{ad.AVAHI}'")
        except BaseException:
            # Not half-connected: the caller's retry opens a new connection, not a second one.
            bus.remove_message_handler(self._on_message)
            bus.disconnect()
            raise
        try:
            (owner,) = await ad.call(
                bus, ad.BUS_PATH, ad.BUS, "GetNameOwner", "s", [ad.AVAHI], destination=ad.BUS
            )
        except ad.AvahiError:
            log.warning("avahi-daemon is not running on the bus; waiting for it to start")
            return
        self._owner = str(owner)
        await self._daemon_up()

    async def _follow_bus(self) -> None:
        """Connect again, with backoff, when the system bus connection is lost (the bus
        restarted): the daemon's objects went with it, so all is published again."""
        while not self._closed:
            bus = self._require_bus()
            with contextlib.suppress(Exception):
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            if self._closed:
                return
            log.warning("the system bus connection was lost; connecting again")
            self._daemon_gone("is out of reach with the bus")
            failures = 0
            while not self._closed:
                failures += 1
                await asyncio.sleep(retry_delay(failures))
                try:
                    await self._connect()
                except ad.AvahiError as exc:
                    log.warning("system bus still out of reach: %s", exc)
                    continue
                log.info("connected to the system bus again")
                break

    async def close(self) -> None:
        if self._bus is None or self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        assert self._browser is not None and self._publisher is not None
        if self._running:
            await self._browser.close()
            await self._publisher.close()  # frees the groups: the daemon sends goodbyes
        self._bus.remove_message_handler(self._on_message)
        self._bus.disconnect()
        self._running = False

    async def _daemon_up(self) -> None:
        """The daemon owns its name: learn its state, and if it runs, publish and browse."""
        bus = self._require_bus()
        try:
            (self.version,) = await ad.call(bus, "/", ad.SERVER, "GetVersionString")
            (state,) = await ad.call(bus, "/", ad.SERVER, "GetState")
        except ad.AvahiError as exc:
            log.warning("avahi-daemon does not answer: %s", exc)
            return
        self._server2 = await self._has_server2(bus)
        if state == ad.SERVER_RUNNING:
            await self._now_running()
        else:
            log.info("avahi-daemon is not ready yet (state %s); waiting", state)

    async def _has_server2(self, bus: MessageBus) -> bool:
        try:
            await ad.call(bus, "/", ad.SERVER2, "GetAPIVersion")
        except ad.AvahiError:
            return False  # before Avahi 0.8: browsers start at once (signals come to us)
        return True

    async def _now_running(self) -> None:
        if self._running or self._closed:
            return
        self._running = True
        publisher, browser = self._require_parts()
        browser.server2 = self._server2
        log.info("avahi-daemon %s runs; publishing %d services", self.version, len(publisher.specs))
        for spec in list(publisher.specs.values()):
            try:
                await publisher.apply(spec.instance)
            except ad.AvahiError as exc:
                log.warning("avahi: publishing %s failed: %s", spec.instance, exc)
                self._spawn(self._publish_again(spec))
        if self._watching and browser.browser is None:
            await browser.start()

    def _daemon_gone(self, why: str) -> None:
        if not self._running:
            return
        log.warning("avahi-daemon %s; publishing and browsing resume when it runs again", why)
        self._running = False
        publisher, browser = self._require_parts()
        publisher.forget_all()
        browser.forget_all()

    # -- Announcer ------------------------------------------------------------------------------

    async def publish(self, spec: ServiceSpec) -> None:
        """Publish a service, or update it in place when already published."""
        publisher, _ = self._require_parts()
        publisher.specs[spec.instance] = spec
        if not self._running:
            return  # published as soon as the daemon runs
        try:
            await publisher.apply(spec.instance)
        except ad.AvahiError as exc:
            # The daemon went away mid-call (its return publishes everything again), or
            # refused: the spec is kept and tried again, with backoff, while it is wanted.
            log.warning("avahi: publishing %s failed: %s", spec.instance, exc)
            self._spawn(self._publish_again(spec))

    async def _publish_again(self, spec: ServiceSpec) -> None:
        publisher, _ = self._require_parts()
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            await asyncio.sleep(retry_delay(attempt))
            if publisher.specs.get(spec.instance) is not spec:
                return  # changed or withdrawn since: that call did (or does) the work
            if not self._running:
                return  # published again when the daemon runs
            try:
                await publisher.apply(spec.instance)
                return
            except ad.AvahiError as exc:
                log.warning("avahi: publishing %s failed again: %s", spec.instance, exc)
        log.error("avahi: gave up publishing %s after %d attempts", spec.instance, PUBLISH_ATTEMPTS)

    async def withdraw(self, instance: str) -> None:
        if self._publisher is None:
            return
        if self._publisher.specs.pop(instance, None) is not None and self._running:
            try:
                await self._publisher.apply(instance)
            except ad.AvahiError as exc:
                log.warning("withdrawing %s: %s", instance, exc)

    def greet(self, instance: str) -> bool:
        """Always False: avahi-daemon has no call to multicast a service's records unasked.
        A newcomer's own query (sent when it starts browsing) gets them at once anyway."""
        return False

    def published_name(self, instance: str) -> str | None:
        """The name a service is published under now: `instance`, or Avahi's rename of it."""
        return self._publisher.renamed(instance) if self._publisher else None

    # -- Watcher --------------------------------------------------------------------------------

    def watch(self, handler: SightingHandler) -> None:
        self._handlers.append(handler)
        if self._watching:
            return
        self._watching = True
        if self._running:
            _, browser = self._require_parts()
            self._spawn(browser.start())

    def _emit(self, sighting: Sighting) -> None:
        for handler in self._handlers:
            try:
                handler(sighting)
            except Exception:
                log.exception("sighting handler failed for %s", sighting.instance)

    # -- signals --------------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        if message.message_type is not MessageType.SIGNAL:
            return
        interface, member, body = message.interface, message.member, list(message.body)
        if interface == ad.BUS and member == "NameOwnerChanged":
            # Only the bus itself says who owns a name: another client's copy of this signal
            # would make us forget (or publish twice) what the daemon holds.
            if message.sender != ad.BUS:
                log.debug("ignored %s.%s from %s: not the bus", interface, member, message.sender)
            elif body and body[0] == ad.AVAHI:
                self._owner = str(body[2]) or None
                if body[2]:
                    self._spawn(self._daemon_up())
                else:
                    self._daemon_gone("stopped")
            return
        if self._owner is None or message.sender != self._owner:
            # Any local client may send us signals (the system bus allows it): a forged
            # resolver Found would be a sighting, a forged group state a rename or a retry.
            log.debug("ignored %s.%s from %s: not avahi-daemon", interface, member, message.sender)
            return
        if interface in (ad.SERVER, ad.SERVER2) and member == "StateChanged":
            self._server_state(int(body[0]))
        elif interface == ad.ENTRY_GROUP and member == "StateChanged":
            publisher, _ = self._require_parts()
            publisher.on_state(str(message.path), int(body[0]), str(body[1]))
        elif interface in (ad.SERVICE_BROWSER, ad.SERVICE_RESOLVER):
            _, browser = self._require_parts()
            browser.on_signal(str(interface), str(message.path), str(member), body)

    def _server_state(self, state: int) -> None:
        if state == ad.SERVER_RUNNING:
            self._spawn(self._now_running())
        elif self._running:
            # Re-registering or renaming its own host name: Avahi's clients withdraw their
            # groups now and publish them again once it runs. Its browsers stay.
            log.warning("avahi-daemon left the running state (state %s); re-publishing", state)
            self._running = False
            publisher, _ = self._require_parts()
            self._spawn(publisher.close())

    # -- helpers --------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("avahi: %s", exc, exc_info=not isinstance(exc, ad.AvahiError))

    def _require_bus(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError("AvahiBackend.start() has not been awaited")
        return self._bus

    def _require_parts(self) -> tuple[AvahiPublisher, AvahiBrowser]:
        if self._publisher is None or self._browser is None:
            raise RuntimeError("AvahiBackend.start() has not been awaited")
        return self._publisher, self._browser
