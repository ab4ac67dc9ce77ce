"""mDNS/DNS-SD announce and browse, behind a small interface with a python-zeroconf backend.

The rest of eucareg sees only ServiceSpec (what to publish) and Sighting (what was heard), so a
second backend (the host's avahi-daemon over D-Bus) can replace this one without other changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Mapping
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf, current_time_millis
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from eucareg.core.txt import SERVICE_TYPE
from eucareg.mdns.types import Change, ServiceSpec, Sighting, SightingHandler

log = logging.getLogger(__name__)

# Bursts of hundreds of announcements overflow the default 208 KiB receive buffer.
RECEIVE_BUFFER = 4 * 1024 * 1024
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_ATTEMPTS = 3
# RFC 6762 section 6: a record is multicast on an interface at most once a second.
MULTICAST_INTERVAL = 1.0
# python-zeroconf announces a new or changed service 3 times, 225 ms apart, from publish();
# if we cannot see when it is done, we assume this.
ANNOUNCING_FOR = 0.5


class ZeroconfBackend:
    """Announcer and Watcher on one python-zeroconf instance, sharing the agent's event loop.

    Instance names embed the component id, so they are unique by construction; we therefore
    publish without probing (cooperating responders). Probing queries the whole service type,
    which with N services costs O(N^2) packets and loses records (docs/mdns.md).
    """

    def __init__(self, *, ipv6: bool = False) -> None:
        self._ip_version = IPVersion.All if ipv6 else IPVersion.V4Only
        self._started: AsyncZeroconf | None = None
        self._published: dict[str, AsyncServiceInfo] = {}
        # Loop time when each published service's records last went out unasked, and when
        # each host name's address records did (a CLC and a CC of one host share them).
        self._multicast_at: dict[str, float] = {}
        self._addresses_at: dict[str, float] = {}
        # python-zeroconf's announcements of a service still going out (its broadcast task).
        self._announcing: dict[str, Any] = {}
        self._browser: AsyncServiceBrowser | None = None
        self._handlers: list[SightingHandler] = []
        self._resolving: set[asyncio.Task[None]] = set()

    @property
    def _aiozc(self) -> AsyncZeroconf:
        if self._started is None:
            raise RuntimeError("ZeroconfBackend.start() has not been awaited")
        return self._started

    async def start(self) -> None:
        # Made here, inside the running loop, with use_asyncio=True: otherwise python-zeroconf
        # starts a thread with a loop of its own, and its callbacks would drive the registrar
        # from a second loop, racing the HTTP API's.
        zc = Zeroconf(ip_version=self._ip_version, use_asyncio=True)
        self._started = AsyncZeroconf(zc=zc)
        await self._aiozc.zeroconf.async_wait_for_start()
        for reader in self._aiozc.zeroconf.engine.readers:
            sock = reader.transport.get_extra_info("socket")
            if sock is not None:
                _grow_receive_buffer(sock)

    async def close(self) -> None:
        if self._started is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._resolving):
            task.cancel()
        # Goodbye packets for everything still published, so browsers drop us at once.
        await asyncio.gather(*(self.withdraw(instance) for instance in list(self._published)))
        await self._aiozc.async_close()

    # -- Announcer ------------------------------------------------------------------------

    def _info(self, spec: ServiceSpec) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{spec.instance}.{SERVICE_TYPE}",
            port=spec.port,
            properties=dict(spec.txt),
            server=spec.server,
            addresses=[ipaddress.ip_address(a).packed for a in spec.addresses],
        )

    async def publish(self, spec: ServiceSpec) -> None:
        """Publish a service, or update it in place when already published."""
        info = self._info(spec)
        current = self._published.get(spec.instance)
        if current is not None:
            if _same(current, info):
                return
            announcing = await self._aiozc.async_update_service(info)
        else:
            announcing = await self._aiozc.async_register_service(info, cooperating_responders=True)
        self._published[spec.instance] = info
        self._announced(spec.instance, info, announcing)
        log.debug("published %s txt=%s", spec.instance, dict(spec.txt))

    def _announced(self, instance: str, info: AsyncServiceInfo, announcing: Any) -> None:
        """python-zeroconf is announcing `instance` now: no greeting until a second after its
        last announcement, which a busy loop may send well after the nominal 0.45 s."""
        now = asyncio.get_running_loop().time()
        self._multicast_at[instance] = now + ANNOUNCING_FOR
        self._addresses_at[str(info.server)] = now + ANNOUNCING_FOR
        if announcing is None or not hasattr(announcing, "add_done_callback"):
            return
        self._announcing[instance] = announcing

        def done(_: Any) -> None:
            if self._announcing.get(instance) is announcing:
                del self._announcing[instance]
                at = asyncio.get_running_loop().time()
                self._multicast_at[instance] = at
                self._addresses_at[str(info.server)] = at

        announcing.add_done_callback(done)

    def greet(self, instance: str) -> bool:
        info = self._published.get(instance)
        if info is None or self._started is None or instance in self._announcing:
            return False
        now = asyncio.get_running_loop().time()
        if now - self._multicast_at.get(instance, -MULTICAST_INTERVAL) < MULTICAST_INTERVAL:
            return False
        zc = self._aiozc.zeroconf
        if _multicast_lately(zc, info):
            return False
        # The host's address records go out with the first greeting of a second only.
        server = str(info.server)
        addresses = now - self._addresses_at.get(server, -MULTICAST_INTERVAL) >= MULTICAST_INTERVAL
        zc.async_send(zc.generate_service_broadcast(info, None, addresses))
        self._multicast_at[instance] = now
        if addresses:
            self._addresses_at[server] = now
        log.debug("greeted with %s", instance)
        return True

    async def withdraw(self, instance: str) -> None:
        self._multicast_at.pop(instance, None)
        self._announcing.pop(instance, None)
        info = self._published.pop(instance, None)
        if info is not None:
            # The goodbye packets go out from a task; wait for it, or a shutdown would
            # close the sockets first and browsers would keep us for the records' TTL.
            goodbye = await self._aiozc.async_unregister_service(info)
            await goodbye
            log.debug("withdrew %s", instance)

    # -- Watcher --------------------------------------------------------------------------

    def watch(self, handler: SightingHandler) -> None:
        self._handlers.append(handler)
        if self._browser is None:
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
            )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        instance = name.removesuffix("." + service_type)
        if state_change is ServiceStateChange.Removed:
            self._emit(Sighting(instance, Change.REMOVED))
            return
        change = Change.ADDED if state_change is ServiceStateChange.Added else Change.UPDATED
        log.debug("browser: %s %s", change.value, instance)
        task = asyncio.get_running_loop().create_task(
            self._resolve(service_type, name, instance, change)
        )
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, service_type: str, name: str, instance: str, change: Change) -> None:
        info = AsyncServiceInfo(service_type, name)
        # Bursts lose packets; a service we cannot resolve now would otherwise stay unheard
        # until it changes, so ask again a few times before giving up on it.
        for attempt in range(RESOLVE_ATTEMPTS):
            if await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS * (attempt + 1)):
                break
        else:
            log.warning("could not resolve %s after %d attempts", instance, RESOLVE_ATTEMPTS)
            return
        self._emit(
            Sighting(
                instance,
                change,
                txt=_decode_properties(info.properties),
                addresses=tuple(info.parsed_scoped_addresses()),
            )
        )

    def _emit(self, sighting: Sighting) -> None:
        for handler in self._handlers:
            try:
                handler(sighting)
            except Exception:
                log.exception("sighting handler failed for %s", sighting.instance)


def _grow_receive_buffer(sock: socket.socket) -> None:
    """SO_RCVBUF is capped by net.core.rmem_max; root may exceed it with SO_RCVBUFFORCE."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, RECEIVE_BUFFER)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    log.debug("mDNS receive buffer: %d bytes (asked for %d)", size, RECEIVE_BUFFER)


def _multicast_lately(zc: Zeroconf, info: AsyncServiceInfo) -> bool:
    """Whether python-zeroconf itself multicast the service's records less than a second ago,
    in answer to a query: what it sends comes back into its own cache, as it does for others."""
    cache = getattr(zc, "cache", None)
    if cache is None:
        return False
    now = current_time_millis()
    for record in (info.dns_service(), info.dns_text()):
        held = cache.async_get_unique(record)
        if held is not None and now - held.created < MULTICAST_INTERVAL * 1000:
            return True
    return False


def _same(a: AsyncServiceInfo, b: AsyncServiceInfo) -> bool:
    return (
        a.properties == b.properties
        and a.port == b.port
        and a.server == b.server
        and a.addresses == b.addresses
    )


def _decode_properties(properties: Mapping[bytes, bytes | None] | Any) -> dict[str, str]:
    """TXT keys and values as text; undecodable or value-less keys are dropped, not guessed."""
    out: dict[str, str] = {}
    for key, value in dict(properties).items():
        if value is None:
            continue
        try:
            out[key.decode("ascii").lower()] = value.decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            continue
    return out
