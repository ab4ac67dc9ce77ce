"""DnssdBackend: the announce/browse interface of eucareg/mdns/types.py over unicast DNS, on the
agent's event loop: a Publisher (publisher.py) and a Browser (browser.py) that share the DNS
server (server.py), the TSIG keys (keys.py) and the log of problems, and the tasks running them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from eucareg.config.dnssd import DnssdConfig
from eucareg.mdns.types import ServiceSpec, SightingHandler

from . import records
from .browser import Browser
from .keys import KeyStore
from .publisher import Publisher
from .server import Problems, Server

log = logging.getLogger(__name__)


class DnssdBackend:
    """Announcer and Watcher over unicast DNS; one per agent, on the agent's loop.

    `registrars_only`: browse only the `_registrar` subtype (CLCs and registered CCs), all
    that an agent without a registrar looks for; a registrar host browses every instance.
    """

    def __init__(
        self,
        config: DnssdConfig,
        *,
        registrars_only: bool = False,
        retry_base: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._registrars_only = registrars_only
        names = records.Names(config.domain)
        keys = KeyStore(config)
        problems = Problems()
        self._server = Server(config.server, problems)
        self.publisher = Publisher(
            config, names, keys, self._server, problems, retry_base=retry_base, wall=wall
        )
        self.browser = Browser(
            config,
            names,
            keys,
            self._server,
            problems,
            registrars_only=registrars_only,
            retry_base=retry_base,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self._closed = False

    # Counters, for tests and debugging.

    @property
    def updates_sent(self) -> int:
        return self._server.updates_sent

    @property
    def browses(self) -> int:
        return self.browser.browses

    @property
    def pruned(self) -> int:
        return self.browser.pruned

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        self._spawn("publisher", self.publisher.run)
        if self.browser.handlers:
            self._spawn("browser", self.browser.run)
        log.info(
            "DNS-SD: %s in %s at %s:%d",
            "publishing and browsing registrars"
            if self._registrars_only
            else "publishing and browsing",
            self.config.domain,
            *self.config.server,
        )

    def _spawn(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if name not in self._tasks and not self._closed:
            task = asyncio.get_running_loop().create_task(loop(), name=f"dnssd-{name}")
            self._tasks[name] = task

    async def close(self) -> None:
        """Stop browsing and refreshing, then delete whatever we still have in the zone
        (bounded: what the server does not take at once is left to the pruning)."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.publisher.delete_all()

    # -- Announcer ------------------------------------------------------------------------

    async def publish(self, spec: ServiceSpec) -> None:
        """Ask for `spec` to be in the zone; the publisher task writes it (at once, unless the
        server is failing) and keeps it there. Never waits for the server."""
        self.publisher.publish(spec)

    async def withdraw(self, instance: str) -> None:
        """Delete the instance's records now; if the server does not take it at once, the
        publisher task keeps trying (and close() once more)."""
        self.publisher.withdraw(instance)
        if not self._closed:
            await self.publisher.delete_now(instance)

    def greet(self, instance: str) -> bool:
        return False  # a unicast zone is read when the browser asks; there is no one to greet

    # -- Watcher --------------------------------------------------------------------------

    def watch(self, handler: SightingHandler) -> None:
        self.browser.handlers.append(handler)
        if self._started:
            self._spawn("browser", self.browser.run)

    async def browse_once(self) -> None:
        """One poll of the zone, now: what the browser task does every `browse_interval`."""
        await self.browser.browse_once()
