"""Who waits on a component's record: one event per component, set when its record changes,
and dropped once no request waits on it. Plain bookkeeping; the effects decide when to wake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class Wakeups:
    def __init__(self) -> None:
        self.changed: dict[str, asyncio.Event] = {}  # woken when a record changes
        self.waiters: dict[str, int] = {}  # requests waiting on each of those events

    def change_event(self, component_id: str) -> asyncio.Event:
        return self.changed.setdefault(component_id, asyncio.Event())

    @contextlib.contextmanager
    def waiting_on(self, component_id: str) -> Iterator[None]:
        """Count a request waiting on the component's change event (a credential request, an
        announcement waiting for its outcome); the event is dropped when the last one ends,
        not before (one caller's end must not leave another waiting on a forgotten event)."""
        self.waiters[component_id] = self.waiters.get(component_id, 0) + 1
        try:
            yield
        finally:
            left = self.waiters.pop(component_id) - 1
            if left:
                self.waiters[component_id] = left
            else:
                self.changed.pop(component_id, None)

    def notify(self, component_id: str) -> None:
        """Wake every request waiting on this component; later waiters get a fresh event."""
        event = self.changed.pop(component_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        for component_id in list(self.changed):
            self.notify(component_id)
