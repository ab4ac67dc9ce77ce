"""Publishing: this host's instances written into the zone by RFC 2136 updates (updates.py), and
rewritten, heartbeat included, every `refresh`, since BIND has no update leases (docs/dnssd.md,
"Keeping records alive"); deleted when withdrawn or closed. One update at a time per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from eucareg.config.dnssd import DnssdConfig
from eucareg.core.model import Role
from eucareg.mdns.types import ServiceSpec

from . import records, updates
from .keys import Key, KeyProblem, KeyStore
from .server import UPDATE_TIMEOUT, Problems, Server, backoff

log = logging.getLogger(__name__)

STOP_TIMEOUT = 0.5  # a withdrawal, and the deletions left at close (the agent stops in < 3 s)


class Publisher:
    """What this host's components want in the zone, what we last put there (and when), and
    what must go; `run` is the task that writes it."""

    def __init__(
        self,
        config: DnssdConfig,
        names: records.Names,
        keys: KeyStore,
        server: Server,
        problems: Problems,
        *,
        retry_base: float,
        wall: Callable[[], float],
    ) -> None:
        self.config = config
        self.names = names
        self._keys = keys
        self._server = server
        self._problems = problems
        self._retry_base = retry_base
        self._wall = wall
        self._ttl = int(min(3600, max(10, config.refresh)))
        self._wanted: dict[str, ServiceSpec] = {}
        self._sent: dict[str, tuple[ServiceSpec, float, float]] = {}  # spec, at, next due
        self._gone: set[str] = set()
        self._roles: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()

    def publish(self, spec: ServiceSpec) -> None:
        """Ask for `spec` to be in the zone; the task writes it (at once, unless the server is
        failing) and keeps it there."""
        self._wanted[spec.instance] = spec
        self._roles[spec.instance] = _role(spec.txt.get("type", ""))
        self._gone.discard(spec.instance)
        sent = self._sent.get(spec.instance)
        if sent is None or sent[0] != spec:
            self._wake.set()

    def withdraw(self, instance: str) -> None:
        """Ask for the instance's records to go; the task deletes them until that works."""
        self._wanted.pop(instance, None)
        self._gone.add(instance)

    async def delete_now(self, instance: str) -> None:
        """Try a withdrawn instance's deletion at once, for STOP_TIMEOUT; the task goes on
        trying if the server did not take it."""
        # Bounded as a whole (an update of the task may hold the instance's lock): the agent
        # gives its goodbyes one second, and mDNS's must not be cut short for ours.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._delete(instance, STOP_TIMEOUT), STOP_TIMEOUT)
        if instance in self._gone:
            self._wake.set()

    async def delete_all(self) -> None:
        """At close, with the task stopped: delete whatever we still have in the zone (bounded:
        what the server does not take in STOP_TIMEOUT is left to the registrars' pruning)."""
        self._gone.update(self._wanted)
        self._wanted.clear()
        if self._gone:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(self._delete(i, STOP_TIMEOUT) for i in list(self._gone))),
                    STOP_TIMEOUT,
                )

    async def run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                ok = await self._sync()
            except Exception:
                log.exception("DNS-SD: publishing failed")
                ok = False
            if ok:
                failures = 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_due())
            else:
                failures += 1
                await asyncio.sleep(backoff(self._retry_base, failures, self.config.refresh))

    def _next_due(self) -> float | None:
        """Seconds until an instance must be written again; None when nothing is published."""
        now = asyncio.get_running_loop().time()
        due: float | None = None
        for instance, spec in self._wanted.items():
            sent = self._sent.get(instance)
            if sent is None or sent[0] != spec:
                return 0.0
            wait = max(0.0, sent[2] - now)
            due = wait if due is None else min(due, wait)
        return 0.0 if self._gone else due

    async def _sync(self) -> bool:
        """Delete what must go, write what changed or is due; True when all of it worked."""
        ok = True
        for instance in list(self._gone):
            ok = await self._delete(instance, UPDATE_TIMEOUT) and ok
        now = asyncio.get_running_loop().time()
        for instance, spec in list(self._wanted.items()):
            sent = self._sent.get(instance)
            if sent is not None and sent[0] == spec and now < sent[2]:
                continue
            ok = await self._put(instance, UPDATE_TIMEOUT) and ok
        return ok

    def _lock(self, instance: str) -> asyncio.Lock:
        return self._locks.setdefault(instance, asyncio.Lock())

    async def _put(self, instance: str, timeout: float) -> bool:
        async with self._lock(instance):
            spec = self._wanted.get(instance)
            if spec is None:  # withdrawn meanwhile
                return True
            try:
                key = self._component_key(instance)
                heartbeat = records.heartbeat_rdata(self._wall(), self.config.refresh)
                message = updates.put(self.names, key, instance, spec, self._ttl, heartbeat)
            except (KeyProblem, ValueError) as exc:
                self._problems.failed(f"put {instance}", f"cannot publish {instance}: {exc}")
                return False
            loop = asyncio.get_running_loop()
            if not await self._server.update(
                f"put {instance}", f"publishing {instance}", message, timeout
            ):
                return False
            now = loop.time()
            # Spread out: components started together must not all refresh together.
            self._sent[instance] = (spec, now, now + self.config.refresh * random.uniform(0.8, 1))
            log.debug("DNS-SD: published %s txt=%s", instance, dict(spec.txt))
            return True

    async def _delete(self, instance: str, timeout: float) -> bool:
        async with self._lock(instance):
            if instance not in self._gone:
                return True
            try:
                key = self._component_key(instance)
                message = updates.delete(self.names, key, instance)
            except (KeyProblem, ValueError) as exc:
                self._problems.failed(f"delete {instance}", f"cannot withdraw {instance}: {exc}")
                return False
            if not await self._server.update(
                f"delete {instance}", f"withdrawing {instance}", message, timeout
            ):
                return False
            self._gone.discard(instance)
            self._sent.pop(instance, None)
            log.debug("DNS-SD: withdrew %s", instance)
            return True

    def _component_key(self, instance: str) -> Key:
        # An instance withdrawn without being published here has no TXT type on record; its
        # label is `<TXT type>-<id>` (docs/dnssd.md, "Making a component's key").
        role = self._roles.get(instance) or _role(instance.partition("-")[0])
        return self._keys.component_key(instance, role)


def _role(txt_type: str) -> str:
    try:
        return Role.from_txt_type(txt_type).value
    except ValueError:
        return txt_type
