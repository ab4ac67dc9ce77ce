"""The agent's own time constants, and the retry delays and waits its loops share: events
first, with a timeout only where nothing else would tell us that something changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from . import collect


@dataclass(frozen=True)
class AgentTiming:
    """The agent's own time constants (the configuration holds the operator's)."""

    long_poll: float = collect.LONG_POLL  # `wait` of one credential request
    watch_poll: float = collect.WATCH_POLL  # `wait` of one request watching for revocation
    retry_base: float = 1.0  # first delay after a failed collection or announcement
    retry_max: float = 30.0  # longest such delay
    min_request_interval: float = 1.0  # a registrar answering at once is not asked faster
    connect: float = 5.0  # TCP connect and TLS handshake: a decoy costs us this much at most
    stop_step: float = 1.0  # most any one shutdown step (goodbyes, API) may take
    stop_budget: float = 2.5  # most all shutdown steps together may take (SIGTERM: < 3 s)
    # `fallback_after` is stretched by a random factor up to 1 + this: a rack booted together
    # does not fall back to HTTP in one instant (the burst test sets 0, to show the worst case).
    fallback_spread: float = 0.25


class Backoff:
    """Doubling delays between retries, reset by a success, each drawn at random from its
    upper half: a thousand components refused together do not come back together."""

    def __init__(
        self, base: float, maximum: float, rng: Callable[[float, float], float] = random.uniform
    ) -> None:
        self._base, self._max, self._rng = base, maximum, rng
        self.delay = base  # the upper bound of the next delay

    def reset(self) -> None:
        self.delay = self._base

    def next(self, at_least: float | None = None) -> float:
        """The delay to wait now; the bound of the one after it doubles. `at_least`: what the
        registrar asked for (Retry-After), which is honoured, and spread over up to half again
        as much so that those it sent away together are not back together; sent away again
        and again, we still back off (a registrar that always says "1 s" would otherwise
        gather everyone it turns away into the same second)."""
        bound, self.delay = self.delay, min(self._max, self.delay * 2)
        if at_least is not None and at_least > 0:
            return self._rng(max(at_least, bound / 2), max(at_least * 1.5, bound))
        return self._rng(bound / 2, bound)

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())


async def wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Until `event` is set, or `timeout` seconds pass (None: no timeout)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


async def first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    """Until the first of `waits` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
