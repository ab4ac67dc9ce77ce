"""Browsing: polling the zone (PTR, then each instance's SRV, TXT and heartbeat) and turning what
changed into Sightings, as the mDNS backend does; with the prune key, deleting an instance whose
heartbeat has not changed for three of its refresh intervals, by our own clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from eucareg.config.dnssd import DnssdConfig
from eucareg.mdns.types import Change, Sighting, SightingHandler

from . import records, updates
from .keys import Key, KeyProblem, KeyStore
from .server import MAX_BACKOFF, UPDATE_TIMEOUT, BrowseFailed, Problems, Server, backoff

log = logging.getLogger(__name__)

BROWSE_TIMEOUT = 30.0  # one browse, every query together; what is left waits for the next
MAX_INSTANCES = 5000  # instances followed; a PTR RRset of 65,535 bytes holds ~1,800 anyway
CHECKS_PER_BROWSE = 256  # instances resolved per browse (new ones first, then the oldest)
CONCURRENT_CHECKS = 16  # instances resolved at once (3 queries each)
PRUNES_PER_BROWSE = 64
STALE_REFRESHES = 3  # a heartbeat unchanged this many refresh intervals is stale

PTR = dns.rdatatype.PTR
IN = dns.rdataclass.IN
View = tuple[dict[str, str], tuple[str, ...]]


@dataclass
class _Seen:
    """What the browser knows of one instance listed in the PTR RRset."""

    view: View | None = None  # what handlers last heard (None: nothing, or REMOVED)
    checked: float = -math.inf  # loop time it was last resolved
    observed: bool = False  # its heartbeat has been read at least once
    heartbeat: tuple[bytes, ...] | None = None
    heartbeat_rrset: dns.rrset.RRset | None = None  # as read: the prune's prerequisite
    refresh: float | None = None  # the interval the heartbeat states
    since: float = 0.0  # loop time the heartbeat was first seen as it is now


class Browser:
    """What the zone lists and what handlers last heard of each instance; `run` is the task
    that polls it. `registrars_only`: browse the `_registrar` subtype only (DnssdBackend)."""

    def __init__(
        self,
        config: DnssdConfig,
        names: records.Names,
        keys: KeyStore,
        server: Server,
        problems: Problems,
        *,
        registrars_only: bool,
        retry_base: float,
    ) -> None:
        self.config = config
        self.names = names
        self.root = names.registrars if registrars_only else names.service
        self.handlers: list[SightingHandler] = []
        self._keys = keys
        self._server = server
        self._problems = problems
        self._retry_base = retry_base
        self._seen: dict[str, _Seen] = {}
        self._too_many = False
        self.browses = 0  # counters for tests and debugging
        self.pruned = 0

    async def run(self) -> None:
        failures = 0
        interval = self.config.browse_interval
        where = f"{self._server.host}:{self._server.port}"
        while True:
            try:
                await asyncio.wait_for(self.browse_once(), BROWSE_TIMEOUT)
            except (BrowseFailed, TimeoutError) as exc:
                failures += 1
                self._problems.failed(
                    "browse", f"browsing {self.root} at {where} failed: {exc or 'timeout'}"
                )
            except Exception:
                failures += 1
                log.exception("DNS-SD: browsing %s failed", self.root)
            else:
                if failures:
                    self._problems.solved("browse", f"browsing {self.root} works again")
                failures = 0
            delay = (
                interval if not failures else backoff(self._retry_base, failures + 1, MAX_BACKOFF)
            )
            await asyncio.sleep(max(delay, interval))

    async def browse_once(self) -> None:
        """One poll: list the instances, resolve a bounded batch of them (new ones first, then
        those checked longest ago), emit what changed, prune what is stale. BrowseFailed when
        the list itself cannot be read; then nothing is changed (no removals on an outage)."""
        self.browses += 1
        response = await self._server.ask(self.root, PTR)
        listed, more = _listed(self.names, response.get_rrset(response.answer, self.root, IN, PTR))
        if more and not self._too_many:
            log.warning(
                "DNS-SD: %s lists over %d instances; following the first %d",
                self.root,
                MAX_INSTANCES,
                MAX_INSTANCES,
            )
            self._too_many = True
        for label in [label for label in self._seen if label not in listed]:
            self._forget(label)
        loop = asyncio.get_running_loop()
        for label in listed:
            self._seen.setdefault(label, _Seen(since=loop.time()))
        batch = sorted(listed, key=lambda label: self._seen[label].checked)[:CHECKS_PER_BROWSE]
        slots = asyncio.Semaphore(CONCURRENT_CHECKS)
        await asyncio.gather(*(self._check(label, slots) for label in batch))
        await self._prune()

    async def _check(self, label: str, slots: asyncio.Semaphore) -> None:
        """Resolve one instance: its view (TXT and addresses) and its heartbeat."""
        name = self.names.instance(label)
        async with slots:
            try:
                txt, srv, alive = await asyncio.gather(
                    self._server.ask(name, dns.rdatatype.TXT),
                    self._server.ask(name, dns.rdatatype.SRV),
                    self._server.ask(self.names.alive(name), dns.rdatatype.TXT),
                )
                view = await self._view(name, txt, srv)
            except BrowseFailed as exc:
                log.debug("DNS-SD: could not resolve %s: %s", label, exc)
                return
        entry = self._seen.get(label)
        if entry is None:  # forgotten meanwhile (pruned)
            return
        now = asyncio.get_running_loop().time()
        entry.checked = now
        alive_rrset = alive.get_rrset(alive.answer, self.names.alive(name), IN, dns.rdatatype.TXT)
        beat, refresh = records.heartbeat(alive_rrset)
        if not entry.observed or beat != entry.heartbeat:
            entry.observed, entry.heartbeat, entry.since = True, beat, now
            entry.heartbeat_rrset = alive_rrset
        entry.refresh = refresh
        self._show(label, entry, view)

    async def _view(
        self, name: dns.name.Name, txt: dns.message.Message, srv: dns.message.Message
    ) -> View | None:
        txt_rrset = txt.get_rrset(txt.answer, name, IN, dns.rdatatype.TXT)
        srv_rrset = srv.get_rrset(srv.answer, name, IN, dns.rdatatype.SRV)
        if txt_rrset is None or srv_rrset is None:
            return None  # no service here (withdrawn, or a PTR to nothing)
        best = min(srv_rrset, key=lambda r: (r.priority, -r.weight, r.target))
        target: dns.name.Name = best.target
        addresses = records.addresses_of(srv.additional, target)
        if not addresses:
            addresses = await self._addresses(target)
        return records.txt_properties(txt_rrset), addresses

    async def _addresses(self, target: dns.name.Name) -> tuple[str, ...]:
        """The SRV target's addresses, when the SRV answer did not carry them; none when the
        server will not say (a target outside its zones)."""
        answers = await asyncio.gather(
            self._server.ask(target, dns.rdatatype.A),
            self._server.ask(target, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        found: list[dns.rrset.RRset] = []
        for answer in answers:
            if isinstance(answer, dns.message.Message):
                found.extend(answer.answer)
        return records.addresses_of(found, target)

    def _show(self, label: str, entry: _Seen, view: View | None) -> None:
        sighting = _sighting(label, entry.view, view)
        if sighting is None:
            return
        entry.view = view
        log.debug(
            "DNS-SD: %s %s addresses=%s", sighting.change.value, label, list(sighting.addresses)
        )
        self._emit(sighting)

    def _forget(self, label: str) -> None:
        entry = self._seen.pop(label, None)
        if entry is not None and entry.view is not None:
            log.debug("DNS-SD: removed %s", label)
            self._emit(Sighting(label, Change.REMOVED))

    def _emit(self, sighting: Sighting) -> None:
        for handler in list(self.handlers):
            try:
                handler(sighting)
            except Exception:
                log.exception("sighting handler failed for %s", sighting.instance)

    async def _prune(self) -> None:
        if self.config.prune_key_name is None:
            return
        try:
            key = self._keys.prune_key()
        except KeyProblem as exc:
            self._problems.failed("prune key", f"cannot prune: {exc}")
            return
        if key is None:
            return
        now = asyncio.get_running_loop().time()
        for label in _stale(self._seen, now, self.config)[:PRUNES_PER_BROWSE]:
            await self._prune_one(label, key, now)

    async def _prune_one(self, label: str, key: Key, now: float) -> None:
        """Delete a stale instance's records, provided its heartbeat is still what we saw: a
        component that refreshed meanwhile makes the prerequisite fail, and keeps them."""
        entry = self._seen.get(label)
        if entry is None:  # gone meanwhile
            return
        message = updates.prune(self.names, key, label, entry.heartbeat_rrset)
        failed = (dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN)
        ok = await self._server.update("prune", f"pruning {label}", message, UPDATE_TIMEOUT, failed)
        if ok:
            self.pruned += 1
            log.info(
                "DNS-SD: pruned %s: its heartbeat did not change for %.0f s",
                label,
                now - entry.since,
            )
            self._forget(label)
        elif label in self._seen:
            entry.since = now  # refreshed meanwhile, or the server failed: look again later


def _listed(names: records.Names, ptr: dns.rrset.RRset | None) -> tuple[dict[str, None], bool]:
    """The instance labels a PTR RRset lists, in its order, at most MAX_INSTANCES of them; and
    whether it lists more. A PTR to anything but `label.<service>` is never followed."""
    listed: dict[str, None] = {}
    for rdata in ptr or ():
        label = names.label_of(rdata.target)
        if label is None:
            continue
        if len(listed) >= MAX_INSTANCES:
            return listed, True
        listed[label] = None
    return listed, False


def _sighting(label: str, before: View | None, after: View | None) -> Sighting | None:
    """What handlers hear when an instance's view goes from `before` to `after`; None when
    nothing changed."""
    if after == before:
        return None
    if after is None:
        return Sighting(label, Change.REMOVED)
    change = Change.ADDED if before is None else Change.UPDATED
    return Sighting(label, change, txt=after[0], addresses=after[1], via="dnssd")


def _stale(seen: Mapping[str, _Seen], now: float, config: DnssdConfig) -> list[str]:
    """The instances whose heartbeat has stayed as it is for stale_after or longer."""
    return [
        label
        for label, entry in seen.items()
        if entry.observed and now - entry.since >= stale_after(entry, config)
    ]


def stale_after(entry: _Seen, config: DnssdConfig) -> float:
    """How long a heartbeat may stay unchanged: three of the refresh intervals it states
    (this host's own when it states none), and never less than three browses."""
    refresh = entry.refresh if entry.refresh is not None else config.refresh
    return STALE_REFRESHES * max(refresh, config.browse_interval)
