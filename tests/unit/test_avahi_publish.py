"""The Avahi backend's own logic, each unit alone (the D-Bus calls recorded, not sent): renaming
on a collision and giving up on a rogue that takes every name, the retry backoff, the host
address groups, and how the browser merges resolver answers into Sightings. The real daemon is
in tests/integration/test_avahi_backend.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns import avahi_publish as ap
from eucareg.mdns.avahi_browse import AvahiBrowser
from eucareg.mdns.avahi_publish import AvahiPublisher, next_name, published_addresses, retry_delay
from eucareg.mdns.types import Change, ServiceSpec, Sighting

SPEC = ServiceSpec(
    "node-nc-0123456789ab",
    8780,
    {"type": "node", "id": "nc-0123456789ab"},
    ("10.0.0.5",),
    "eucareg-10-0-0-5.local.",
)


def test_a_collision_takes_avahis_alternative_name() -> None:
    assert next_name("node-nc-1", "node-nc-1 #2", 0) == "node-nc-1 #2"
    assert next_name("node-nc-1 #2", "node-nc-1 #3", 1) == "node-nc-1 #3"


def test_renaming_stops_at_the_limit_or_when_avahi_offers_nothing_new() -> None:
    assert next_name("n #21", "n #22", ap.MAX_RENAMES) is None
    assert next_name("n", "n", 0) is None
    assert next_name("n", "", 0) is None


def test_retry_backoff_doubles_up_to_a_minute() -> None:
    assert [retry_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(0) == 1


def test_host_addresses_are_ipv4_unless_ipv6_is_on() -> None:
    a = ServiceSpec("a", 1, {}, ("10.0.0.5", "fd00::5"), "h.local.")
    b = ServiceSpec("b", 1, {}, ("10.0.0.5", "192.168.1.5"), "h.local.")
    assert published_addresses([a, b], ipv6=False) == ("10.0.0.5", "192.168.1.5")
    assert published_addresses([a, b], ipv6=True) == ("10.0.0.5", "192.168.1.5", "fd00::5")


# -- the publisher, with D-Bus calls recorded -----------------------------------------------------


class Calls:
    """Stands in for avahi_dbus.call: records (path, member, body) and answers like Avahi."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, list[Any]]] = []
        self.groups = 0
        self.alternative = "{} #2"

    async def __call__(
        self, bus: Any, path: str, interface: str, member: str, sig: str = "", body: Any = ()
    ) -> list[Any]:
        self.log.append((path, member, list(body)))
        if member == "EntryGroupNew":
            self.groups += 1
            return [f"/Client1/EntryGroup{self.groups}"]
        if member == "GetAlternativeServiceName":
            return [self.alternative.format(*body)]
        return []

    def members(self, path: str) -> list[str]:
        return [member for p, member, _ in self.log if p == path]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    fake = Calls()
    monkeypatch.setattr(ad, "call", fake)
    return fake


def publisher() -> tuple[AvahiPublisher, list[asyncio.Task[Any]]]:
    tasks: list[asyncio.Task[Any]] = []
    pub = AvahiPublisher(None, ad.PROTO_INET, False)  # type: ignore[arg-type]
    pub.spawn = lambda coro: tasks.append(asyncio.get_running_loop().create_task(coro))
    return pub, tasks


async def test_publish_adds_the_host_name_then_the_service(calls: Calls) -> None:
    pub, _ = publisher()
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    host, service = "/Client1/EntryGroup1", "/Client1/EntryGroup2"
    assert calls.members(host) == ["Reset", "AddAddress", "Commit"]
    add_address = next(body for p, m, body in calls.log if m == "AddAddress")
    assert add_address == [-1, -1, ad.PUBLISH_NO_REVERSE, "eucareg-10-0-0-5.local", "10.0.0.5"]
    assert calls.members(service) == ["Reset", "AddService", "Commit"]
    add = next(body for p, m, body in calls.log if m == "AddService")
    assert add[3:8] == [SPEC.instance, "_eucalyptus._tcp", "", "eucareg-10-0-0-5.local", 8780]
    assert add[8] == [b"type=node", b"id=nc-0123456789ab"]

    # A TXT change is an update in place; the same spec again costs nothing.
    calls.log.clear()
    changed = ServiceSpec(
        SPEC.instance, 8780, {"type": "node", "state": "registered"}, SPEC.addresses, SPEC.server
    )
    pub.specs[SPEC.instance] = changed
    await pub.apply(SPEC.instance)
    await pub.apply(SPEC.instance)
    assert [m for _, m, _ in calls.log] == ["UpdateServiceTxt"]

    # Withdrawing frees the service's group, then the host name's (nothing else uses it).
    calls.log.clear()
    del pub.specs[SPEC.instance]
    await pub.apply(SPEC.instance)
    assert [(p, m) for p, m, _ in calls.log] == [(service, "Free"), (host, "Free")]


async def test_a_collision_renames_and_publishes_again(calls: Calls) -> None:
    pub, tasks = publisher()
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    calls.log.clear()
    pub.on_state("/Client1/EntryGroup2", ad.GROUP_COLLISION, "")
    await asyncio.gather(*tasks)
    assert [m for _, m, _ in calls.log] == [
        "GetAlternativeServiceName",
        "Reset",
        "AddService",
        "Commit",
    ]
    assert pub.renamed(SPEC.instance) == f"{SPEC.instance} #2"
    add = next(body for _, m, body in calls.log if m == "AddService")
    assert add[3] == f"{SPEC.instance} #2" and add[8] == ad.txt_strings(SPEC.txt)


async def test_a_rogue_that_takes_every_name_gets_backoff_not_a_loop(calls: Calls) -> None:
    pub, tasks = publisher()
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    calls.alternative = "{}x"
    for _ in range(ap.MAX_RENAMES + 1):
        pub.on_state("/Client1/EntryGroup2", ad.GROUP_COLLISION, "")
        await asyncio.gather(*tasks)
        tasks.clear()
    group = pub.groups[SPEC.instance]
    # Renamed MAX_RENAMES times, then back to its own name, after a delay.
    assert group.name == SPEC.instance and group.retry is not None and group.failures == 1
    renames = [body[3] for _, m, body in calls.log if m == "AddService"]
    assert len(renames) == 1 + ap.MAX_RENAMES
    group.retry.cancel()


async def test_a_failed_group_is_tried_again_later(calls: Calls) -> None:
    pub, _ = publisher()
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    pub.on_state("/Client1/EntryGroup2", ad.GROUP_FAILURE, "org.freedesktop.Avahi.Failure")
    group = pub.groups[SPEC.instance]
    assert group.retry is not None and group.failures == 1 and group.spec is None
    group.retry.cancel()


async def test_a_taken_host_name_falls_back_to_avahis_own(calls: Calls) -> None:
    pub, tasks = publisher()
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    calls.log.clear()
    pub.on_state("/Client1/EntryGroup1", ad.GROUP_COLLISION, "")
    await asyncio.gather(*tasks)
    add = next(body for _, m, body in calls.log if m == "AddService")
    assert add[6] == ""  # the SRV target is avahi-daemon's own host name now
    assert ("/Client1/EntryGroup1", "Free") in [(p, m) for p, m, _ in calls.log]


# -- the browser's merging ------------------------------------------------------------------------


def found(iface: int, name: str, address: str, txt: list[bytes]) -> list[Any]:
    return [iface, 0, name, "_eucalyptus._tcp", "local", "h.local", 0, address, 8780, txt, 0]


def browser() -> tuple[AvahiBrowser, list[Sighting]]:
    heard: list[Sighting] = []
    b = AvahiBrowser(None, ad.PROTO_INET, heard.append)  # type: ignore[arg-type]
    b.browser = "/Client1/ServiceBrowser1"
    return b, heard


def resolving(b: AvahiBrowser, iface: int, name: str, path: str) -> None:
    """As if ItemNew came and _resolve made a resolver at `path`."""
    from eucareg.mdns.avahi_browse import _Item

    item = _Item((iface, 0, name), "local", resolver=path)
    b.items[item.key] = item
    b.by_resolver[path] = item.key


async def test_one_sighting_per_instance_across_interfaces() -> None:
    b, heard = browser()
    resolving(b, 2, "node-nc-1", "/r1")
    resolving(b, 3, "node-nc-1", "/r2")
    b.on_signal(ad.SERVICE_RESOLVER, "/r1", "Found", found(2, "node-nc-1", "10.0.0.5", [b"a=1"]))
    b.on_signal(ad.SERVICE_RESOLVER, "/r2", "Found", found(3, "node-nc-1", "10.1.0.5", [b"a=1"]))
    b.on_signal(ad.SERVICE_RESOLVER, "/r2", "Found", found(3, "node-nc-1", "10.1.0.5", [b"a=1"]))
    assert heard == [
        Sighting("node-nc-1", Change.ADDED, {"a": "1"}, ("10.0.0.5",)),
        Sighting("node-nc-1", Change.UPDATED, {"a": "1"}, ("10.0.0.5", "10.1.0.5")),
    ]  # and nothing for an answer that changes nothing
    # A TXT change (only a resolver hears it: the browser says nothing) is an update.
    b.on_signal(ad.SERVICE_RESOLVER, "/r1", "Found", found(2, "node-nc-1", "10.0.0.5", [b"a=2"]))
    assert heard[-1] == Sighting("node-nc-1", Change.UPDATED, {"a": "2"}, ("10.1.0.5", "10.0.0.5"))
    # Gone from one interface: still there; gone from the last: removed.
    b._spawn = lambda coro: coro.close()  # type: ignore[method-assign]
    b.on_signal(
        ad.SERVICE_BROWSER, b.browser or "", "ItemRemove", [2, 0, "node-nc-1", "t", "local", 0]
    )
    assert heard[-1] == Sighting("node-nc-1", Change.UPDATED, {"a": "1"}, ("10.1.0.5",))
    b.on_signal(
        ad.SERVICE_BROWSER, b.browser or "", "ItemRemove", [3, 0, "node-nc-1", "t", "local", 0]
    )
    assert heard[-1] == Sighting("node-nc-1", Change.REMOVED)
    assert len(heard) == 5


async def test_an_answer_before_its_resolver_is_known_is_kept_for_it() -> None:
    # Avahi 0.8 answers from its cache right behind the reply that names the resolver.
    b, heard = browser()
    b.on_signal(ad.SERVICE_RESOLVER, "/r9", "Found", found(2, "node-nc-9", "10.0.0.9", [b"a=1"]))
    assert heard == [] and "/r9" in b.early
    resolving(b, 2, "node-nc-9", "/r9")
    b._replay("/r9")
    assert heard == [Sighting("node-nc-9", Change.ADDED, {"a": "1"}, ("10.0.0.9",))]
    assert b.early == {}


async def test_early_signals_are_bounded() -> None:
    b, _ = browser()
    for n in range(1000):
        b.on_signal(ad.SERVICE_RESOLVER, f"/stray{n}", "Failure", ["x"])
    assert len(b.early) <= 256


async def test_a_name_heard_from_another_host_is_not_taken_over(calls: Calls) -> None:
    # Our browser has the other responder's records cached, which defeats Avahi's probe: the
    # backend yields before publishing, as a probe would have made it.
    pub, _ = publisher()
    pub.taken = lambda instance: instance == SPEC.instance
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    add = next(body for _, m, body in calls.log if m == "AddService")
    assert add[3] == f"{SPEC.instance} #2"


async def test_a_name_another_client_of_the_daemon_holds_is_renamed_at_once(
    calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusals = [ad.AvahiError("org.freedesktop.Avahi.CollisionError", "Local name collision")]

    async def call(*args: Any, **kwargs: Any) -> list[Any]:
        answer = await calls(*args[:4], *args[4:6])
        if args[3] == "AddService" and refusals:
            raise refusals.pop()
        return answer

    monkeypatch.setattr(ad, "call", call)
    pub, _ = publisher()
    pub.specs[SPEC.instance] = SPEC
    await pub.apply(SPEC.instance)
    names = [body[3] for _, m, body in calls.log if m == "AddService"]
    assert names == [SPEC.instance, f"{SPEC.instance} #2"]
    assert calls.members("/Client1/EntryGroup2")[-1] == "Commit"


async def test_only_other_hosts_answers_count_as_taken() -> None:
    b, _ = browser()
    resolving(b, 2, "node-nc-1", "/r1")
    resolving(b, 2, "node-nc-2", "/r2")
    local = found(2, "node-nc-2", "10.0.0.6", [b"a=1"])
    local[10] = ad.LOOKUP_RESULT_LOCAL
    b.on_signal(ad.SERVICE_RESOLVER, "/r1", "Found", found(2, "node-nc-1", "10.0.0.5", [b"a=1"]))
    b.on_signal(ad.SERVICE_RESOLVER, "/r2", "Found", local)
    assert b.foreign("node-nc-1") and not b.foreign("node-nc-2") and not b.foreign("x")
