"""Wide-area DNS-SD (eucareg/dnssd) against a real BIND 9 named on 127.0.0.1: what a component
publishes is browsed back exactly as the decision reads it; changes, withdrawals, refreshes and
pruning; the update-policy of docs/dnssd.md holds against a component key that attacks another
instance; and a wrong key, a server down or answering garbage, and a hostile zone are survived
with bounded work."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.tsigkeyring
import dns.update
import pytest

from eucalab.named import (
    NamedServer,
    TsigKey,
    free_port,
    instance_key_name,
    named_binary,
    site_policy,
    start_local,
)
from eucareg.config.dnssd import DnssdConfig
from eucareg.core import txt
from eucareg.core.model import AnnouncedState, Announcement, Role
from eucareg.dnssd import browser as dnssd_browser
from eucareg.dnssd.backend import DnssdBackend
from eucareg.dnssd.keys import KeyProblem, read_secret
from eucareg.dnssd.server import BrowseFailed
from eucareg.mdns.types import Change, ServiceSpec, Sighting

pytestmark = pytest.mark.skipif(
    named_binary() is None,
    reason="needs BIND 9's named: apt-get install bind9 (make test installs it)",
)

DOMAIN = "site.test"
NC = "node-nc-0123456789ab"
CC = "cluster-cc-0123456789ab"
OTHER = "node-nc-bbbbbbbbbbbb"
FINGERPRINT = "sha256:" + "ab" * 32
SERVICE = dns.name.from_text(f"_eucalyptus._tcp.{DOMAIN}.")
REGISTRARS = dns.name.from_text(f"_registrar._sub._eucalyptus._tcp.{DOMAIN}.")
IN = dns.rdataclass.IN


def owner(instance: str) -> dns.name.Name:
    return dns.name.from_text(f"{instance}._eucalyptus._tcp.{DOMAIN}.")


def spec(
    instance: str = NC,
    *,
    address: str = "10.77.1.11",
    state: AnnouncedState = AnnouncedState.READY,
    port: int | None = None,
    extra: tuple[str, ...] = (),
) -> ServiceSpec:
    """What eucareg/agent/announce.py publishes for a component of this instance name."""
    kind, _, component_id = instance.partition("-")
    role = Role.from_txt_type(kind)
    record = txt.encode(
        role=role,
        component_id=component_id,
        cluster="cluster1" if role.needs_cluster else None,
        state=state,
        address=ipaddress.ip_address(address),
        fingerprint=FINGERPRINT,
        api_port=port,
        eucavers="3.4",
    )
    return ServiceSpec(
        instance=instance,
        port=8780,
        txt=record,
        addresses=tuple(sorted({address, *extra})),
        server=f"eucareg-{address.replace('.', '-')}.local.",
    )


async def eventually(
    condition: Callable[[], bool], what: str, timeout: float = 10.0, step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(step)


@dataclass
class Site:
    """A named with the site policy, a key per instance and the prune key, and the backends a
    test made (closed after it, pass or fail)."""

    named: NamedServer
    keydir: Path
    prune: TsigKey
    keys: dict[str, TsigKey]
    backends: list[DnssdBackend] = field(default_factory=list)

    def config(self, **changes: object) -> DnssdConfig:
        base = DnssdConfig(
            domain=DOMAIN + ".",
            server=(self.named.address, self.named.port),
            tsig_key_name="{instance}._eucalyptus._tcp.{domain}",
            tsig_secret_file=str(self.keydir / "{instance}.key"),
            refresh=1.0,
            browse_interval=0.2,
        )
        return replace(base, **changes)  # type: ignore[arg-type]

    def pruning(self, **changes: object) -> DnssdConfig:
        return self.config(
            prune_key_name=self.prune.name,
            prune_secret_file=self.keydir / "prune.key",
            **changes,
        )

    async def backend(
        self, config: DnssdConfig | None = None, *, registrars_only: bool = False
    ) -> DnssdBackend:
        made = DnssdBackend(
            config or self.config(), registrars_only=registrars_only, retry_base=0.1
        )
        self.backends.append(made)
        await made.start()
        return made

    async def ask(self, name: dns.name.Name, rdtype: str) -> dns.rrset.RRset | None:
        query = dns.message.make_query(name, rdtype)
        response, _ = await dns.asyncquery.udp_with_fallback(
            query, self.named.address, port=self.named.port, timeout=5
        )
        return response.get_rrset(response.answer, name, IN, dns.rdatatype.from_text(rdtype))

    async def update(self, key: TsigKey, build: Callable[[dns.update.UpdateMessage], None]) -> str:
        """Send an update signed with `key`; the rcode's name."""
        message = dns.update.UpdateMessage(
            f"{DOMAIN}.",
            keyring=dns.tsigkeyring.from_text({key.name: (key.algorithm, key.secret)}),
            keyname=dns.name.from_text(key.name),
            keyalgorithm=key.algorithm,
        )
        build(message)
        response = await dns.asyncquery.tcp(
            message, self.named.address, port=self.named.port, timeout=5
        )
        return dns.rcode.to_text(response.rcode())

    async def instance_records(self, instance: str) -> dict[str, object]:
        name = owner(instance)
        found: dict[str, object] = {}
        for rdtype in ("SRV", "TXT", "A"):
            rrset = await self.ask(name, rdtype)
            if rrset is not None:
                found[rdtype] = sorted(r.to_text() for r in rrset)
        alive = await self.ask(dns.name.from_text("_alive", origin=name), "TXT")
        if alive is not None:
            found["alive"] = [r.to_text() for r in alive]
        ptr = await self.ask(SERVICE, "PTR")
        if ptr is not None and any(r.to_text() == name.to_text() for r in ptr):
            found["PTR"] = True
        return found


def make_keys(keydir: Path, instances: tuple[str, ...]) -> tuple[TsigKey, dict[str, TsigKey]]:
    prune = TsigKey.make("eucareg-prune")
    prune.write_secret(keydir / "prune.key")
    keys = {}
    for instance in instances:
        keys[instance] = TsigKey.make(instance_key_name(instance, DOMAIN))
        keys[instance].write_secret(keydir / f"{instance}.key")
    return prune, keys


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    keydir = tmp_path / "keys"
    prune, keys = make_keys(keydir, (NC, CC, OTHER))
    named = start_local(
        tmp_path / "named",
        domain=DOMAIN,
        keys=[prune, *keys.values()],
        policy=site_policy(DOMAIN, prune_keys=[prune.name]),
    )
    made = Site(named, keydir, prune, keys)
    try:
        yield made
    finally:
        try:
            for backend in made.backends:
                await backend.close()
        finally:
            named.stop()


def crash(backend: DnssdBackend) -> None:
    """The component's host dies: nothing refreshes, nothing is deleted."""
    backend._closed = True
    for task in backend._tasks.values():
        task.cancel()
    backend.publisher._wanted.clear()
    backend.publisher._gone.clear()


class Heard(list[Sighting]):
    def of(self, instance: str) -> list[Sighting]:
        return [s for s in self if s.instance == instance]

    def last(self, instance: str) -> Sighting | None:
        mine = self.of(instance)
        return mine[-1] if mine else None


async def browser(site: Site, config: DnssdConfig | None = None, **kw: bool) -> Heard:
    heard = Heard()
    watcher = await site.backend(config or site.config(), **kw)
    watcher.watch(heard.append)
    return heard


# -- publish, browse, change, withdraw ------------------------------------------------------


async def test_a_published_component_is_browsed_with_its_exact_txt_and_address(
    site: Site,
) -> None:
    publisher = await site.backend()
    heard = await browser(site)
    published = spec()
    await publisher.publish(published)
    await eventually(lambda: bool(heard.of(NC)), "the NC browsed")
    sighting = heard.of(NC)[0]
    assert sighting.change is Change.ADDED
    assert sighting.txt == dict(published.txt)  # the decision reads exactly what was published
    assert sighting.addresses == ("10.77.1.11",)
    decided = txt.decode(sighting.instance, sighting.txt, sighting.addresses)
    assert isinstance(decided, Announcement)
    assert (decided.component_id, decided.role, decided.cluster) == (
        "nc-0123456789ab",
        Role.NC,
        "cluster1",
    )
    # The records as docs/dnssd.md shows them: the SRV target is the instance's own name.
    records = await site.instance_records(NC)
    assert records["SRV"] == [f"0 0 8780 {owner(NC)}"]
    assert records["A"] == ["10.77.1.11"] and records["PTR"] is True
    assert records["alive"][0].startswith('"at=')  # type: ignore[index]
    await asyncio.sleep(0.6)  # browses go on; nothing changed, so nothing more is heard
    assert len(heard.of(NC)) == 1


async def test_a_changed_txt_is_an_update_and_a_registered_cc_becomes_a_registrar(
    site: Site,
) -> None:
    publisher = await site.backend()
    everything = await browser(site)
    registrars = await browser(site, registrars_only=True)  # what a node's agent browses
    await publisher.publish(spec(CC))
    await publisher.publish(spec(NC))
    await eventually(lambda: bool(everything.of(CC) and everything.of(NC)), "both browsed")
    await asyncio.sleep(0.5)
    assert registrars == []  # neither is a registrar yet
    registered = spec(
        CC, state=AnnouncedState.REGISTERED, port=8780, extra=("10.77.3.10", "10.77.9.10")
    )
    await publisher.publish(registered)
    await eventually(lambda: len(everything.of(CC)) == 2, "the CC's update")
    update = everything.of(CC)[1]
    assert update.change is Change.UPDATED
    assert update.txt["state"] == "registered" and update.txt["port"] == "8780"
    assert update.addresses == ("10.77.1.11", "10.77.3.10", "10.77.9.10")
    await eventually(lambda: bool(registrars), "the registered CC in the _registrar subtype")
    assert [(s.instance, s.change) for s in registrars] == [(CC, Change.ADDED)]
    assert registrars[0].txt == dict(registered.txt)
    # Deregistered: it leaves the subtype, and the nodes stop seeing it as a registrar.
    await publisher.publish(spec(CC))
    await eventually(lambda: len(registrars) == 2, "the CC leaving the subtype")
    assert registrars[1].change is Change.REMOVED


async def test_a_withdrawn_component_is_removed_and_leaves_nothing_in_the_zone(
    site: Site,
) -> None:
    publisher = await site.backend()
    heard = await browser(site)
    await publisher.publish(spec())
    await eventually(lambda: bool(heard.of(NC)), "the NC browsed")
    await publisher.withdraw(NC)
    assert await site.instance_records(NC) == {}  # withdraw() waited for the server
    await eventually(lambda: len(heard.of(NC)) == 2, "the removal")
    assert heard.of(NC)[1].change is Change.REMOVED


async def test_close_deletes_every_record_left(site: Site) -> None:
    publisher = await site.backend()
    await publisher.publish(spec(NC))
    await publisher.publish(spec(CC))
    await eventually(lambda: publisher.updates_sent >= 2, "both written")
    await eventually(lambda: publisher.publisher._next_due() != 0.0, "both written")
    assert await site.instance_records(NC) != {}
    await publisher.close()
    assert await site.instance_records(NC) == {}
    assert await site.instance_records(CC) == {}
    assert await site.ask(SERVICE, "PTR") is None


# -- keeping records alive, and pruning -----------------------------------------------------


async def test_refreshing_keeps_records_alive_past_the_stale_time(site: Site) -> None:
    publisher = await site.backend(site.config(refresh=1.0))
    watcher = await site.backend(site.pruning(refresh=1.0))
    heard = Heard()
    watcher.watch(heard.append)
    await publisher.publish(spec())
    await eventually(lambda: bool(heard.of(NC)), "the NC browsed")
    first = (await site.instance_records(NC))["alive"]
    await asyncio.sleep(4.5)  # 1.5 x the stale time (3 x refresh)
    assert watcher.pruned == 0 and [s.change for s in heard.of(NC)] == [Change.ADDED]
    assert (await site.instance_records(NC))["alive"] != first  # the heartbeat moved on
    assert publisher.updates_sent >= 4


async def test_a_stopped_publishers_records_are_pruned_after_the_stale_time(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "eucareg.dnssd")
    publisher = await site.backend(site.config(refresh=1.0))
    survivor = await site.backend(site.config(refresh=1.0))
    watcher = await site.backend(site.pruning(refresh=1.0))
    heard = Heard()
    watcher.watch(heard.append)
    await publisher.publish(spec(NC))
    await survivor.publish(spec(CC))
    await eventually(lambda: bool(heard.of(NC) and heard.of(CC)), "both browsed")
    crash(publisher)
    stopped = time.monotonic()
    await eventually(lambda: watcher.pruned == 1, "the prune", timeout=15)
    waited = time.monotonic() - stopped
    # Stale once its heartbeat (seen last just before the crash) is 3 refreshes old.
    assert 2.0 <= waited <= 6.0, waited
    assert heard.last(NC) == Sighting(NC, Change.REMOVED)
    assert await site.instance_records(NC) == {}
    assert "pruned node-nc-0123456789ab: its heartbeat did not change" in caplog.text
    # The live one is untouched.
    assert heard.last(CC) is not None and heard.last(CC).change is Change.ADDED  # type: ignore[union-attr]
    assert "SRV" in await site.instance_records(CC)


async def test_without_the_prune_key_nothing_is_pruned(site: Site) -> None:
    publisher = await site.backend(site.config(refresh=1.0))
    heard = await browser(site, site.config(refresh=1.0))
    await publisher.publish(spec())
    await eventually(lambda: bool(heard.of(NC)), "the NC browsed")
    crash(publisher)
    await asyncio.sleep(4.0)
    assert [s.change for s in heard.of(NC)] == [Change.ADDED]
    assert "SRV" in await site.instance_records(NC)


async def test_a_prune_loses_to_a_refresh_that_came_first(site: Site) -> None:
    """The prune deletes only if the heartbeat is still the one found stale: its
    prerequisite fails when the component refreshed in between, and nothing is deleted."""
    publisher = await site.backend(site.config(refresh=3600.0))
    watcher = DnssdBackend(site.pruning(refresh=3600.0))  # not started: the test browses
    site.backends.append(watcher)
    watcher.watch(lambda s: None)
    await publisher.publish(spec())
    await eventually(lambda: publisher.publisher._sent.get(NC) is not None, "published")
    await watcher.browse_once()
    assert watcher.browser._seen[NC].observed
    publisher.publisher._sent.clear()  # refresh now: a new heartbeat
    publisher.publisher._wake.set()
    await eventually(lambda: publisher.publisher._sent.get(NC) is not None, "the refresh")
    key = watcher.browser._keys.prune_key()
    assert key is not None
    await watcher.browser._prune_one(NC, key, asyncio.get_running_loop().time())
    assert watcher.pruned == 0
    assert "SRV" in await site.instance_records(NC)
    # Seen as it is now, the same prune goes through.
    await watcher.browse_once()
    await watcher.browser._prune_one(NC, key, asyncio.get_running_loop().time())
    assert watcher.pruned == 1 and await site.instance_records(NC) == {}


# -- the update-policy, attacked -------------------------------------------------------------


def _txt(*strings: str) -> dns.rdata.Rdata:
    return dns.rdtypes.ANY.TXT.TXT(IN, dns.rdatatype.TXT, [s.encode() for s in strings])


ATTACKS: dict[str, Callable[[dns.update.UpdateMessage], None]] = {
    "replace its TXT": lambda m: m.replace(owner(NC), 60, _txt("txtvers=1", "addr=10.66.6.6")),
    "delete its SRV": lambda m: m.delete(owner(NC), "SRV"),
    "delete all its names": lambda m: m.delete(owner(NC)),
    "point its address elsewhere": lambda m: m.replace(owner(NC), 60, "A", "10.66.6.6"),
    "refresh its heartbeat for it": lambda m: m.replace(
        dns.name.from_text("_alive", origin=owner(NC)), 60, _txt("at=9999999999", "refresh=60")
    ),
    "add a name under it": lambda m: m.add(
        dns.name.from_text("evil", origin=owner(NC)), 60, "A", "10.66.6.6"
    ),
    "write outside the service": lambda m: m.add(f"www.{DOMAIN}.", 60, "A", "10.66.6.6"),
    "change the zone's NS": lambda m: m.add(f"{DOMAIN}.", 60, "NS", f"ns.evil.{DOMAIN}."),
    "put another type at the service": lambda m: m.add(SERVICE, 60, "TXT", '"x"'),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_component_key_cannot_change_another_instance(site: Site, attack: str) -> None:
    victim = await site.backend()
    await victim.publish(spec(NC))
    await eventually(lambda: victim.updates_sent >= 1 and victim.publisher._next_due() != 0.0, "NC")
    before = await site.instance_records(NC)
    assert await site.update(site.keys[OTHER], ATTACKS[attack]) == "REFUSED"
    assert await site.instance_records(NC) == before


async def test_what_a_component_key_may_do_to_the_shared_ptr(site: Site) -> None:
    """The PTR RRsets are shared, and BIND cannot tie a PTR to its key: any component key may
    remove another's PTR (hiding it until its next refresh restores it). docs/dnssd.md."""
    victim = await site.backend(site.config(refresh=1.0))
    await victim.publish(spec(NC))
    await eventually(lambda: victim.updates_sent >= 1 and victim.publisher._next_due() != 0.0, "NC")
    assert (
        await site.update(site.keys[OTHER], lambda m: m.delete(SERVICE, "PTR", owner(NC).to_text()))
        == "NOERROR"
    )
    assert "PTR" not in await site.instance_records(NC)
    await asyncio.sleep(1.5)  # the victim's next refresh puts it back
    assert (await site.instance_records(NC))["PTR"] is True


async def test_a_publisher_given_another_instances_key_is_refused_and_carries_on(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A component configured (or tricked) to publish NC's name with OTHER's key."""
    caplog.set_level(logging.WARNING, "eucareg.dnssd")
    other_key = site.keys[OTHER]
    impostor = await site.backend(
        site.config(
            tsig_key_name=other_key.name, tsig_secret_file=str(site.keydir / f"{OTHER}.key")
        )
    )
    await impostor.publish(spec(NC, address="10.66.6.6"))
    await eventually(lambda: impostor.updates_sent >= 3, "retries")
    assert "answered REFUSED (the key may not change these names" in caplog.text
    assert caplog.text.count("publishing node-nc-0123456789ab") == 1  # said once, not per retry
    assert await site.instance_records(NC) == {}
    assert not impostor._tasks["publisher"].done()


async def test_the_prune_key_may_not_write_outside_the_service(site: Site) -> None:
    assert await site.update(site.prune, ATTACKS["write outside the service"]) == "REFUSED"
    assert await site.update(site.prune, ATTACKS["change the zone's NS"]) == "REFUSED"


# -- wrong keys, servers down or answering garbage --------------------------------------------


async def test_a_wrong_secret_is_refused_and_retried_without_crashing(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "eucareg.dnssd")
    (site.keydir / "wrong").mkdir()
    TsigKey(site.keys[NC].name, TsigKey.make("x").secret).write_secret(
        site.keydir / "wrong" / f"{NC}.key"
    )
    publisher = await site.backend(
        site.config(tsig_secret_file=str(site.keydir / "wrong" / "{instance}.key"))
    )
    await publisher.publish(spec())
    await eventually(lambda: publisher.updates_sent >= 3, "retries")
    assert "rejected our TSIG signature" in caplog.text
    assert await site.instance_records(NC) == {}
    # The operator fixes the file: the next retry uses the new secret, no restart.
    site.keys[NC].write_secret(site.keydir / "wrong" / f"{NC}.key")
    await eventually(
        lambda: publisher.publisher._sent.get(NC) is not None, "published with the new secret"
    )
    assert "SRV" in await site.instance_records(NC)


async def test_an_unknown_key_is_refused(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "eucareg.dnssd")
    TsigKey.make("stranger").write_secret(site.keydir / "stranger.key")
    publisher = await site.backend(
        site.config(tsig_key_name="stranger", tsig_secret_file=str(site.keydir / "stranger.key"))
    )
    await publisher.publish(spec())
    await eventually(lambda: publisher.updates_sent >= 2, "retries")
    assert "the server does not know our TSIG key" in caplog.text
    assert await site.instance_records(NC) == {}


async def test_a_missing_secret_file_is_logged_not_raised(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "eucareg.dnssd")
    publisher = await site.backend(site.config(tsig_secret_file="/nonexistent/{role}.key"))
    await publisher.publish(spec())
    await publisher.withdraw(NC)  # does not raise either
    await eventually(
        lambda: "dnssd.tsig_secret_file: cannot read /nonexistent/nc.key" in caplog.text, "log"
    )
    assert not publisher._tasks["publisher"].done()


async def test_a_server_that_is_down_is_retried_until_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "eucareg.dnssd")
    keydir = tmp_path / "keys"
    prune, keys = make_keys(keydir, (NC,))
    port = free_port()
    config = DnssdConfig(
        domain=DOMAIN + ".",
        server=("127.0.0.1", port),
        tsig_key_name="{instance}._eucalyptus._tcp.{domain}",
        tsig_secret_file=str(keydir / "{instance}.key"),
        refresh=1.0,
        browse_interval=0.2,
    )
    publisher = DnssdBackend(config, retry_base=0.1)
    watcher = DnssdBackend(config, retry_base=0.1)
    heard = Heard()
    named: NamedServer | None = None
    try:
        await publisher.start()
        await watcher.start()
        watcher.watch(heard.append)
        await publisher.publish(spec())
        await asyncio.sleep(4.5)
        sent, browses = publisher.updates_sent, watcher.browses
        # Retried, with a back-off: neither spins, neither gives up, neither raised. (TCP is
        # refused at once; a UDP query to a closed port waits for its 2 s timeout.)
        assert 4 <= sent <= 20 and 2 <= browses <= 4, (sent, browses)
        assert "publishing node-nc-0123456789ab at 127.0.0.1" in caplog.text
        assert "browsing _eucalyptus._tcp.site.test. at 127.0.0.1" in caplog.text
        assert not any(t.done() for t in [*publisher._tasks.values(), *watcher._tasks.values()])
        named = start_local(
            tmp_path / "named",
            domain=DOMAIN,
            keys=[prune, *keys.values()],
            policy=site_policy(DOMAIN, prune_keys=[prune.name]),
            port=port,
        )
        await eventually(lambda: bool(heard.of(NC)), "browsed once the server is up", 15)
        # Each says so once it is done with the answer that worked (the browser after it
        # passed on what it found, so possibly a moment after `heard`).
        await eventually(
            lambda: "takes updates again" in caplog.text and "works again" in caplog.text,
            "publisher and browser log that the server works again",
            10,
        )
    finally:
        await publisher.close()
        await watcher.close()
        if named is not None:
            named.stop()


class Garbage(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # Half the time a reply with the query's id, so it gets past the first check.
        junk = os.urandom(random.randrange(0, 600))
        self.transport.sendto(data[:2] + junk if random.random() < 0.5 else junk, addr)  # type: ignore[attr-defined]


async def test_a_server_answering_garbage_never_crashes_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "eucareg.dnssd")
    loop = asyncio.get_running_loop()
    port = free_port()
    udp, _ = await loop.create_datagram_endpoint(Garbage, local_addr=("127.0.0.1", port))

    async def tcp_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.read(2)
            size = random.choice([0, 5, 300, 65535])
            writer.write(size.to_bytes(2, "big") + os.urandom(min(size, 400)))
            await writer.drain()
        writer.close()

    tcp = await asyncio.start_server(tcp_garbage, "127.0.0.1", port)
    keydir = tmp_path / "keys"
    make_keys(keydir, (NC,))
    config = DnssdConfig(
        domain=DOMAIN + ".",
        server=("127.0.0.1", port),
        tsig_key_name="{instance}._eucalyptus._tcp.{domain}",
        tsig_secret_file=str(keydir / "{instance}.key"),
        refresh=1.0,
        browse_interval=0.2,
    )
    backend = DnssdBackend(config, retry_base=0.05)
    heard = Heard()
    try:
        await backend.start()
        backend.watch(heard.append)
        await backend.publish(spec())
        for _ in range(20):
            with contextlib.suppress(BrowseFailed):
                await backend.browse_once()  # BrowseFailed, or an empty browse: nothing else
        await asyncio.sleep(2.0)
        assert not any(t.done() for t in backend._tasks.values())
        assert backend.updates_sent >= 2 and backend.browses >= 22
        assert heard == []
        assert "Traceback" not in caplog.text
        await backend.withdraw(NC)
    finally:
        await backend.close()
        udp.close()
        tcp.close()
        await tcp.wait_closed()


async def test_withdraw_and_close_are_bounded_when_the_server_hangs(tmp_path: Path) -> None:
    """A server that accepts connections and never answers: the agent's goodbyes (1 s for
    all of them) are not held up by DNS-SD's."""
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    keydir = tmp_path / "keys"
    make_keys(keydir, (NC,))
    config = DnssdConfig(
        domain=DOMAIN + ".",
        server=("127.0.0.1", port),
        tsig_key_name="{instance}._eucalyptus._tcp.{domain}",
        tsig_secret_file=str(keydir / "{instance}.key"),
    )
    backend = DnssdBackend(config)
    try:
        await backend.start()
        await backend.publish(spec())
        await asyncio.sleep(0.2)  # the publisher's update now hangs, holding the NC's lock
        loop = asyncio.get_running_loop()
        began = loop.time()
        await backend.withdraw(NC)
        assert loop.time() - began < 0.7
        began = loop.time()
        await backend.close()
        assert loop.time() - began < 0.7
        assert NC in backend.publisher._gone  # left for the registrars' pruning
    finally:
        await backend.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# -- a hostile zone -----------------------------------------------------------------------------


def _fill(message: dns.update.UpdateMessage, first: int, count: int) -> None:
    for i in range(first, first + count):
        name = owner(f"node-nc-{i:012x}")
        message.add(SERVICE, 60, "PTR", name.to_text())
        message.add(name, 60, "SRV", f"0 0 8780 {name}")
        message.add(name, 60, _txt("txtvers=1", "protovers=1", "type=node", f"id=nc-{i:012x}"))
        message.add(name, 60, "A", f"10.77.{i // 250}.{i % 250 + 1}")


async def test_a_thousand_instances_are_browsed_in_bounded_batches(site: Site) -> None:
    for first in range(0, 1000, 100):
        assert await site.update(site.prune, lambda m, f=first: _fill(m, f, 100)) == "NOERROR"
    watcher = DnssdBackend(site.config(), retry_base=0.1)
    site.backends.append(watcher)
    heard = Heard()
    watcher.watch(heard.append)  # not started: the test drives the browses
    loop = asyncio.get_running_loop()
    took = []
    for _ in range(4):
        began = loop.time()
        await watcher.browse_once()
        took.append(loop.time() - began)
        assert len(heard) <= len(took) * dnssd_browser.CHECKS_PER_BROWSE
    assert len(heard) == 1000 and {s.change for s in heard} == {Change.ADDED}
    assert len({s.instance for s in heard}) == 1000
    assert max(took) < 10, took
    # Every one of them the decision can read (and refuses: they have no fp=, no addr=).
    assert all(isinstance(txt.decode(s.instance, s.txt, s.addresses), txt.Rejected) for s in heard)
    await watcher.browse_once()
    assert len(heard) == 1000  # the next round finds nothing new


async def test_bind_keeps_only_100_records_of_a_type_by_default(tmp_path: Path) -> None:
    """Why the lab's named.conf says max-records-per-type 0, and docs/dnssd.md tells operators
    to raise it: one PTR RRset holds every component of the site."""
    prune, _ = make_keys(tmp_path / "keys", ())
    with start_local(
        tmp_path / "named",
        domain=DOMAIN,
        keys=[prune],
        policy=site_policy(DOMAIN, prune_keys=[prune.name]),
        max_records_per_type=100,
    ) as named:
        site = Site(named, tmp_path / "keys", prune, {})
        assert await site.update(prune, lambda m: _fill(m, 0, 100)) == "NOERROR"
        assert await site.update(prune, lambda m: _fill(m, 100, 1)) == "SERVFAIL"
        ptr = await site.ask(SERVICE, "PTR")
        assert ptr is not None and len(ptr) == 100


async def test_hostile_records_are_read_safely(site: Site) -> None:
    def hostile(m: dns.update.UpdateMessage) -> None:
        def instance(label: bytes, *records: tuple[str, object]) -> dns.name.Name:
            name = dns.name.Name([label]).concatenate(SERVICE)
            m.add(SERVICE, 60, "PTR", name.to_text())
            for rdtype, value in records:
                if isinstance(value, dns.rdata.Rdata):
                    m.add(name, 60, value)
                else:
                    m.add(name, 60, rdtype, str(value).replace("@", name.to_text()))
            return name

        undecodable = dns.rdtypes.ANY.TXT.TXT(
            IN, dns.rdatatype.TXT, [b"txtvers=1", b"type=\xff\xfe", b"\xc3(=x", b"novalue", b"=x"]
        )
        instance(b"garbage-txt", ("SRV", "0 0 1 @"), ("TXT", undecodable), ("A", "10.1.1.1"))
        huge = dns.rdtypes.ANY.TXT.TXT(
            IN, dns.rdatatype.TXT, [b"k%03d=" % i + b"v" * 245 for i in range(240)]
        )
        instance(b"huge-txt", ("SRV", "0 0 1 @"), ("TXT", huge))
        instance(b"two-txts", ("SRV", "0 0 1 @"), ("TXT", '"txtvers=1"'), ("TXT", '"txtvers=2"'))
        instance(b"target-elsewhere", ("SRV", "0 0 1 www.example.org."), ("TXT", '"txtvers=1"'))
        instance(b"no-srv", ("TXT", '"txtvers=1"'))
        instance(b"ptr-only")
        instance(b"\xff\xfe-not-utf8", ("SRV", "0 0 1 @"), ("TXT", '"txtvers=1"'))
        m.add(SERVICE, 60, "PTR", f"elsewhere.{DOMAIN}.")  # not an instance of the service
        m.add(SERVICE, 60, "PTR", f"deeper.x._eucalyptus._tcp.{DOMAIN}.")

    assert await site.update(site.prune, hostile) == "NOERROR"
    watcher = DnssdBackend(site.config(), retry_base=0.1)
    site.backends.append(watcher)
    heard = Heard()
    watcher.watch(heard.append)
    await watcher.browse_once()
    await watcher.browse_once()
    by_name = {s.instance: s for s in heard}
    assert set(by_name) == {"garbage-txt", "huge-txt", "two-txts", "target-elsewhere"}
    assert by_name["garbage-txt"].txt == {"txtvers": "1", "": "x"}  # as mDNS decodes it
    assert by_name["garbage-txt"].addresses == ("10.1.1.1",)
    assert len(by_name["huge-txt"].txt) == 64  # the rest is not read
    assert by_name["two-txts"].txt == {}  # several TXT records: none is ours
    assert by_name["target-elsewhere"].addresses == ()
    for sighting in heard:
        assert isinstance(
            txt.decode(sighting.instance, sighting.txt, sighting.addresses), txt.Rejected
        )


async def test_a_prune_key_cleans_up_ptrs_to_nothing(site: Site) -> None:
    dangling = owner("node-nc-dddddddddddd")
    assert (
        await site.update(site.prune, lambda m: m.add(SERVICE, 60, "PTR", dangling.to_text()))
        == "NOERROR"
    )
    watcher = await site.backend(site.pruning(refresh=1.0))
    watcher.watch(lambda s: None)
    await eventually(lambda: watcher.pruned == 1, "the dangling PTR pruned", timeout=15)
    assert await site.ask(SERVICE, "PTR") is None


# -- keys --------------------------------------------------------------------------------------


def test_secret_files_hold_the_secret_alone_or_as_tsig_keygen_writes_it(tmp_path: Path) -> None:
    key = TsigKey.make("k")
    alone = key.write_secret(tmp_path / "alone")
    assert read_secret(alone, "dnssd.tsig_secret_file") == base64.b64decode(key.secret)
    clause = tmp_path / "clause"
    keygen = shutil.which("tsig-keygen", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if keygen is not None:  # bind9-utils (make test installs it)
        made = subprocess.run([keygen, "-a", "hmac-sha256", "k"], capture_output=True, text=True)
        clause.write_text(made.stdout)
    else:
        clause.write_text(key.clause() + "\n")
    assert len(read_secret(clause, "dnssd.tsig_secret_file")) == 32
    for text in ("", "not base64!", 'key "k" { secret ""; };'):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(KeyProblem, match=r"^dnssd.prune_secret_file: .*bad holds no base64"):
            read_secret(tmp_path / "bad", "dnssd.prune_secret_file")
    with pytest.raises(KeyProblem, match=r"^dnssd.tsig_secret_file: cannot read .*missing"):
        read_secret(tmp_path / "missing", "dnssd.tsig_secret_file")


def test_the_agent_loads_dnspython_only_with_a_dnssd_table() -> None:
    code = (
        "import sys, eucareg.cli.main, eucareg.agent.host, eucareg.config.file\n"
        "print(','.join(m for m in sys.modules if m == 'dns' or m.startswith('dns.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
