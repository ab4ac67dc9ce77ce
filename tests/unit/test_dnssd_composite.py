"""The composite of mDNS and DNS-SD the agent uses with a `[dnssd]` table: every announcement
through both, greetings through mDNS only, and one merged stream of sightings, so the engine
cannot tell how a component was heard. And which backend the agent chooses."""

from __future__ import annotations

from typing import Any

import pytest

from eucareg.agent.host import Agent, choose_backend
from eucareg.config.file import from_mapping
from eucareg.dnssd.backend import DnssdBackend
from eucareg.dnssd.composite import CompositeBackend
from eucareg.mdns.choice import ChosenBackend
from eucareg.mdns.types import Change, ServiceSpec, Sighting
from tests.unit.test_agent_fakes import FakeMdns

TXT = {"txtvers": "1", "type": "node", "addr": "10.0.0.5"}
SPEC = ServiceSpec("node-nc-0123456789ab", 8780, TXT, ("10.0.0.5",), "x.local.")


class Silent(FakeMdns):
    """A backend that cannot greet (what DnssdBackend does)."""

    def greet(self, instance: str) -> bool:
        self.calls.append(("greet", instance))
        return False


def pair() -> tuple[FakeMdns, Silent, CompositeBackend, list[Sighting]]:
    mdns, dnssd = FakeMdns(), Silent()
    both = CompositeBackend([mdns, dnssd])
    heard: list[Sighting] = []
    both.watch(heard.append)
    return mdns, dnssd, both, heard


def seen(instance: str, change: Change, **txt: str) -> Sighting:
    return Sighting(instance, change, txt={**TXT, **txt}, addresses=("10.0.0.5",))


async def test_everything_goes_out_through_both_and_greetings_through_mdns() -> None:
    mdns, dnssd, both, _ = pair()
    await both.start()
    await both.publish(SPEC)
    assert mdns.published == dnssd.published == {SPEC.instance: SPEC}
    assert both.greet(SPEC.instance) is True
    assert ("greet", SPEC.instance) in mdns.calls
    await both.withdraw(SPEC.instance)
    assert mdns.published == dnssd.published == {}
    await both.close()
    assert mdns.calls[0] == dnssd.calls[0] == ("start", "")
    assert mdns.calls[-1] == dnssd.calls[-1] == ("close", "")
    assert len(mdns.handlers) == len(dnssd.handlers) == 1  # one merged watch, however many


def test_heard_twice_is_added_once() -> None:
    mdns, dnssd, _, heard = pair()
    mdns.hear(seen("a", Change.ADDED))
    dnssd.hear(seen("a", Change.ADDED))
    dnssd.hear(seen("a", Change.UPDATED))  # the same again
    assert [(s.instance, s.change) for s in heard] == [("a", Change.ADDED)]


def test_removed_only_when_no_backend_hears_it_any_more() -> None:
    mdns, dnssd, _, heard = pair()
    mdns.hear(seen("a", Change.ADDED))
    dnssd.hear(seen("a", Change.ADDED))
    mdns.hear(Sighting("a", Change.REMOVED))  # a goodbye on the LAN, still in the zone
    assert len(heard) == 1
    dnssd.hear(Sighting("a", Change.REMOVED))
    assert heard[-1] == Sighting("a", Change.REMOVED)
    dnssd.hear(Sighting("a", Change.REMOVED))  # said once
    mdns.hear(Sighting("never-heard", Change.REMOVED))
    assert len(heard) == 2


def test_an_update_from_either_goes_out_and_the_latest_view_wins() -> None:
    mdns, dnssd, _, heard = pair()
    mdns.hear(seen("a", Change.ADDED))
    dnssd.hear(seen("a", Change.ADDED))
    mdns.hear(seen("a", Change.UPDATED, state="registered"))
    assert heard[-1] == seen("a", Change.UPDATED, state="registered")
    dnssd.hear(seen("a", Change.UPDATED, state="registered"))  # DNS-SD catches up: nothing new
    assert len(heard) == 2
    # mDNS lets go; what DNS-SD last said is what handlers have already: nothing to say.
    mdns.hear(Sighting("a", Change.REMOVED))
    assert len(heard) == 2
    # An UPDATED from a backend that had not heard it yet is news only if it differs.
    mdns.hear(seen("a", Change.UPDATED, state="ready"))
    assert heard[-1] == seen("a", Change.UPDATED, state="ready")


def test_a_view_left_behind_comes_back_when_the_newer_one_goes() -> None:
    mdns, dnssd, _, heard = pair()
    dnssd.hear(seen("a", Change.ADDED))
    mdns.hear(seen("a", Change.ADDED, state="registered"))
    assert heard[-1].change is Change.UPDATED
    mdns.hear(Sighting("a", Change.REMOVED))
    assert heard[-1] == seen("a", Change.UPDATED)  # what DNS-SD still says


def test_a_failing_handler_does_not_stop_the_others() -> None:
    mdns, _, both, heard = pair()
    got: list[Sighting] = []

    def broken(_: Sighting) -> None:
        raise RuntimeError("boom")

    both.watch(broken)
    both.watch(got.append)
    mdns.hear(seen("a", Change.ADDED))
    assert len(heard) == len(got) == 1


def config(dnssd: dict[str, Any] | None, **components: Any) -> Any:
    raw: dict[str, Any] = {
        "address": "10.1.2.3",
        "components": components or {"nc": {"cluster": "c1", "installed": True}},
    }
    if dnssd is not None:
        raw["dnssd"] = dnssd
    return from_mapping(raw)


DNSSD = {"domain": "site.example", "server": "10.1.2.53", "tsig_secret_file": "/k/{role}.key"}


def test_the_agent_chooses_its_backends_from_the_configuration() -> None:
    # The mDNS backend itself ([mdns] backend) is made at start: tests/unit/test_avahi_choice.py
    assert isinstance(choose_backend(config(None)), ChosenBackend)
    assert isinstance(choose_backend(config({**DNSSD, "enabled": False})), ChosenBackend)
    both = choose_backend(config(DNSSD))
    assert isinstance(both, CompositeBackend)
    mdns, dnssd = both.backends
    assert isinstance(mdns, ChosenBackend) and isinstance(dnssd, DnssdBackend)
    assert dnssd._registrars_only  # a node looks for registrars only
    alone = choose_backend(config({**DNSSD, "mdns": False}))
    assert isinstance(alone, DnssdBackend)
    registrar = choose_backend(config(DNSSD, clc={"installed": True}))
    assert isinstance(registrar, CompositeBackend)
    assert not registrar.backends[1]._registrars_only  # type: ignore[attr-defined]
    agent = Agent(config(DNSSD))
    assert isinstance(agent.backend, CompositeBackend)


def test_a_composite_needs_a_backend() -> None:
    with pytest.raises(ValueError):
        CompositeBackend([])
