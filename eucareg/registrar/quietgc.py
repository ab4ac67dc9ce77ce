"""Full garbage collections at quiet moments. During a burst of a thousand registrations the
registrar's heap grows fast, and CPython then runs a full collection every few seconds, each
stopping the event loop for 200 ms or more; here they wait until the registrar is idle.

The young generations are still collected as usual (cheap, and they free most garbage). A full
collection runs once the registrar made no transition for QUIET seconds, or at the latest
FULL_EVERY seconds after the last one, so a burst that never ends cannot grow memory forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

QUIET = 2.0  # seconds without a transition that count as idle
FULL_EVERY = 60.0  # seconds between full collections at most, idle or not
CHECK = 1.0  # seconds between looks
PENDING = 10  # collections of the middle generation since the last full one (CPython's default)
NEVER = 2**31 - 1  # a threshold the automatic collector never reaches

# The collector's settings are the process's: several registrars in one process (tests) share
# one change, undone when the last of them stops.
_users = 0
_saved: tuple[int, int, int] | None = None


class QuietCollector:
    """Takes full collections away from CPython's automatic collector while it runs."""

    def __init__(
        self, last_busy: Callable[[], float], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._last_busy = last_busy
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.full_collections = 0
        self.last_full = clock()

    def start(self) -> None:
        global _users, _saved
        if _users == 0:
            # What exists once the registrar is up (modules, classes, the app) lives as long
            # as the process: out of every future full collection's way.
            gc.collect()
            gc.freeze()
            _saved = gc.get_threshold()
            gc.set_threshold(_saved[0], _saved[1], NEVER)
        _users += 1
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        global _users
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        _users -= 1
        if _users == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            gc.unfreeze()

    def due(self) -> bool:
        """Whether a full collection should run now."""
        if gc.get_count()[2] < PENDING:
            return False
        now = self._clock()
        return now - self._last_busy() >= QUIET or now - self.last_full >= FULL_EVERY

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK)
            if self.due():
                started = time.perf_counter()
                found = gc.collect()
                self.last_full = self._clock()
                self.full_collections += 1
                log.debug(
                    "full garbage collection: %d objects freed in %.0f ms",
                    found,
                    (time.perf_counter() - started) * 1000,
                )
