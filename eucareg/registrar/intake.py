"""The intake of announcements: mDNS sightings and signed HTTP announcements (held for a lease)
become live announcements the engine decides on; a withdrawn or lapsed one may free a slot.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from eucareg.core import legacy
from eucareg.core.model import (
    HOLDS_SLOT,
    AnnouncedState,
    Announcement,
    Decision,
    DecisionKind,
    Record,
    Role,
    Status,
)
from eucareg.core.transitions import EffectKind
from eucareg.core.txt import Rejected, decode
from eucareg.mdns.types import Change as SightingChange
from eucareg.mdns.types import Sighting
from eucareg.registrar.desk import CredentialRefused

if TYPE_CHECKING:
    from eucareg.registrar.ports import Engine

# The engine's logger: operators filter the journal on it (docs/systemd.md).
log = logging.getLogger("eucareg.registrar.engine")


class Intake:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_sighting(self, sighting: Sighting) -> None:
        """Entry point for the mDNS browser; never blocks, never raises."""
        engine = self.engine
        if engine.stopping:
            return  # the browser may outlive us by a moment; the store is closed
        if sighting.change is SightingChange.REMOVED:
            engine.legacy.pop(sighting.instance, None)
            self._forget_instance(sighting.instance)
            return
        result = decode(
            sighting.instance, sighting.txt, sighting.addresses, engine.settings.allowed_ranges
        )
        # Only what decode rejects may be legacy: an eucareg announcement is never misread.
        heard = None
        if isinstance(result, Rejected):
            heard = legacy.classify(sighting.instance, sighting.txt, sighting.addresses)
        if heard is not None:
            engine.notices.heard_legacy(heard)
            return
        engine.legacy.pop(sighting.instance, None)  # the name now says something else
        if isinstance(result, Rejected):
            engine.notices.rejected(sighting, result)
            return
        if sighting.via != result.source:
            result = replace(result, source=sighting.via)  # browsed in DNS, not multicast
        self.submit(result)

    def submit(self, ann: Announcement) -> None:
        """Track a decoded announcement and decide on it at once."""
        engine = self.engine
        previous_id = engine.presence.instances.get(ann.instance)
        if previous_id is not None and previous_id != ann.component_id:
            self._forget_instance(ann.instance)
        fresh = ann.component_id not in engine.live
        engine.presence.instances[ann.instance] = ann.component_id
        previous = engine.live.get(ann.component_id)
        record = engine.memory.records.get(ann.component_id)
        spoof = (
            previous is not None
            and record is not None
            and previous.fingerprint == record.fingerprint
            and (
                ann.fingerprint != record.fingerprint
                # A copy of a registered component's announcement under another role or
                # cluster would hide its live "registered as FOO" (and is refused anyway).
                or (
                    record.status in HOLDS_SLOT
                    and (ann.role, ann.cluster) != (record.role, record.cluster)
                    and (previous.role, previous.cluster) == (record.role, record.cluster)
                )
            )
        )
        if not spoof:
            # Someone else announcing a known id with another key must not displace the real
            # announcement (it would hide a live "registered as FOO", for instance).
            engine.live[ann.component_id] = ann
        engine.decide(ann, fresh=fresh)
        self._moved(ann, previous)

    async def fallback(self, ann: Announcement) -> tuple[Decision, Record | None]:
        """A signed HTTP announcement (the design's registration-service fallback): the
        decision, and the record it left (None when nothing was stored).

        The request was signed by the announced key, so possession is already proven. A
        component we keep a record of is heard for the lease (three report intervals) like a
        live mDNS announcement, so what waits on it (an SC on its CC) moves when it does.
        """
        engine = self.engine
        if engine.stopping:
            raise CredentialRefused(503, "the registrar is stopping; announce again shortly")
        key = (ann.component_id, ann.fingerprint)
        engine.proven.add(key)
        decision = engine.decide(ann, fresh=ann.component_id not in engine.live)
        record = engine.memory.records.get(ann.component_id)
        if record is None or record.fingerprint != ann.fingerprint:
            # Nothing stored for this key (refused outright, not ours, or another key's id):
            # keep nothing of it in memory either, or a flood of ids would grow it.
            engine.proven.discard(key)
        else:
            engine.presence.seen(ann.component_id)
            if record.status is Status.AWAITING_KEY:
                engine.key_proven(record)  # heard over mDNS first: the request proves the key
                record = engine.memory.records.get(ann.component_id)
            if not (decision.event_only and decision.kind is DecisionKind.REFUSE):
                self._lease(ann)
        await engine.writer.flush()
        return decision, record

    def _lease(self, ann: Announcement) -> None:
        engine = self.engine
        previous = engine.presence.lease(ann)
        engine.timers.arm(
            ann.component_id, EffectKind.LEASE_END, engine.clock() + engine.timing.lease
        )
        self._moved(ann, previous)

    def _moved(self, ann: Announcement, previous: Announcement | None) -> None:
        record = self.engine.memory.records.get(ann.component_id)
        if (
            ann.role is Role.CC
            and ann.state is AnnouncedState.REGISTERED
            and (previous is None or previous.state is not AnnouncedState.REGISTERED)
            and record is not None
            and record.status is Status.REGISTERED
            and record.fingerprint == ann.fingerprint
        ):
            # The registered CC now says "registered as FOO": SCs of FOO may stop waiting.
            # (Anyone else saying so changes nothing, and costs no reconsider.)
            self.engine.reconsider()

    def lease_ended(self, component_id: str) -> None:
        """The lease of an HTTP announcement ran out (a LEASE_END timer)."""
        if self.engine.presence.end_lease(component_id):
            log.info("component %s stopped announcing itself over HTTP", component_id)
            self.maybe_silent(component_id)

    def _forget_instance(self, instance: str) -> None:
        component_id = self.engine.presence.forget_instance(instance)
        if component_id is not None:
            log.info("component %s withdrew its announcement", component_id)
            self.maybe_silent(component_id)

    def maybe_silent(self, component_id: str) -> None:
        """A source of `component_id` went away (its announcement, or its last open request).
        If none is left, a newcomer refused its address now waits for it to stay silent and
        may replace it then: decide the blocked again, and once more when that time is up."""
        engine = self.engine
        record = engine.memory.records.get(component_id)
        if record is None or record.status not in HOLDS_SLOT:
            # Silence matters only for a slot a newcomer may take over (and a flood of
            # unknown ids going quiet must not cost a reconsider each).
            return
        engine.presence.seen(component_id)
        if not engine.presence.silent(component_id):
            return
        engine.reconsider()
        replace_after = engine.settings.replace_after
        engine.timers.arm(
            component_id, EffectKind.RECONSIDER, engine.clock() + replace_after + 0.05
        )
