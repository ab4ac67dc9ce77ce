"""Browsing `_eucalyptus._tcp` through avahi-daemon: one ServiceBrowser, and one ServiceResolver
per service and interface while the service is there, merged into Sightings per instance.

A resolver is kept, not freed after its first answer, because Avahi's browser says nothing when
a service's TXT record changes: only the resolver's Found signal does (docs/mdns.md, "Using the
host's Avahi", for the per-client object limit this needs).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_fast.aio import MessageBus

from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns.types import Change, Sighting

log = logging.getLogger(__name__)

AVAHI_TYPE = "_eucalyptus._tcp"
RESOLVE_ATTEMPTS = 3
# Resolutions at once: each is an object of ours in avahi-daemon (objects-per-client-max).
RESOLVING_AT_ONCE = 64
# Signals kept for objects whose path we do not know yet (see AvahiBrowser.on_signal).
EARLY_PATHS = 256

Key = tuple[int, int, str]  # (interface index, protocol, instance name)
View = tuple[dict[str, str], tuple[str, ...]]


@dataclass
class _Item:
    key: Key
    domain: str
    resolver: str | None = None
    view: View | None = None
    failures: int = 0
    seen: float = 0.0  # loop time of its last Found, for the newest TXT across interfaces
    local: bool = False  # published through our own avahi-daemon (by us or another client)


@dataclass
class AvahiBrowser:
    """The browse half of AvahiBackend; it owns no bus, and is driven by its signals."""

    bus: MessageBus
    protocol: int
    emit: Callable[[Sighting], None]
    server2: bool = True
    browser: str | None = None
    items: dict[Key, _Item] = field(default_factory=dict)
    by_resolver: dict[str, Key] = field(default_factory=dict)
    emitted: dict[str, View] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(RESOLVING_AT_ONCE))
    _one_shot: bool = False  # the daemon refused more resolver objects: resolve once instead
    _one_shot_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    # path -> signals that came before the call that made the object returned to us
    early: OrderedDict[str, list[tuple[str, str, list[Any]]]] = field(default_factory=OrderedDict)

    async def start(self) -> None:
        args = [ad.IF_UNSPEC, self.protocol, AVAHI_TYPE, "", 0]
        if self.server2:
            # Avahi 0.8: the browser exists, but says nothing until Start, so no item is
            # missed between its creation and our knowing its path.
            (path,) = await ad.call(
                self.bus, "/", ad.SERVER2, "ServiceBrowserPrepare", "iissu", args
            )
            self.browser = str(path)
            self._replay(self.browser)
            await ad.call(self.bus, self.browser, ad.SERVICE_BROWSER, "Start")
        else:
            (path,) = await ad.call(self.bus, "/", ad.SERVER, "ServiceBrowserNew", "iissu", args)
            self.browser = str(path)
            self._replay(self.browser)
        log.debug("avahi: browsing %s (%s)", AVAHI_TYPE, self.browser)

    def foreign(self, instance: str) -> bool:
        """Whether another host's responder announces this instance name now."""
        return any(
            item.key[2] == instance and item.view is not None and not item.local
            for item in self.items.values()
        )

    def forget_all(self) -> None:
        """The daemon went away, and every object of ours with it: all heard is gone."""
        for task in list(self.tasks):
            task.cancel()
        self.browser = None
        self.items.clear()
        self.by_resolver.clear()
        self.early.clear()
        for instance in list(self.emitted):
            del self.emitted[instance]
            self.emit(Sighting(instance, Change.REMOVED))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        paths = [item.resolver for item in self.items.values() if item.resolver]
        if self.browser is not None:
            paths.append(self.browser)
        for path in paths:
            interface = ad.SERVICE_BROWSER if path == self.browser else ad.SERVICE_RESOLVER
            try:
                await ad.call(self.bus, path, interface, "Free", timeout=2)
            except ad.AvahiError:
                break  # the daemon or the bus is gone; its objects went with it
        self.browser = None
        self.items.clear()
        self.by_resolver.clear()
        self.early.clear()

    # -- signals --------------------------------------------------------------------------------

    def on_signal(self, interface: str, path: str, member: str, body: list[Any]) -> None:
        if path != self.browser and path not in self.by_resolver:
            # Avahi 0.8's ServiceResolverPrepare starts at once (its record browsers are not
            # prepared), so a cached answer can arrive right behind the reply that names the
            # object, before the coroutine that made it has run again: keep it for that.
            self.early.setdefault(path, []).append((interface, member, body))
            while len(self.early) > EARLY_PATHS:
                self.early.popitem(last=False)
            return
        if interface == ad.SERVICE_BROWSER and path == self.browser:
            if member in ("ItemNew", "ItemRemove"):
                iface, proto, name, _type, domain, _flags = body
                key: Key = (int(iface), int(proto), str(name))
                if member == "ItemNew":
                    self._item_new(key, str(domain))
                else:
                    self._item_remove(key)
            elif member == "Failure":
                log.error("avahi: browsing %s failed: %s", AVAHI_TYPE, body[0] if body else "")
        elif interface == ad.SERVICE_RESOLVER and path in self.by_resolver:
            key = self.by_resolver[path]
            if member == "Found":
                self._found(key, body)
            elif member == "Failure":
                self._resolve_failed(key, path, str(body[0]) if body else "")

    def _item_new(self, key: Key, domain: str) -> None:
        if key in self.items:
            return
        log.debug("avahi browser: new %s on interface %d", key[2], key[0])
        item = _Item(key, domain)
        self.items[key] = item
        self._spawn(self._resolve(item))

    def _item_remove(self, key: Key) -> None:
        item = self.items.pop(key, None)
        if item is None:
            return
        if item.resolver is not None:
            self.by_resolver.pop(item.resolver, None)
            self._spawn(self._free(item.resolver))
        self._merge(key[2])

    def _found(self, key: Key, body: list[Any]) -> None:
        item = self.items.get(key)
        if item is None:
            return
        # (interface, protocol, name, type, domain, host, aprotocol, address, port, txt, flags)
        address, txt = str(body[7]), body[9]
        log.debug("avahi resolver: %s on interface %d at %s", key[2], key[0], address)
        item.view = (ad.decode_txt(txt), (address,) if address else ())
        item.local = bool(int(body[10]) & ad.LOOKUP_RESULT_LOCAL)
        item.failures = 0
        item.seen = asyncio.get_running_loop().time()
        self._merge(key[2])

    def _resolve_failed(self, key: Key, path: str, error: str) -> None:
        log.debug("avahi resolver: %s on interface %d failed: %s", key[2], key[0], error)
        self.by_resolver.pop(path, None)
        self._spawn(self._free(path))
        item = self.items.get(key)
        if item is None or item.resolver != path:
            return
        item.resolver = None
        item.failures += 1
        if item.failures >= RESOLVE_ATTEMPTS:
            log.warning("could not resolve %s after %d attempts: %s", key[2], item.failures, error)
            return
        self._spawn(self._resolve(item))

    # -- resolving ------------------------------------------------------------------------------

    async def _resolve(self, item: _Item) -> None:
        iface, proto, name = item.key
        args = [iface, proto, name, AVAHI_TYPE, item.domain, self.protocol, 0]
        async with self._slots:
            if self.items.get(item.key) is not item:
                return  # removed while waiting for a slot
            path = None
            if not self._one_shot:
                try:
                    path = await self._new_resolver(args)
                except ad.AvahiError as exc:
                    if not ad.too_many_objects(exc):
                        log.warning("avahi: cannot resolve %s: %s", name, exc)
                        return
                    if not self._one_shot:
                        # One-shot resolutions need objects too, if only for a moment. Only
                        # the first refusal makes room: the others in flight with it (up to
                        # RESOLVING_AT_ONCE) would free every kept resolver.
                        await self.make_room()
        if path is None:
            await self._resolve_once(item, args)
            return
        if self.items.get(item.key) is not item:
            self.early.pop(path, None)
            await self._free(path)  # removed while the resolver was being made
            return
        item.resolver = path
        self.by_resolver[path] = item.key
        self._replay(path)
        if self.server2:
            try:
                await ad.call(self.bus, path, ad.SERVICE_RESOLVER, "Start")
            except ad.AvahiError as exc:
                log.warning("avahi: cannot start resolving %s: %s", name, exc)

    def _replay(self, path: str) -> None:
        for interface, member, body in self.early.pop(path, []):
            self.on_signal(interface, path, member, body)

    async def _new_resolver(self, args: list[Any]) -> str:
        if self.server2:
            (path,) = await ad.call(
                self.bus, "/", ad.SERVER2, "ServiceResolverPrepare", "iisssiu", args
            )
        else:
            (path,) = await ad.call(self.bus, "/", ad.SERVER, "ServiceResolverNew", "iisssiu", args)
        return str(path)

    def _go_one_shot(self) -> None:
        if not self._one_shot:
            log.warning(
                "avahi-daemon refuses more objects for this client (objects-per-client-max, "
                "docs/mdns.md): resolving once per service from now on, so TXT changes of "
                "services heard from now on are missed until they come back"
            )
        self._one_shot = True

    async def make_room(self, count: int = 4) -> bool:
        """Free up to `count` kept resolvers (their services stay heard, without updates),
        so that publishing can have the objects; whether any was freed."""
        self._go_one_shot()
        # Resolvers that have answered go first: their services stay heard. One that has not
        # answered yet (our own services are heard, and so resolved, first) is resolved once
        # instead, or its service would never be heard at all.
        kept = sorted(
            (item for item in self.items.values() if item.resolver is not None),
            key=lambda item: item.view is None,
        )[:count]
        # Claimed before the first await, so that calls at the same time free different ones.
        paths = []
        for item in kept:
            assert item.resolver is not None
            paths.append(item.resolver)
            self.by_resolver.pop(item.resolver, None)
            item.resolver = None
            if item.view is None:
                self._spawn(self._resolve(item))
        for path in paths:
            await self._free(path)
        if paths:
            log.warning(
                "avahi: freed %d resolvers for room (their services stay heard, without TXT "
                "updates)",
                len(paths),
            )
        return bool(paths)

    async def _resolve_once(self, item: _Item, args: list[Any]) -> None:
        for attempt in range(RESOLVE_ATTEMPTS):
            try:
                async with self._one_shot_slots:
                    body = await ad.call(
                        self.bus, "/", ad.SERVER, "ResolveService", "iisssiu", args, timeout=15
                    )
            except ad.AvahiError as exc:
                if attempt + 1 == RESOLVE_ATTEMPTS:
                    log.warning("could not resolve %s: %s", item.key[2], exc)
                else:
                    await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if self.items.get(item.key) is item:
                self._found(item.key, body)
            return

    async def _free(self, path: str) -> None:
        try:
            await ad.call(self.bus, path, ad.SERVICE_RESOLVER, "Free", timeout=2)
        except ad.AvahiError as exc:
            log.debug("avahi: freeing %s: %s", path, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("avahi browser: %s", exc, exc_info=not isinstance(exc, ad.AvahiError))

    # -- merging --------------------------------------------------------------------------------

    def _merge(self, instance: str) -> None:
        """One Sighting per instance, however many interfaces it is heard on: the newest TXT,
        the addresses of all; REMOVED when the last interface lets it go."""
        views = sorted(
            (item for item in self.items.values() if item.key[2] == instance and item.view),
            key=lambda item: item.seen,
        )
        if not views:
            gone = not any(key[2] == instance for key in self.items)
            if gone and self.emitted.pop(instance, None) is not None:
                self.emit(Sighting(instance, Change.REMOVED))
            return  # (or still being resolved on every interface it is on)
        addresses: list[str] = []
        for item in views:
            assert item.view is not None
            addresses += [a for a in item.view[1] if a not in addresses]
        txt = views[-1].view[0] if views[-1].view else {}
        view: View = (txt, tuple(addresses))
        previous = self.emitted.get(instance)
        if previous == view:
            return
        self.emitted[instance] = view
        change = Change.ADDED if previous is None else Change.UPDATED
        self.emit(Sighting(instance, change, txt=dict(txt), addresses=tuple(addresses)))
