"""Writing the event-only notes (an announcement rejected, refused without a record, or from a
legacy component) through the engine, each once (notes.py), a flood held back for the window's
summary; and the legacy components heard now, shown in status.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from eucareg.core.legacy import LegacyComponent
from eucareg.core.model import Announcement, Decision
from eucareg.core.transitions import Transition, Write
from eucareg.core.txt import Rejected
from eucareg.mdns.types import Sighting
from eucareg.registrar.notes import Notes, legacy_event, refused_event, rejected_event

if TYPE_CHECKING:
    from eucareg.registrar.ports import Engine

# The engine's logger: operators filter the journal on it (docs/systemd.md).
log = logging.getLogger("eucareg.registrar.engine")

MAX_LEGACY = 1000  # legacy components shown; a flood of names must not grow memory


def log_fields(ann: Announcement, decision: Decision) -> dict[str, str]:
    """A decision's log fields (the journal keeps them as COMPONENT_ID, ROLE, DECISION_CODE)."""
    return {
        "component_id": ann.component_id,
        "role": ann.role.value,
        "decision_code": decision.code,
    }


class Notices:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.notes = Notes()
        # Pre-eucareg components heard now, by instance name: shown, never registered.
        self.legacy: dict[str, LegacyComponent] = {}
        self._summary_handle: asyncio.TimerHandle | None = None

    def refused(self, ann: Announcement, decision: Decision) -> None:
        """A decision that leaves no record (event_only): noted once per key and reason."""
        key = f"{ann.component_id}:{ann.fingerprint}:{ann.role}:{ann.cluster}"
        if not self.notes.first(key, decision.code):
            return
        if self._admit(decision.code):
            log.warning(
                "refused %s %s: %s",
                ann.role.value,
                ann.component_id,
                decision.reason,
                extra=log_fields(ann, decision),
            )
            event = refused_event(ann, decision, self.engine.clock())
            self.engine.step(Transition(Write(events=(event,))))

    def rejected(self, sighting: Sighting, rejected: Rejected) -> None:
        if not self.notes.first(f"rejected:{sighting.instance}", rejected.reason):
            return
        if self._admit(rejected.code):
            log.warning("rejected announcement %r: %s", sighting.instance, rejected.reason)
            event = rejected_event(sighting, rejected, self.engine.clock())
            self.engine.step(Transition(Write(events=(event,))))

    def heard_legacy(self, heard: LegacyComponent) -> None:
        """Show a pre-eucareg component in status, and say so once per instance: as
        rejected(), the same instance saying the same again writes nothing."""
        self.legacy.pop(heard.instance, None)
        self.legacy[heard.instance] = heard  # the newest last: the oldest is dropped first
        while len(self.legacy) > MAX_LEGACY:
            del self.legacy[next(iter(self.legacy))]
        what = f"{heard.code}|{heard.role}|{heard.cluster}|{heard.address}|{heard.eucavers}"
        if not self.notes.first(f"legacy:{heard.instance}", what):
            return
        if self._admit(heard.code):
            event = legacy_event(heard, self.engine.clock())
            log.warning("legacy announcement: %s", event.reason)
            self.engine.step(Transition(Write(events=(event,))))

    def legacy_components(self) -> list[dict[str, str | None]]:
        """The legacy components heard now, for GET /v1/status, in a stable order."""
        return [
            {
                "kind": c.kind,
                "role": c.role,
                "cluster": c.cluster,
                "address": c.address,
                "eucavers": c.eucavers,
                "instance": c.instance,
            }
            for c in sorted(self.legacy.values(), key=lambda c: (c.role, c.instance))
        ]

    def _admit(self, code: str) -> bool:
        """A note may be written now, or is held for the window's summary event."""
        if self.notes.admit(self.engine.clock(), code):
            return True
        if self._summary_handle is None and not self.engine.stopping:
            self._summary_handle = asyncio.get_running_loop().call_later(
                self.notes.window, self._write_summary
            )
        return False

    def _write_summary(self) -> None:
        self._summary_handle = None
        event = self.notes.summary(self.engine.clock())
        if event is not None and not self.engine.stopping:
            log.warning("%s", event.reason)
            self.engine.step(Transition(Write(events=(event,))))

    def close(self) -> None:
        """Write what the window held back (while the store still takes it), and stop."""
        held = self.notes.summary(self.engine.clock())
        if held is not None and self.engine.writer.running:
            self.engine.step(Transition(Write(events=(held,))))
        if self._summary_handle is not None:
            self._summary_handle.cancel()
