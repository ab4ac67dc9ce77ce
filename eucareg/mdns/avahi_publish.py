"""Publishing through avahi-daemon: one EntryGroup per service (AddService + Commit), and one per
responder host name holding its A (and, with IPv6, AAAA) records, shared by the services on it.

A collision renames the service (Avahi's alternative name, "name #2"); identity lives in the
TXT record, never in the name (lesson L2). A failed group is tried again with backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_fast.aio import MessageBus

from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns.avahi_browse import AVAHI_TYPE
from eucareg.mdns.types import ServiceSpec

log = logging.getLogger(__name__)

# A rogue responder that claims every name we pick must not keep us renaming forever.
MAX_RENAMES = 20
RETRY_FIRST, RETRY_MAX = 1.0, 60.0


def next_name(current: str, alternative: str, renames: int) -> str | None:
    """The name to try after a collision of `current`, given Avahi's alternative for it; None
    once we have renamed too often (or Avahi offers nothing new)."""
    if renames >= MAX_RENAMES or not alternative or alternative == current:
        return None
    return alternative


def retry_delay(failures: int) -> float:
    """Seconds before publishing a failed group again: 1, 2, 4 ... 60."""
    return float(min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, failures - 1)))


def host_name(server: str) -> str:
    return server.rstrip(".")


def published_addresses(specs: list[ServiceSpec], ipv6: bool) -> tuple[str, ...]:
    """Every address the services on one host name offer, in a stable order; IPv6 only with
    `mdns.ipv6` (IPv4 alone otherwise, as the zeroconf backend)."""
    out: set[str] = set()
    for spec in specs:
        for raw in spec.addresses:
            address = ipaddress.ip_address(raw)
            if address.version == 4 or ipv6:
                out.add(str(address))
    return tuple(sorted(out, key=lambda a: (ipaddress.ip_address(a).version, a)))


@dataclass
class _Group:
    path: str
    name: str  # the name published now: the instance, or Avahi's rename of it
    spec: ServiceSpec | None = None
    host: str = ""  # the host name the SRV record points at ("": avahi-daemon's own)
    renames: int = 0
    failures: int = 0
    retry: asyncio.TimerHandle | None = None


@dataclass
class AvahiPublisher:
    """The announce half of AvahiBackend: what is wanted (`specs`) and what avahi-daemon has."""

    bus: MessageBus
    protocol: int
    ipv6: bool
    specs: dict[str, ServiceSpec] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)  # instance -> its service group
    hosts: dict[str, _Group] = field(default_factory=dict)  # host name -> its address group
    own_host: set[str] = field(default_factory=set)  # host names lost to a collision
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    spawn: Callable[[Any], None] = lambda coro: None
    make_room: Callable[[], Awaitable[bool]] = field(default=lambda: _no_room())
    taken: Callable[[str], bool] = lambda instance: False  # heard from another responder

    def renamed(self, instance: str) -> str | None:
        group = self.groups.get(instance)
        return group.name if group is not None else None

    def forget_all(self) -> None:
        """The daemon went away and its groups with it; what is wanted stays in `specs`."""
        for group in [*self.groups.values(), *self.hosts.values()]:
            if group.retry is not None:
                group.retry.cancel()
        self.groups.clear()
        self.hosts.clear()

    # -- what the backend calls -----------------------------------------------------------------

    async def apply(self, instance: str) -> None:
        """Make avahi-daemon publish `specs[instance]` (or nothing, once it is gone)."""
        async with self.lock:
            spec = self.specs.get(instance)
            group = self.groups.get(instance)
            if spec is None:
                if group is not None:
                    del self.groups[instance]
                    await self._free(group)
                    log.debug("withdrew %s", instance)
                await self._sync_hosts()
                return
            await self._sync_hosts()
            await self._publish(instance, spec, group)

    async def apply_all(self) -> None:
        for instance in list(self.specs):
            await self.apply(instance)

    async def close(self) -> None:
        async with self.lock:
            for group in [*self.groups.values(), *self.hosts.values()]:
                try:
                    await self._free(group)
                except ad.AvahiError:
                    break  # the daemon or the bus is gone; its groups went with it
            self.forget_all()

    # -- groups ---------------------------------------------------------------------------------

    async def _publish(self, instance: str, spec: ServiceSpec, group: _Group | None) -> None:
        host = self._host_for(spec)
        if (
            group is not None
            and group.spec is not None
            and (group.spec.port, group.host) == (spec.port, host)
        ):
            # Only the TXT record (or the host's addresses, in their own group) changed:
            # an update in place, with no probing and no new name.
            if dict(group.spec.txt) != dict(spec.txt):
                await ad.call(
                    self.bus,
                    group.path,
                    ad.ENTRY_GROUP,
                    "UpdateServiceTxt",
                    "iiusssaay",
                    [
                        ad.IF_UNSPEC,
                        self.protocol,
                        0,
                        group.name,
                        AVAHI_TYPE,
                        "",
                        ad.txt_strings(spec.txt),
                    ],
                )
                log.debug("updated %s txt=%s", instance, dict(spec.txt))
            group.spec = spec
            return
        if group is None:
            group = _Group(await self._new_group(), spec.instance)
            self.groups[instance] = group
            if self.taken(spec.instance):
                # Another responder already has the name, and our daemon has its records
                # cached (our browser resolved them): then Avahi's probe does not find it,
                # and the other side, established, would lose its name to us. Yield instead.
                await self._take_alternative(group, "is already announced by another host")
        await self._fill(group, spec, host)
        log.debug("published %s as %r txt=%s", instance, group.name, dict(spec.txt))

    async def _take_alternative(self, group: _Group, why: str) -> None:
        (alternative,) = await ad.call(
            self.bus, "/", ad.SERVER, "GetAlternativeServiceName", "s", [group.name]
        )
        log.warning(
            "service name %r %s; publishing it as %r (identity is in the TXT record, not the name)",
            group.name,
            why,
            str(alternative),
        )
        group.name = str(alternative)
        group.renames += 1

    async def _fill(self, group: _Group, spec: ServiceSpec, host: str) -> None:
        group.spec, group.host = spec, host
        try:
            await self._add_service(group, spec, host)
        except BaseException:
            group.spec = None  # half done: the next apply() fills the group again
            raise

    async def _add_service(self, group: _Group, spec: ServiceSpec, host: str) -> None:
        for _ in range(MAX_RENAMES):
            await ad.call(self.bus, group.path, ad.ENTRY_GROUP, "Reset")
            try:
                await ad.call(
                    self.bus,
                    group.path,
                    ad.ENTRY_GROUP,
                    "AddService",
                    "iiussssqaay",
                    [
                        ad.IF_UNSPEC,
                        self.protocol,
                        0,
                        group.name,
                        AVAHI_TYPE,
                        "",
                        host,
                        spec.port,
                        ad.txt_strings(spec.txt),
                    ],
                )
            except ad.AvahiError as exc:
                # Another client of this daemon has the name: Avahi refuses it at once.
                if not exc.name.endswith("CollisionError"):
                    raise
                await self._take_alternative(group, "is taken on this host")
                continue
            await ad.call(self.bus, group.path, ad.ENTRY_GROUP, "Commit")
            return
        raise ad.AvahiError("collision", f"no free name after {MAX_RENAMES} tries: {group.name}")

    def _host_for(self, spec: ServiceSpec) -> str:
        name = host_name(spec.server)
        if name in self.own_host or not published_addresses([spec], self.ipv6):
            return ""
        return name

    async def _sync_hosts(self) -> None:
        """One address group per responder host name, holding the addresses its services offer."""
        by_host: dict[str, list[ServiceSpec]] = {}
        for spec in self.specs.values():
            name = host_name(spec.server)
            if name not in self.own_host:
                by_host.setdefault(name, []).append(spec)
        for name in [n for n in self.hosts if n not in by_host]:
            await self._free(self.hosts.pop(name))
        for name, specs in by_host.items():
            addresses = published_addresses(specs, self.ipv6)
            group = self.hosts.get(name)
            if not addresses:
                if group is not None:
                    await self._free(self.hosts.pop(name))
                continue
            if group is not None and group.spec is not None and group.spec.addresses == addresses:
                continue
            if group is None:
                group = _Group(await self._new_group(), name)
                self.hosts[name] = group
            await ad.call(self.bus, group.path, ad.ENTRY_GROUP, "Reset")
            # The spec here only records which addresses the group holds.
            group.spec = ServiceSpec(name, 0, {}, addresses, name)
            for address in addresses:
                # No reverse (PTR) record: the address's reverse name belongs to the host.
                await ad.call(
                    self.bus,
                    group.path,
                    ad.ENTRY_GROUP,
                    "AddAddress",
                    "iiuss",
                    [ad.IF_UNSPEC, ad.PROTO_UNSPEC, ad.PUBLISH_NO_REVERSE, name, address],
                )
            await ad.call(self.bus, group.path, ad.ENTRY_GROUP, "Commit")

    async def _new_group(self) -> str:
        """A new entry group; when avahi-daemon refuses more objects for this client, the
        browser gives up resolvers to make room (publishing ourselves comes first)."""
        try:
            (path,) = await ad.call(self.bus, "/", ad.SERVER, "EntryGroupNew")
        except ad.AvahiError as exc:
            if not ad.too_many_objects(exc) or not await self.make_room():
                raise
            (path,) = await ad.call(self.bus, "/", ad.SERVER, "EntryGroupNew")
        return str(path)

    async def _free(self, group: _Group) -> None:
        if group.retry is not None:
            group.retry.cancel()
        # Free withdraws the group's records: avahi-daemon sends their goodbyes.
        await ad.call(self.bus, group.path, ad.ENTRY_GROUP, "Free")

    # -- group states ---------------------------------------------------------------------------

    def on_state(self, path: str, state: int, error: str) -> None:
        for instance, group in self.groups.items():
            if group.path == path:
                self._service_state(instance, group, state, error)
                return
        for name, group in self.hosts.items():
            if group.path == path:
                self._host_state(name, state, error)
                return

    def _service_state(self, instance: str, group: _Group, state: int, error: str) -> None:
        if state == ad.GROUP_ESTABLISHED:
            group.failures = 0
            log.debug("avahi: %s established as %r", instance, group.name)
        elif state == ad.GROUP_COLLISION:
            self.spawn(self._rename(instance, group))
        elif state == ad.GROUP_FAILURE:
            group.failures += 1
            delay = retry_delay(group.failures)
            log.error(
                "avahi could not publish %s (%s); trying again in %.0f s", instance, error, delay
            )
            self._retry_later(instance, group, delay)

    def _retry_later(self, instance: str, group: _Group, delay: float) -> None:
        if group.retry is not None:
            group.retry.cancel()
        group.spec = None  # so apply() fills the group again

        def due() -> None:
            group.retry = None
            self.spawn(self.apply(instance))

        group.retry = asyncio.get_running_loop().call_later(delay, due)

    async def _rename(self, instance: str, group: _Group) -> None:
        async with self.lock:
            if self.groups.get(instance) is not group or group.spec is None:
                return
            (alternative,) = await ad.call(
                self.bus, "/", ad.SERVER, "GetAlternativeServiceName", "s", [group.name]
            )
            name = next_name(group.name, str(alternative), group.renames)
            if name is None:
                group.failures += 1
                delay = retry_delay(group.failures)
                log.error(
                    "service name %r collided %d times; trying again in %.0f s as %r",
                    group.name,
                    group.renames,
                    delay,
                    instance,
                )
                group.name, group.renames = instance, 0
                self._retry_later(instance, group, delay)
                return
            log.warning(
                "service name %r is taken on the network; publishing it as %r (identity is in "
                "the TXT record, not the name)",
                group.name,
                name,
            )
            group.name = name
            group.renames += 1
            await self._fill(group, group.spec, group.host)

    def _host_state(self, name: str, state: int, error: str) -> None:
        if state not in (ad.GROUP_COLLISION, ad.GROUP_FAILURE):
            return
        # Another responder owns the name: point our services at avahi-daemon's own host name
        # (its addresses) instead; the preferred address is in each TXT record (lesson L3).
        log.warning(
            "host name %s is taken on the network (%s); its services now point at "
            "avahi-daemon's own host name",
            name,
            error or "collision",
        )
        self.own_host.add(name)
        self.spawn(self.apply_all())


async def _no_room() -> bool:
    return False
