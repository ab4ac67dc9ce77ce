"""Event-only notes: an announcement rejected before any decision, or refused without a record
(an identity conflict). Each is written once per key and reason, not at every mDNS refresh;
the memory of what was said is bounded, so a flood of unique ids cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict

from eucareg.core.model import Announcement, Decision, NewEvent, Role
from eucareg.core.txt import Rejected
from eucareg.mdns.types import Sighting

MAX_NOTES = 10_000  # a forgotten note is only written once more


class Notes:
    def __init__(self, limit: int = MAX_NOTES) -> None:
        self.limit = limit
        self._said: OrderedDict[str, str] = OrderedDict()

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
    )


def _role_name(txt_type: str) -> str:
    try:
        return Role.from_txt_type(txt_type).value
    except ValueError:
        return txt_type or "?"
