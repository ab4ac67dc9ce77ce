"""Event-only notes: an announcement rejected before any decision, refused without a record
(an identity conflict), or a legacy component's. Each is written once per key and reason, not
at every mDNS refresh; the memory of what was said is bounded, so a flood of ids cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict

from eucareg.core import legacy
from eucareg.core.legacy import LegacyComponent
from eucareg.core.model import Announcement, Decision, NewEvent, Role
from eucareg.core.operations import registrar_event
from eucareg.core.txt import Rejected
from eucareg.mdns.types import Sighting

MAX_NOTES = 10_000  # a forgotten note is only written once more
# Event-only notes written one by one per window; beyond that they are counted and written
# as one summary event when the window ends (a flood of unique senders is one line a minute).
NOTES_PER_WINDOW = 100
NOTE_WINDOW = 60.0


class Notes:
    def __init__(
        self,
        limit: int = MAX_NOTES,
        per_window: int = NOTES_PER_WINDOW,
        window: float = NOTE_WINDOW,
    ) -> None:
        self.limit = limit
        self.per_window = per_window
        self.window = window
        self._said: OrderedDict[str, str] = OrderedDict()
        self._window_start = 0.0
        self._written = 0  # notes written one by one in the current window
        self.held: dict[str, int] = {}  # code -> notes summarised instead, this window

    def admit(self, now: float, code: str) -> bool:
        """Whether a new note may be written on its own now; if not, it is counted under
        `code` for the window's summary (see summary())."""
        if now - self._window_start >= self.window:
            self._window_start, self._written = now, 0
        if self._written < self.per_window:
            self._written += 1
            return True
        self.held[code] = self.held.get(code, 0) + 1
        return False

    def summary(self, now: float) -> NewEvent | None:
        """One event for the notes held back so far (and forget them), or None."""
        if not self.held:
            return None
        total = sum(self.held.values())
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.held.items()))
        self.held = {}
        return registrar_event(
            now,
            "notes-summarised",
            f"{total} more rejected or refused announcements were not written one by one "
            f"(more than {self.per_window} in {self.window:g}s): {codes}",
            kind="summary",
        )

    def __len__(self) -> int:
        return len(self._said)

    def first(self, key: str, what: str) -> bool:
        """Whether `what` is news for `key`; remembered, the oldest key forgotten first."""
        news = self._said.get(key) != what
        self._said[key] = what
        self._said.move_to_end(key)
        while len(self._said) > self.limit:
            self._said.popitem(last=False)
        return news


def rejected_event(sighting: Sighting, rejected: Rejected, now: float) -> NewEvent:
    """An announcement that is not one: its fields are echoed cut short, never trusted."""
    return NewEvent(
        at=now,
        component_id=sighting.txt.get("id", "")[:64] or f"instance:{sighting.instance}"[:64],
        role=_role_name(sighting.txt.get("type", ""))[:16],
        cluster=(sighting.txt.get("cluster") or "")[:64] or None,
        address=sighting.txt.get("addr", "")[:64],
        kind="rejected",
        code=rejected.code,
        reason=f"announcement {sighting.instance!r}: {rejected.reason}",
        via=sighting.via,
    )


def refused_event(ann: Announcement, decision: Decision, now: float) -> NewEvent:
    return NewEvent(
        at=now,
        component_id=ann.component_id,
        role=ann.role.value,
        cluster=ann.cluster,
        address=str(ann.address),
        kind="refused",
        code=decision.code,
        reason=decision.reason,
        via=ann.source,
    )


def legacy_event(heard: LegacyComponent, now: float) -> NewEvent:
    """A `legacy` event: like a rejected one, keyed by the instance (there is no id)."""
    return NewEvent(
        at=now,
        component_id=f"instance:{heard.instance}"[:64],
        role=heard.role,
        cluster=heard.cluster,
        address=heard.address,
        kind="legacy",
        code=heard.code,
        reason=legacy.reason(heard),
    )


def _role_name(txt_type: str) -> str:
    try:
        return Role.from_txt_type(txt_type).value
    except ValueError:
        return txt_type or "?"
