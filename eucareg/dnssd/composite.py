"""One backend made of several (mDNS and DNS-SD): every announcement goes out through each, and
what they hear is merged per instance, so handlers cannot tell how a component was heard.

Merging: an instance is ADDED when the first backend hears it and REMOVED when the last one
that heard it lets it go; in between, an UPDATED goes out whenever the latest view of any
backend differs from the one handlers last got. Two backends that agree say nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from eucareg.mdns.types import Announcer, Change, ServiceSpec, Sighting, SightingHandler, Watcher

log = logging.getLogger(__name__)

View = tuple[Mapping[str, str], tuple[str, ...], str]  # TXT, addresses, how heard


class Backend(Announcer, Watcher, Protocol):
    """What eucareg/agent/host.py calls MdnsBackend (not imported: no cycle)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


class CompositeBackend:
    def __init__(self, backends: Sequence[Backend]) -> None:
        if not backends:
            raise ValueError("a composite backend needs at least one backend")
        self.backends = tuple(backends)
        self._handlers: list[SightingHandler] = []
        self._watching = False
        self._views: dict[str, dict[int, View]] = {}  # instance -> source -> view, by age
        self._emitted: dict[str, View] = {}

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def close(self) -> None:
        results = await asyncio.gather(
            *(backend.close() for backend in self.backends), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def publish(self, spec: ServiceSpec) -> None:
        await asyncio.gather(*(backend.publish(spec) for backend in self.backends))

    async def withdraw(self, instance: str) -> None:
        await asyncio.gather(*(backend.withdraw(instance) for backend in self.backends))

    def greet(self, instance: str) -> bool:
        return any([backend.greet(instance) for backend in self.backends])

    def watch(self, handler: SightingHandler) -> None:
        self._handlers.append(handler)
        if not self._watching:
            self._watching = True
            for source, backend in enumerate(self.backends):
                backend.watch(self._from(source))

    def _from(self, source: int) -> SightingHandler:
        def heard(sighting: Sighting) -> None:
            self._heard(source, sighting)

        return heard

    def _heard(self, source: int, sighting: Sighting) -> None:
        instance = sighting.instance
        views = self._views.setdefault(instance, {})
        views.pop(source, None)
        if sighting.change is not Change.REMOVED:
            # now the latest
            views[source] = (dict(sighting.txt), tuple(sighting.addresses), sighting.via)
        if not views:
            del self._views[instance]
            if self._emitted.pop(instance, None) is not None:
                self._emit(Sighting(instance, Change.REMOVED))
            return
        view = next(reversed(views.values()))
        last = self._emitted.get(instance)
        if last == view:
            return
        self._emitted[instance] = view
        change = Change.ADDED if last is None else Change.UPDATED
        self._emit(Sighting(instance, change, txt=view[0], addresses=view[1], via=view[2]))

    def _emit(self, sighting: Sighting) -> None:
        for handler in list(self._handlers):
            try:
                handler(sighting)
            except Exception:
                log.exception("sighting handler failed for %s", sighting.instance)
