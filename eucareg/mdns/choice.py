"""Which mDNS backend a host uses (`[mdns] backend`): python-zeroconf, the host's avahi-daemon,
or `auto`, which picks Avahi only when it runs in our own network namespace, and says why.

Every backend here has `name` (what is in use: "zeroconf", "avahi", or "pending" before an
`auto` choice is made) and `reason`, which `eucareg status` and the start-up log show.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns.types import Announcer, ServiceSpec, SightingHandler, Watcher

log = logging.getLogger(__name__)

AVAHI, ZEROCONF, AUTO = "avahi", "zeroconf", "auto"


class Backend(Announcer, Watcher, Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


Prober = Callable[[], Awaitable[ad.Probe]]


def decide(setting: str, probe: ad.Probe | None) -> tuple[str, str]:
    """The backend for a setting, and why; `probe` is needed (and used) only for `auto`."""
    if setting == ZEROCONF:
        return ZEROCONF, "forced by [mdns] backend"
    if setting == AVAHI:
        return AVAHI, "forced by [mdns] backend"
    if setting != AUTO:
        raise ValueError(f"unknown mDNS backend {setting!r}")
    if probe is None:
        raise ValueError("auto needs a probe of the system bus")
    if probe.usable:
        return AVAHI, f"auto: {probe.reason}"
    return ZEROCONF, f"auto: {probe.reason}"


def make(name: str, *, ipv6: bool) -> Backend:
    """A backend by name; python-zeroconf and dbus-fast are each imported only when used."""
    if name == AVAHI:
        from eucareg.mdns.avahi_backend import AvahiBackend

        return AvahiBackend(ipv6=ipv6)
    from eucareg.mdns.zeroconf_backend import ZeroconfBackend

    return ZeroconfBackend(ipv6=ipv6)


class MdnsUnavailable(OSError):
    """`[mdns] backend = "avahi"`, and avahi-daemon's bus cannot be reached."""


async def preview(setting: str, prober: Prober | None = None) -> dict[str, str]:
    """What `eucareg check-config` shows: the setting, the backend it picks now, and why."""
    probe = await (prober or ad.probe)() if setting == AUTO else None
    name, reason = decide(setting, probe)
    return {"setting": setting, "backend": name, "reason": reason}


class ChosenBackend:
    """The backend `[mdns] backend` asks for, made at start(): for `auto`, after asking the
    system bus (asynchronously, so no event loop is blocked) whether Avahi may be used."""

    def __init__(self, setting: str, *, ipv6: bool, prober: Prober | None = None) -> None:
        if setting not in (AUTO, AVAHI, ZEROCONF):
            raise ValueError(f"unknown mDNS backend {setting!r}")
        self.setting = setting
        self.ipv6 = ipv6
        self._prober: Prober = prober or ad.probe
        self._inner: Backend | None = None
        self.name = "pending"
        self.reason = "not started"
        self._handlers: list[SightingHandler] = []

    @property
    def inner(self) -> Backend:
        if self._inner is None:
            raise RuntimeError("the mDNS backend has not started")
        return self._inner

    async def start(self) -> None:
        probe = await self._prober() if self.setting == AUTO else None
        name, reason = decide(self.setting, probe)
        inner = make(name, ipv6=self.ipv6)
        try:
            await inner.start()
        except ad.AvahiError as exc:
            if self.setting == AVAHI:
                raise MdnsUnavailable(
                    f'[mdns] backend = "avahi", but avahi-daemon cannot be reached: {exc}'
                ) from exc
            # auto: the daemon went away between the probe and now.
            name, reason = ZEROCONF, f"auto: Avahi failed at start ({exc})"
            inner = make(name, ipv6=self.ipv6)
            await inner.start()
        self._inner, self.name, self.reason = inner, name, reason
        log.info("mDNS backend: %s (%s)", name, reason)
        for handler in self._handlers:
            inner.watch(handler)

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()

    async def publish(self, spec: ServiceSpec) -> None:
        await self.inner.publish(spec)

    async def withdraw(self, instance: str) -> None:
        if self._inner is not None:
            await self._inner.withdraw(instance)

    def greet(self, instance: str) -> bool:
        return self._inner.greet(instance) if self._inner is not None else False

    def watch(self, handler: SightingHandler) -> None:
        if self._inner is None:
            self._handlers.append(handler)  # handed over at start()
        else:
            self._inner.watch(handler)

    def describe(self) -> dict[str, Any]:
        """What `eucareg status` shows under "mdns"."""
        return {"backend": self.name, "setting": self.setting, "reason": self.reason}
