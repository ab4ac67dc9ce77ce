"""Carrying out transitions: each is applied to memory at once, its write queued, and its effects
(hooks, timers, wake-ups, decisions again) started only once that write is durable. Also the
registrar's background tasks, and what a timer that fires means.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from eucareg.core.operations import expired
from eucareg.core.transitions import Effect, EffectKind, Transition

if TYPE_CHECKING:
    from eucareg.registrar.ports import Engine

# The engine's logger: operators filter the journal on it (docs/systemd.md), whichever module
# of the registrar a line comes from.
log = logging.getLogger("eucareg.registrar.engine")


class Effects:
    def __init__(self, engine: Engine, on_fatal: Callable[[BaseException], None]) -> None:
        self.engine = engine
        self._on_fatal = on_fatal
        self.tasks: set[asyncio.Task[None]] = set()

    def step(self, step: Transition) -> Awaitable[None]:
        """Apply a transition to memory now, queue its write, and carry out its effects once
        the write is durable. The returned awaitable resolves after the effects are started."""
        if step.empty:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        engine = self.engine
        engine.memory.apply(step.change)
        engine.busy_at = time.monotonic()  # for quietgc: a burst is on while transitions come
        durable = engine.writer.commit(step.change)
        # Shielded: a caller that is cancelled (a client hung up) must not cancel the effects
        # of a transition that is already in memory and on its way to the disk.
        return asyncio.shield(self.spawn(self._after(durable, step.effects)))

    async def _after(self, durable: Awaitable[None], effects: tuple[Effect, ...]) -> None:
        try:
            await durable
        except Exception as exc:
            self._on_fatal(exc)
            raise
        self.carry_out(effects)

    def carry_out(self, effects: tuple[Effect, ...]) -> None:
        engine = self.engine
        for effect in effects:
            cid = effect.component_id
            if effect.kind is EffectKind.RUN_HOOK:
                self.spawn(engine.registering.run(cid, rerun=effect.rerun))
            elif effect.kind is EffectKind.WAKE:
                engine.wakeups.notify(cid)
            elif effect.kind is EffectKind.CANCEL_TIMERS:
                engine.timers.cancel(cid)
            elif effect.kind in (EffectKind.EXPIRE_AT, EffectKind.RETRY_AT, EffectKind.RECHECK_AT):
                engine.timers.arm(cid, effect.kind, effect.at)
            elif effect.kind is EffectKind.RECONSIDER:
                engine.reconsider()
            elif effect.kind is EffectKind.REDECIDE:
                engine.redecide(cid, fresh=True)
            elif effect.kind is EffectKind.RUN_DEREGISTER_HOOK and effect.record is not None:
                engine.deregistering.start(effect.record)

    def fire(self, component_id: str, kind: EffectKind) -> None:
        """A timer of the component's ran out (see timers.py)."""
        engine = self.engine
        if kind is EffectKind.EXPIRE_AT:
            self._expire(component_id)
        elif kind is EffectKind.RETRY_AT:
            engine.redecide(component_id, retry=True)
        elif kind is EffectKind.RECHECK_AT:
            engine.redecide(component_id)
        elif kind is EffectKind.RECONSIDER:
            engine.reconsider()
        elif kind is EffectKind.LEASE_END:
            engine.intake.lease_ended(component_id)

    def _expire(self, component_id: str) -> None:
        engine = self.engine
        record = engine.memory.records.get(component_id)
        if record is not None:
            self.step(expired(record, engine.clock(), engine.timing.pending_timeout))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("registrar task failed", exc_info=task.exception())

    async def idle(self) -> None:
        """Wait until every scheduled piece of work is done and durable (tests, benchmarks)."""
        while True:
            while self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            await self.engine.writer.flush()
            if not self.tasks:
                return

    async def close(self) -> None:
        """Cancel the work still under way, and wait for it to end."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("registrar task failed while stopping: %r", result)
