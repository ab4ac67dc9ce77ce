"""Certificates that should have been renewed and were not: a registered component whose stored
certificate is past its renewal date (its agent did not come back for the new one) is reported
once as an `expiring` event, and once more as `expired` when it ends.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from eucareg.core import renewal
from eucareg.core.model import IssuedCertificate, NewEvent, Record, Role, Status, event_for
from eucareg.core.transitions import Transition, Write

if TYPE_CHECKING:
    from eucareg.registrar.desk import Issuer
    from eucareg.registrar.ports import Engine

log = logging.getLogger(__name__)

# A connected agent renews at the due time itself (its watch answers then); one that has not
# within this long is not coming: it is offline, or cannot reach us.
GRACE = 600.0
MIN_SCAN, MAX_SCAN = 30.0, 3600.0
RECENT = 20  # a component's newest credential events looked through for an earlier report


def overdue(
    record: Record, issued: IssuedCertificate, validity: renewal.Validity, margin: float, now: float
) -> NewEvent | None:
    """The event to report for one certificate now, if any (pure; `reported` is the caller's)."""
    phase = renewal.phase(validity, margin, now, issued.serial)
    until = _iso(validity.not_after)
    if phase is renewal.Phase.EXPIRED:
        reason = f"certificate {issued.serial} expired at {until}; the component was not renewed"
        return event_for(record, now, "credentials", "expired", reason)
    due = renewal.due_at(validity, margin, issued.serial)
    if phase is renewal.Phase.DUE and now >= due + min(GRACE, margin / 4):
        reason = (
            f"certificate {issued.serial} is due for renewal since {_iso(due)} and expires at "
            f"{until}; its agent has not collected the new one (is it running, can it reach us?)"
        )
        return event_for(record, now, "credentials", "expiring", reason)
    return None


def _serial_of(reason: str) -> str:
    """The serial an `expiring` or `expired` reason names ("certificate <serial> ...")."""
    words = reason.split(maxsplit=2)
    return words[1] if len(words) > 1 and words[0] == "certificate" else ""


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class ExpiryReport:
    """Scans the stored certificates now and then, and writes what `overdue` finds, once per
    certificate and code: a restarted registrar looks in the events first, so that what its
    predecessor reported is not reported again."""

    def __init__(self, engine: Engine, issuer_for: Callable[[Role], Issuer | None]) -> None:
        self.engine = engine
        self._issuer_for = issuer_for
        self._reported: set[tuple[str, str]] = set()  # (serial, code)
        self._handle: asyncio.TimerHandle | None = None

    def overdue_now(self) -> list[tuple[str, NewEvent]]:
        """(serial, event) for every registered component's certificate overdue now."""
        from eucareg.registrar.desk import validity_of

        memory, now = self.engine.memory, self.engine.clock()
        found: list[tuple[str, NewEvent]] = []
        for component_id, issued in sorted(memory.certificates.items()):
            record = memory.records.get(component_id)
            if record is None or record.status is not Status.REGISTERED:
                continue
            if record.fingerprint != issued.fingerprint:
                continue
            issuer = self._issuer_for(record.role)
            if issuer is None:
                continue
            event = overdue(record, issued, validity_of(issued.cert_pem), issuer.policy.margin, now)
            if event is not None:
                found.append((issued.serial, event))
        return found

    def scan(self) -> list[NewEvent]:
        """Events for what is newly overdue (and remembered as reported)."""
        found: list[NewEvent] = []
        overdue_now = self.overdue_now()
        # Forget what is no longer overdue (renewed, deregistered): the memory stays small.
        serials = {serial for serial, _ in overdue_now}
        self._reported = {seen for seen in self._reported if seen[0] in serials}
        for serial, event in overdue_now:
            if (serial, event.code) not in self._reported:
                self._reported.add((serial, event.code))
                found.append(event)
        return found

    def warnings(self) -> list[str]:
        """One line per certificate overdue now, for `eucareg status`."""
        return [
            f"{event.role} {event.component_id}: {event.reason}" for _, event in self.overdue_now()
        ]

    def start(self) -> None:
        self._tick()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        engine = self.engine
        if engine.stopping:
            return
        try:
            events = self.scan()
        except Exception:  # a bad stored certificate must not end the scans
            log.exception("scanning certificates for renewal failed")
            events = []
        if events:
            engine.spawn(self._report(events))
        self._handle = asyncio.get_running_loop().call_later(self.interval(), self._tick)

    async def _report(self, events: list[NewEvent]) -> None:
        fresh = [event for event in events if not await self._stored(event)]
        for event in fresh:
            log.warning("%s %s: %s", event.code, event.component_id, event.reason)
        if fresh:
            await self.engine.step(Transition(Write(events=tuple(fresh))))

    async def _stored(self, event: NewEvent) -> bool:
        """Whether this report is already among the events (written before a restart). The
        reason names the serial, and the newest few of the component's credential events hold
        it: nothing else is written about a certificate that is not being renewed."""
        serial = _serial_of(event.reason)
        recent = await self.engine.events(
            component_id=event.component_id, kind="credentials", limit=RECENT
        )
        return any(past.code == event.code and _serial_of(past.reason) == serial for past in recent)

    def interval(self) -> float:
        """A twentieth of the shortest margin in use, within [MIN_SCAN, MAX_SCAN]."""
        margins = [
            issuer.policy.margin
            for role in Role
            if role is not Role.CLC and (issuer := self._issuer_for(role)) is not None
        ]
        shortest = min(margins, default=MAX_SCAN * 20)
        return min(MAX_SCAN, max(MIN_SCAN, shortest / 20))
