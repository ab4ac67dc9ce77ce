"""DnssdBackend: the announce/browse interface of eucareg/mdns/types.py over unicast DNS.

Publishing is RFC 2136 dynamic updates signed with TSIG, into the site's zone; browsing is
polling that zone (PTR, then each instance's SRV, TXT and heartbeat) and turning what changed
into Sightings, as the mDNS backend does. Everything runs on the agent's event loop
(dnspython's asyncquery). A DNS server that is down, refuses, or answers garbage never raises
into the agent: it is logged once, and the work is retried with a bounded back-off.

BIND has no update leases, so records are kept alive here (docs/dnssd.md, "Keeping records
alive"): each component rewrites its records, heartbeat included, every `refresh`, and deletes
them when withdrawn or closed; a browser holding the prune key deletes an instance whose
heartbeat has not changed for three of its refresh intervals, by its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update

from eucareg.config.file import DnssdConfig
from eucareg.core.model import Role
from eucareg.mdns.types import Change, ServiceSpec, Sighting, SightingHandler

from . import records
from .keys import Key, KeyProblem, KeyStore

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 2.0  # one query, UDP and its TCP retry together
UPDATE_TIMEOUT = 3.0  # one update, connect to answer
STOP_TIMEOUT = 0.5  # a withdrawal, and the deletions left at close (the agent stops in < 3 s)
BROWSE_TIMEOUT = 30.0  # one browse, every query together; what is left waits for the next
MAX_BACKOFF = 60.0
EDNS_PAYLOAD = 1232  # larger answers come over TCP
MAX_INSTANCES = 5000  # instances followed; a PTR RRset of 65,535 bytes holds ~1,800 anyway
CHECKS_PER_BROWSE = 256  # instances resolved per browse (new ones first, then the oldest)
CONCURRENT_CHECKS = 16  # instances resolved at once (3 queries each)
PRUNES_PER_BROWSE = 64
STALE_REFRESHES = 3  # a heartbeat unchanged this many refresh intervals is stale

PTR = dns.rdatatype.PTR
IN = dns.rdataclass.IN
View = tuple[dict[str, str], tuple[str, ...]]


class BrowseFailed(Exception):
    """A query got no usable answer (timeout, refusal, garbage); the message says which."""


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


@dataclass
class _Problems:
    """Each kind of failure is logged once when it starts (and when its text changes), and
    once at info level when it ends; retries in between are quiet."""

    current: dict[str, str] = field(default_factory=dict)

    def failed(self, topic: str, text: str) -> None:
        if self.current.get(topic) != text:
            log.warning("DNS-SD: %s", text)
            self.current[topic] = text
        else:
            log.debug("DNS-SD: %s (again)", text)

    def solved(self, topic: str, text: str) -> None:
        if self.current.pop(topic, None) is not None:
            log.info("DNS-SD: %s", text)


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
        self.names = records.Names(config.domain)
        self._keys = KeyStore(config)
        self._registrars_only = registrars_only
        self._retry_base = retry_base
        self._wall = wall
        self._ttl = int(min(3600, max(10, config.refresh)))
        self._problems = _Problems()
        # Publishing: what we want in the zone, what we last put there (and when), and what
        # must go; one update at a time per instance.
        self._wanted: dict[str, ServiceSpec] = {}
        self._sent: dict[str, tuple[ServiceSpec, float, float]] = {}  # spec, at, next due
        self._gone: set[str] = set()
        self._roles: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        # Browsing.
        self._handlers: list[SightingHandler] = []
        self._seen: dict[str, _Seen] = {}
        self._too_many = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self._closed = False
        self.updates_sent = 0  # counters for tests and debugging
        self.browses = 0
        self.pruned = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        self._spawn("publisher", self._publish_loop)
        if self._handlers:
            self._spawn("browser", self._browse_loop)
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
        (bounded: what the server does not take in STOP_TIMEOUT is left to the pruning)."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._gone.update(self._wanted)
        self._wanted.clear()
        if self._gone:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(self._delete(i, STOP_TIMEOUT) for i in list(self._gone))),
                    STOP_TIMEOUT,
                )

    # -- Announcer ------------------------------------------------------------------------

    async def publish(self, spec: ServiceSpec) -> None:
        """Ask for `spec` to be in the zone; the publisher task writes it (at once, unless the
        server is failing) and keeps it there. Never waits for the server."""
        self._wanted[spec.instance] = spec
        self._roles[spec.instance] = _role(spec.txt.get("type", ""))
        self._gone.discard(spec.instance)
        sent = self._sent.get(spec.instance)
        if sent is None or sent[0] != spec:
            self._wake.set()

    async def withdraw(self, instance: str) -> None:
        """Delete the instance's records now; if the server does not take it within
        STOP_TIMEOUT, the publisher task keeps trying (and close() once more)."""
        self._wanted.pop(instance, None)
        self._gone.add(instance)
        if self._closed:
            return
        # Bounded as a whole (an update of the publisher may hold the instance's lock): the
        # agent gives its goodbyes one second, and mDNS's must not be cut short for ours.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._delete(instance, STOP_TIMEOUT), STOP_TIMEOUT)
        if instance in self._gone:
            self._wake.set()

    def greet(self, instance: str) -> bool:
        return False  # a unicast zone is read when the browser asks; there is no one to greet

    # -- publishing -----------------------------------------------------------------------

    async def _publish_loop(self) -> None:
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
                due = self._next_due()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), due)
            else:
                failures += 1
                await asyncio.sleep(self._backoff(failures, self.config.refresh))

    def _backoff(self, failures: int, ceiling: float) -> float:
        delay = self._retry_base * 2 ** min(failures - 1, 16)
        return float(min(delay, ceiling, MAX_BACKOFF))

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
                message = self._put_message(key, instance, spec)
            except (KeyProblem, ValueError) as exc:
                self._problems.failed(f"put {instance}", f"cannot publish {instance}: {exc}")
                return False
            loop = asyncio.get_running_loop()
            if not await self._update(
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
                message = self._delete_message(key, instance)
            except (KeyProblem, ValueError) as exc:
                self._problems.failed(f"delete {instance}", f"cannot withdraw {instance}: {exc}")
                return False
            if not await self._update(
                f"delete {instance}", f"withdrawing {instance}", message, timeout
            ):
                return False
            self._gone.discard(instance)
            self._sent.pop(instance, None)
            log.debug("DNS-SD: withdrew %s", instance)
            return True

    def _component_key(self, instance: str) -> Key:
        role = self._roles.get(instance) or _role(instance.partition("-")[0])
        return self._keys.component_key(instance, role)

    def _message(self, key: Key) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(
            self.names.domain, keyring=key.keyring, keyname=key.name, keyalgorithm=key.algorithm
        )

    def _put_message(self, key: Key, instance: str, spec: ServiceSpec) -> dns.update.UpdateMessage:
        """Every record of the instance, replaced in one atomic update."""
        name = self.names.instance(instance)
        alive = self.names.alive(name)
        pointer = _ptr(name)
        message = self._message(key)
        ttl = self._ttl
        message.add(self.names.service, ttl, pointer)
        if "port" in spec.txt:  # a CLC, or a registered CC: a registrar
            message.add(self.names.registrars, ttl, pointer)
        else:
            message.delete(self.names.registrars, pointer)
        srv = dns.rdata.from_text(IN, dns.rdatatype.SRV, f"0 0 {spec.port} {name}")
        message.replace(name, ttl, srv)
        message.replace(name, ttl, records.txt_rdata(spec.txt))
        v4, v6 = records.address_rdatas(spec.addresses)
        for rdtype, found in ((dns.rdatatype.A, v4), (dns.rdatatype.AAAA, v6)):
            if found:
                message.replace(name, ttl, *found)
            else:
                message.delete(name, rdtype)
        message.replace(alive, ttl, records.heartbeat_rdata(self._wall(), self.config.refresh))
        return message

    def _delete_message(self, key: Key, instance: str) -> dns.update.UpdateMessage:
        message = self._message(key)
        self._delete_records(message, self.names.instance(instance))
        return message

    def _delete_records(self, message: dns.update.UpdateMessage, name: dns.name.Name) -> None:
        pointer = _ptr(name)
        message.delete(self.names.service, pointer)
        message.delete(self.names.registrars, pointer)
        for rdtype in (dns.rdatatype.SRV, dns.rdatatype.TXT, dns.rdatatype.A, dns.rdatatype.AAAA):
            message.delete(name, rdtype)
        message.delete(self.names.alive(name), dns.rdatatype.TXT)

    async def _update(
        self,
        topic: str,
        what: str,
        message: dns.update.UpdateMessage,
        timeout: float,
        expected: tuple[int, ...] = (),
    ) -> bool:
        """Send one update; False (logged) unless the server answered NOERROR. An rcode in
        `expected` (a prerequisite that failed) returns False quietly."""
        host, port = self.config.server
        self.updates_sent += 1
        try:
            response = await dns.asyncquery.tcp(message, host, port=port, timeout=timeout)
        except Exception as exc:
            self._problems.failed(topic, f"{what} at {host}:{port} failed: {_describe(exc)}")
            return False
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            if rcode not in expected:
                self._problems.failed(
                    topic,
                    f"{what}: {host}:{port} answered {dns.rcode.to_text(rcode)}{_hint(rcode)}",
                )
            return False
        self._problems.solved(topic, f"{what}: {host}:{port} takes updates again")
        return True

    # -- Watcher --------------------------------------------------------------------------

    def watch(self, handler: SightingHandler) -> None:
        self._handlers.append(handler)
        if self._started:
            self._spawn("browser", self._browse_loop)

    async def _browse_loop(self) -> None:
        failures = 0
        interval = self.config.browse_interval
        host, port = self.config.server
        while True:
            try:
                await asyncio.wait_for(self.browse_once(), BROWSE_TIMEOUT)
            except (BrowseFailed, TimeoutError) as exc:
                failures += 1
                self._problems.failed(
                    "browse", f"browsing {self._root()} at {host}:{port} failed: {exc or 'timeout'}"
                )
            except Exception:
                failures += 1
                log.exception("DNS-SD: browsing %s failed", self._root())
            else:
                if failures:
                    self._problems.solved("browse", f"browsing {self._root()} works again")
                failures = 0
            delay = interval if not failures else self._backoff(failures + 1, MAX_BACKOFF)
            await asyncio.sleep(max(delay, interval))

    def _root(self) -> dns.name.Name:
        return self.names.registrars if self._registrars_only else self.names.service

    async def browse_once(self) -> None:
        """One poll: list the instances, resolve a bounded batch of them (new ones first, then
        those checked longest ago), emit what changed, prune what is stale. BrowseFailed when
        the list itself cannot be read; then nothing is changed (no removals on an outage)."""
        self.browses += 1
        root = self._root()
        response = await self._ask(root, PTR)
        listed: dict[str, None] = {}
        ptr = response.get_rrset(response.answer, root, IN, PTR)
        for rdata in ptr or ():
            label = self.names.label_of(rdata.target)
            if label is None:
                continue
            if len(listed) >= MAX_INSTANCES:
                if not self._too_many:
                    log.warning(
                        "DNS-SD: %s lists over %d instances; following the first %d",
                        root,
                        MAX_INSTANCES,
                        MAX_INSTANCES,
                    )
                    self._too_many = True
                break
            listed[label] = None
        for label in [label for label in self._seen if label not in listed]:
            self._forget(label)
        loop = asyncio.get_running_loop()
        for label in listed:
            self._seen.setdefault(label, _Seen(since=loop.time()))
        batch = sorted(listed, key=lambda label: self._seen[label].checked)[:CHECKS_PER_BROWSE]
        slots = asyncio.Semaphore(CONCURRENT_CHECKS)
        await asyncio.gather(*(self._check(label, slots) for label in batch))
        await self._prune()

    async def _ask(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        """The server's answer for (name, type): NOERROR or NXDOMAIN; BrowseFailed otherwise."""
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        query.flags &= ~dns.flags.RD  # an authoritative answer, nothing recursed
        host, port = self.config.server
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, host, port=port, timeout=QUERY_TIMEOUT
            )
        except Exception as exc:
            raise BrowseFailed(
                f"{name} {dns.rdatatype.to_text(rdtype)}: {_describe(exc)}"
            ) from None
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise BrowseFailed(
                f"{name} {dns.rdatatype.to_text(rdtype)}: the server answered "
                f"{dns.rcode.to_text(rcode)}{_hint(rcode)}"
            )
        return response

    async def _check(self, label: str, slots: asyncio.Semaphore) -> None:
        """Resolve one instance: its view (TXT and addresses) and its heartbeat."""
        name = self.names.instance(label)
        async with slots:
            try:
                txt, srv, alive = await asyncio.gather(
                    self._ask(name, dns.rdatatype.TXT),
                    self._ask(name, dns.rdatatype.SRV),
                    self._ask(self.names.alive(name), dns.rdatatype.TXT),
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
            self._ask(target, dns.rdatatype.A),
            self._ask(target, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        found: list[dns.rrset.RRset] = []
        for answer in answers:
            if isinstance(answer, dns.message.Message):
                found.extend(answer.answer)
        return records.addresses_of(found, target)

    def _show(self, label: str, entry: _Seen, view: View | None) -> None:
        if view == entry.view:
            return
        if view is None:
            change = Change.REMOVED
        else:
            change = Change.ADDED if entry.view is None else Change.UPDATED
        entry.view = view
        log.debug("DNS-SD: %s %s addresses=%s", change.value, label, list(view[1]) if view else [])
        if view is None:
            self._emit(Sighting(label, Change.REMOVED))
        else:
            self._emit(Sighting(label, change, txt=view[0], addresses=view[1]))

    def _forget(self, label: str) -> None:
        entry = self._seen.pop(label, None)
        if entry is not None and entry.view is not None:
            log.debug("DNS-SD: removed %s", label)
            self._emit(Sighting(label, Change.REMOVED))

    def _emit(self, sighting: Sighting) -> None:
        for handler in list(self._handlers):
            try:
                handler(sighting)
            except Exception:
                log.exception("sighting handler failed for %s", sighting.instance)

    # -- pruning --------------------------------------------------------------------------

    def stale_after(self, entry: _Seen) -> float:
        """How long a heartbeat may stay unchanged: three of the refresh intervals it states
        (this host's own when it states none), and never less than three browses."""
        refresh = entry.refresh if entry.refresh is not None else self.config.refresh
        return STALE_REFRESHES * max(refresh, self.config.browse_interval)

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
        stale = [
            label
            for label, entry in self._seen.items()
            if entry.observed and now - entry.since >= self.stale_after(entry)
        ]
        for label in stale[:PRUNES_PER_BROWSE]:
            await self._prune_one(label, key, now)

    async def _prune_one(self, label: str, key: Key, now: float) -> None:
        """Delete a stale instance's records, provided its heartbeat is still what we saw: a
        component that refreshed meanwhile makes the prerequisite fail, and keeps them."""
        entry = self._seen.get(label)
        if entry is None:  # gone meanwhile
            return
        name = self.names.instance(label)
        alive = self.names.alive(name)
        message = self._message(key)
        if entry.heartbeat_rrset is None:
            message.absent(alive, dns.rdatatype.TXT)
        else:
            # A prerequisite's TTL must be zero (RFC 2136 section 2.4.2).
            message.present(alive, dns.rdataset.from_rdata_list(0, list(entry.heartbeat_rrset)))
        self._delete_records(message, name)
        failed = (dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN)
        ok = await self._update("prune", f"pruning {label}", message, UPDATE_TIMEOUT, failed)
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


def _ptr(name: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, PTR, name.to_text())


def _role(txt_type: str) -> str:
    try:
        return Role.from_txt_type(txt_type).value
    except ValueError:
        return txt_type


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.tsig.PeerBadKey):
        return "the server does not know our TSIG key (check the key name and the named.conf)"
    if isinstance(exc, dns.tsig.PeerBadSignature):
        return "the server rejected our TSIG signature (check the secret and the algorithm)"
    if isinstance(exc, dns.tsig.PeerError):
        return f"TSIG error: {exc}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _hint(rcode: int) -> str:
    if rcode == dns.rcode.REFUSED:
        return " (the key may not change these names: check the zone's update-policy)"
    if rcode == dns.rcode.NOTAUTH:
        return " (the server is not authoritative for the domain, or does not know the key)"
    return ""
