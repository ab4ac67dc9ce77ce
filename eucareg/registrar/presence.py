"""Who the registrar hears now: live announcements by instance (mDNS, or HTTP under a lease),
open credential requests,
when each component was last heard, and which (id, key) pairs have proved possession. Plain
bookkeeping with no decisions in it; the engine decides what a change means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Set

from eucareg.core.model import Announcement


class Online(Set[str]):
    """Components heard now: announcing on mDNS, or holding a request open over HTTP."""

    def __init__(self, live: dict[str, Announcement], polling: dict[str, int]) -> None:
        self._live = live
        self._polling = polling

    def __contains__(self, item: object) -> bool:
        return item in self._live or item in self._polling

    def __iter__(self) -> Iterator[str]:
        return iter(self._live.keys() | self._polling.keys())

    def __len__(self) -> int:
        return len(self._live.keys() | self._polling.keys())


class Presence:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.live: dict[str, Announcement] = {}  # component id -> accepted live announcement
        self.instances: dict[str, str] = {}  # DNS-SD instance -> component id
        # Components heard over HTTP (not by instance: a DNS-SD instance may be named anything).
        self.leased: set[str] = set()
        self.last_seen: dict[str, float] = {}
        self.polling: dict[str, int] = {}  # component id -> open credential requests
        self.proven: set[tuple[str, str]] = set()  # (id, fingerprint) that signed a request
        self.online = Online(self.live, self.polling)

    def lease(self, ann: Announcement) -> Announcement | None:
        """Hear `ann` over HTTP, as if it were announced on mDNS, until end_lease (the engine
        times it); the live announcement it replaces, if any."""
        previous = self.live.get(ann.component_id)
        self.leased.add(ann.component_id)
        self.live[ann.component_id] = ann
        self.seen(ann.component_id)
        return previous

    def end_lease(self, component_id: str) -> bool:
        """The HTTP announcement was not renewed in time; True when nothing else announces
        the component now (it is no longer live)."""
        if component_id not in self.leased:
            return False
        self.leased.discard(component_id)
        self.seen(component_id)
        if component_id in self.instances.values():
            return False
        self.live.pop(component_id, None)
        return True

    def seen(self, component_id: str) -> None:
        self.last_seen[component_id] = self.clock()

    def forget_instance(self, instance: str) -> str | None:
        """The instance was withdrawn; the component id that no instance announces any more
        (None if the instance was unknown, or the id is still announced by another one)."""
        component_id = self.instances.pop(instance, None)
        if component_id is None or component_id in self.instances.values():
            return None
        if component_id in self.leased:
            return None  # still heard over HTTP
        self.live.pop(component_id, None)
        return component_id

    def request_opened(self, component_id: str) -> None:
        self.polling[component_id] = self.polling.get(component_id, 0) + 1
        self.seen(component_id)

    def request_closed(self, component_id: str) -> bool:
        """A request ended; True when it was the component's last open one."""
        left = self.polling.get(component_id, 1) - 1
        self.seen(component_id)
        if left > 0:
            self.polling[component_id] = left
            return False
        self.polling.pop(component_id, None)
        return True

    def silent(self, component_id: str) -> bool:
        """Heard on no source right now."""
        return component_id not in self.online
