"""The registrar's timers: one per (component, kind), re-armed by each transition's effects,
all cancelled at close. Firing hands the pair back to the engine, which decides what it means.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from eucareg.core.transitions import EffectKind

# The timers a transition replaces (CANCEL_TIMERS); RECONSIDER is not tied to a record's state.
RECORD_TIMERS = (EffectKind.EXPIRE_AT, EffectKind.RETRY_AT, EffectKind.RECHECK_AT)


class Timers:
    def __init__(self, clock: Callable[[], float], fire: Callable[[str, EffectKind], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._handles: dict[tuple[str, EffectKind], asyncio.TimerHandle] = {}
        self.closed = False

    def arm(self, component_id: str, kind: EffectKind, at: float) -> None:
        """Fire (component_id, kind) at time `at`, replacing an earlier timer of that pair."""
        if self.closed:
            return
        old = self._handles.pop((component_id, kind), None)
        if old is not None:
            old.cancel()
        delay = max(0.0, at - self._clock())
        self._handles[(component_id, kind)] = asyncio.get_running_loop().call_later(
            delay, self._fired, component_id, kind
        )

    def cancel(self, component_id: str) -> None:
        for kind in RECORD_TIMERS:
            handle = self._handles.pop((component_id, kind), None)
            if handle is not None:
                handle.cancel()

    def close(self) -> None:
        self.closed = True
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def _fired(self, component_id: str, kind: EffectKind) -> None:
        self._handles.pop((component_id, kind), None)
        self._fire(component_id, kind)
