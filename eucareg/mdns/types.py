"""What the rest of eucareg sees of mDNS: ServiceSpec (what to publish) and Sighting (what was
heard), and the small interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class ServiceSpec:
    """One service to publish. `instance` is a label only; identity lives in `txt`."""

    instance: str
    port: int
    txt: Mapping[str, str]
    addresses: tuple[str, ...]
    server: str  # the responder's host name, e.g. "eucareg-3f2a9c.local."


class Change(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclass(frozen=True)
class Sighting:
    """What a browser heard: one service instance appearing, changing or leaving."""

    instance: str
    change: Change
    txt: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()
    via: str = "mdns"  # "dnssd": browsed in the site's DNS (eucareg/dnssd), not multicast


SightingHandler = Callable[[Sighting], None]


class Announcer(Protocol):
    async def publish(self, spec: ServiceSpec) -> None: ...
    async def withdraw(self, instance: str) -> None: ...

    def greet(self, instance: str) -> bool:
        """Multicast a published service's records once more, unasked, unless they went out
        less than a second ago (RFC 6762 section 6); whether they went out now."""
        ...


class Watcher(Protocol):
    def watch(self, handler: SightingHandler) -> None: ...
