"""Events say how the announcement behind them was heard (`via`): multicast DNS, wide-area
DNS-SD, an HTTP report, the operator's registration; "" when no announcement caused them. The
field is stored (registry revision 0003) and read back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eucareg.core.decisions import decided, heard_via
from eucareg.core.model import HEARD_VIA, DecisionKind, NewEvent, Role, Status
from eucareg.core.policy import decide
from eucareg.core.transitions import Timing, Transition, Write
from eucareg.core.trust import Mode, TrustSettings
from eucareg.core.view import RegistrarSettings
from eucareg.dnssd.composite import CompositeBackend
from eucareg.mdns.types import Change, Sighting
from eucareg.pki import certificates, keypairs
from eucareg.registrar.engine import Issuer
from tests.factories import ann, sighting
from tests.unit.test_policy import view
from tests.unit.test_registrar import settle
from tests.unit.test_renewal import SHORT, Clock, make

CLC = RegistrarSettings(
    registers=frozenset({Role.WALRUS, Role.CC, Role.SC}), observes_unmatched_nodes=True
)


def test_a_decision_s_events_carry_the_announcement_s_source() -> None:
    for source in HEARD_VIA:
        walrus = dataclasses.replace(ann(Role.WALRUS), source=source)
        trust = TrustSettings(mode=Mode.ANY, install_until=1e12)
        decision = decide(view(trust=trust), walrus, CLC)
        assert decision.kind is DecisionKind.REGISTER and not decision.event_only
        step = decided(None, walrus, decision, now=1.0, timing=Timing(), proven=False)
        assert step.change.events, decision
        assert {e.via for e in step.change.events} == {source}


def test_only_the_announcing_component_s_unstamped_events_are_stamped() -> None:
    walrus = ann(Role.WALRUS)
    other = ann(Role.CC, "c1")
    mine = NewEvent(1.0, walrus.component_id, "walrus", None, "", "pending", "x", "r")
    theirs = NewEvent(1.0, other.component_id, "cc", "c1", "", "replaced", "x", "r")
    already = dataclasses.replace(mine, via="manual")
    step = heard_via(Transition(Write(events=(mine, theirs, already))), walrus)
    assert [e.via for e in step.change.events] == ["mdns", "", "manual"]
    nothing = Transition(Write(events=(theirs,)))
    assert heard_via(nothing, walrus) is nothing


async def test_stored_and_read_back_from_mdns_and_dnssd_sightings(tmp_path: Path) -> None:
    key = keypairs.generate_key()
    ca = certificates.create_cloud_ca(key, "via")
    reg = await make(tmp_path, Issuer(key=key, cert=ca, cloud_cert=ca, policy=SHORT), Clock())
    try:
        walrus, cc = ann(Role.WALRUS), ann(Role.CC, "c1")
        reg.on_sighting(sighting(walrus))  # multicast: the default
        reg.on_sighting(dataclasses.replace(sighting(cc), via="dnssd"))
        bad = dataclasses.replace(sighting(ann(Role.SC, "c1")), txt={"txtvers": "1"})
        reg.on_sighting(dataclasses.replace(bad, via="dnssd"))
        await settle(reg)
        await reg.writer.flush()
        assert reg.memory.records[walrus.component_id].status is Status.REGISTERED
        events = reg.store.events(limit=1000)
        by = {(e.component_id, e.kind): e.via for e in events}
        assert by[(walrus.component_id, "awaiting-key")] == "mdns"
        assert by[(cc.component_id, "awaiting-key")] == "dnssd"
        # A key proof or a hook's outcome is not an announcement: nothing to say.
        assert by[(walrus.component_id, "registered")] == ""
        assert [e.via for e in events if e.kind == "rejected"] == ["dnssd"]
    finally:
        await reg.close()


def test_the_dnssd_and_mdns_composite_passes_on_how_it_heard() -> None:
    class Quiet:
        def watch(self, handler: object) -> None:
            self.handler = handler

    mdns, dnssd = Quiet(), Quiet()
    both = CompositeBackend([mdns, dnssd])  # type: ignore[list-item]
    heard: list[Sighting] = []
    both.watch(heard.append)
    dnssd.handler(Sighting("walrus-x", Change.ADDED, txt={"a": "1"}, via="dnssd"))  # type: ignore[operator]
    mdns.handler(Sighting("walrus-x", Change.ADDED, txt={"a": "1"}))  # type: ignore[operator]
    assert [s.via for s in heard] == ["dnssd", "mdns"]  # the latest view, and how it came
