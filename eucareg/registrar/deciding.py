"""Deciding: the live announcements and memory become the core's View, the policy decides, and
the transition is applied with no await in between (lesson L1); the effects carry it out.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from eucareg.core.decisions import decided
from eucareg.core.model import (
    HOLDS_SLOT,
    AnnouncedState,
    Announcement,
    Decision,
    Record,
    Role,
    Status,
    announcement_of,
)
from eucareg.core.policy import decide
from eucareg.core.registering import key_proven
from eucareg.core.trust import check_token
from eucareg.core.view import View
from eucareg.registrar.notices import log_fields

if TYPE_CHECKING:
    from collections.abc import Callable

    from eucareg.registrar.ports import Engine

# The engine's logger: operators filter the journal on it (docs/systemd.md).
log = logging.getLogger("eucareg.registrar.engine")

# Re-decided when something they wait on may have changed.
BLOCKED = frozenset({Status.PENDING, Status.REFUSED, Status.UNMATCHED})


class Decider:
    def __init__(self, engine: Engine, self_registered: Callable[[], bool]) -> None:
        self.engine = engine
        self._self_registered = self_registered
        self._live_clusters: frozenset[str] | None = None  # while reconsider() runs

    def view(self, ann: Announcement | None = None) -> View:
        engine = self.engine
        memory = engine.memory
        now = engine.clock()
        verdict = None
        if ann is not None and ann.token_id is not None:
            token = memory.tokens.get(ann.token_id)
            verdict = check_token(token, ann, engine.master_key, now)
        live_clusters: frozenset[str] = frozenset()
        if ann is None or ann.role is Role.SC:
            cached = self._live_clusters
            live_clusters = self.live_registered_clusters() if cached is None else cached
        return View(
            records=memory.records,
            live_registered_clusters=live_clusters,
            self_registered=self._self_registered(),
            trust=memory.trust,
            now=now,
            token=verdict,
            online=engine.online_ids,
            last_seen=engine.presence.last_seen,
            seen_floor=engine.started_at,
            unadmitted=memory.unadmitted,
            index=memory.index,
        )

    def live_registered_clusters(self) -> frozenset[str]:
        """Clusters whose CC is heard saying "registered as FOO" and is the CC registered here
        as FOO: its record's role, cluster and key, not just what the announcement claims."""
        records = self.engine.memory.records
        return frozenset(
            a.cluster
            for a in self.engine.live.values()
            if a.role is Role.CC
            and a.state is AnnouncedState.REGISTERED
            and a.cluster is not None
            and (rec := records.get(a.component_id)) is not None
            and rec.status is Status.REGISTERED
            and rec.role is Role.CC
            and rec.cluster == a.cluster
            and rec.fingerprint == a.fingerprint
        )

    def decide(self, ann: Announcement, *, fresh: bool = False, retry: bool = False) -> Decision:
        """Decide and apply, with no await in between: see the module docstring."""
        engine = self.engine
        existing = engine.memory.records.get(ann.component_id)
        decision = decide(self.view(ann), ann, engine.settings, fresh=fresh, retry=retry)
        if decision.event_only:
            engine.notices.refused(ann, decision)
            return decision
        replaced = engine.memory.records.get(decision.replaces) if decision.replaces else None
        step = decided(
            existing,
            ann,
            decision,
            now=engine.clock(),
            timing=engine.timing,
            proven=(ann.component_id, ann.fingerprint) in engine.proven,
            replaced=replaced,
        )
        if step.change.records:
            new = step.change.records[0]
            log.info(
                "%s %s %s (%s): %s",
                new.status.value,
                ann.role.value,
                ann.component_id,
                ann.address,
                new.reason,
                extra=log_fields(ann, decision),
            )
        engine.step(step)
        return decision

    def redecide(self, component_id: str, *, fresh: bool = False, retry: bool = False) -> None:
        """Decide again for a known component: its live announcement if it is the accepted
        one, else the announcement its record describes."""
        record = self.engine.memory.records.get(component_id)
        live = self.engine.live.get(component_id)
        if record is None:
            if live is not None:
                self.decide(live, fresh=fresh)
            return
        self.decide(announcement_of(record, live), fresh=fresh, retry=retry)

    def reconsider(self) -> None:
        """Decide again for live announcements whose verdict may have changed."""
        # Which clusters are live cannot change while the blocked are decided (a CC becomes
        # registered only when its hook ends): worked out once, not once per waiting SC.
        self._live_clusters = self.live_registered_clusters()
        try:
            for ann in list(self.engine.live.values()):
                record = self.engine.memory.records.get(ann.component_id)
                if record is None or record.status in BLOCKED:
                    self.decide(ann)
        finally:
            self._live_clusters = None

    def key_proven(self, record: Record) -> None:
        """The component signed a request with the key its record awaits."""
        # By the record's state, not by `proven`: an HTTP announcement proves the key too,
        # and must not make the credential request that follows it a no-op.
        if record.status is not Status.AWAITING_KEY:
            return
        engine = self.engine
        engine.proven.add((record.component_id, record.fingerprint))
        old = engine.memory.records.get(record.replaces) if record.replaces else None
        if record.replaces and (old is None or old.claimable):
            # Taking over the operator's registration: decided again now that the key is
            # proven (the registration may be gone, or still running its hook).
            self.redecide(record.component_id, fresh=True)
            return
        if old is not None and old.status in HOLDS_SLOT and record.status is Status.AWAITING_KEY:
            silent = self.view().silent_for(old.component_id)
            if silent is None or silent < engine.settings.replace_after:
                # The old identity was heard again since: the policy decides afresh.
                self.redecide(record.component_id, fresh=True)
                return
        engine.step(key_proven(record, engine.clock(), old))
