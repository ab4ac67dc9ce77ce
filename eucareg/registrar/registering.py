"""A component's registration hook as the engine runs it: one run per component at a time,
its outcome turned into a transition (registered, or failed with a retry), and at start the
runs a dead registrar left behind killed and owed again as marked re-runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from eucareg.core.model import HookOutcome, HookRun, Status
from eucareg.core.registering import hook_finished, hook_interrupted
from eucareg.core.transitions import EffectKind
from eucareg.registrar.batch import Member
from eucareg.registrar.faults import crash_point
from eucareg.registrar.hook_processes import kill_orphaned
from eucareg.store.registry import Snapshot

if TYPE_CHECKING:
    from eucareg.registrar.ports import Engine

log = logging.getLogger(__name__)


class Registering:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[str, asyncio.Lock] = {}
        # Runs holding or waiting for each lock: a lock goes only when none is left. (Dropped
        # when merely unlocked, it vanished between a release and its waiter's wake-up, and a
        # third run took a fresh lock and ran beside the second.)
        self._users: dict[str, int] = {}

    async def resume(self, snapshot: Snapshot) -> None:
        """Pick up the hooks of a registrar that stopped: kill what still runs of them, record
        them interrupted, and run each owed hook (marked when it follows an interrupted run)."""
        engine = self.engine
        now = engine.clock()
        rerun: set[str] = set()
        for run in snapshot.running_hooks:
            if not await kill_orphaned(run):
                log.error(
                    "hook %s (pgid %s) survived SIGKILL; recording it interrupted",
                    run.run_id,
                    run.pgid,
                )
            step = hook_interrupted(engine.memory.records.get(run.component_id), run, now)
            if any(e.kind is EffectKind.RUN_HOOK for e in step.effects):
                rerun.add(run.component_id)
            engine.step(step)
        for record in list(engine.memory.records.values()):
            if record.status is Status.REGISTERING and record.component_id not in rerun:
                # Decided, but its hook never started (the gate never opened): run it now. If
                # the run it replaces was interrupted by an earlier crash, this one is that
                # run's re-run, and says so.
                owed = record.component_id in snapshot.interrupted
                engine.spawn(self.run(record.component_id, rerun=owed))

    async def run(self, component_id: str, *, rerun: bool) -> None:
        async with self.held(component_id):
            await self._run(component_id, rerun=rerun)

    @contextlib.asynccontextmanager
    async def held(self, component_id: str) -> AsyncIterator[None]:
        """The component's hook lock: one hook of it at a time, registration or deregister
        hook (a deregister hook neither overtakes a registration still running nor runs
        beside the hook of the component registered again at once)."""
        lock = self._locks.setdefault(component_id, asyncio.Lock())
        self._users[component_id] = self._users.get(component_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            left = self._users[component_id] - 1
            if left:
                self._users[component_id] = left
            else:
                del self._users[component_id]
                del self._locks[component_id]

    async def _run(self, component_id: str, *, rerun: bool) -> None:
        engine = self.engine
        record = engine.memory.records.get(component_id)
        if record is None or record.status is not Status.REGISTERING:
            return
        live = engine.live.get(component_id)
        eucavers = live.eucavers if live and live.fingerprint == record.fingerprint else ""
        attempt = record.attempts + 1
        try:
            if engine.batcher.takes(record):
                batched = await engine.batcher.run(Member(record, eucavers, rerun, attempt))
                if batched is None:
                    return  # dropped before its batch started: nothing ran, nothing to record
                run = batched
            else:
                run = await engine.hooks.run(
                    record, eucavers=eucavers, rerun=rerun, attempt=attempt
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Never leave the record in `registering`: a fault of ours is a failed attempt.
            log.exception("hook for %s could not run", component_id)
            run = HookRun(
                run_id=uuid.uuid4().hex,
                component_id=component_id,
                hook=str(engine.hook_dir / record.role.hook_name),
                started_at=engine.clock(),
                outcome=HookOutcome.FAILED,
                stderr=f"cannot run the hook: {exc!r}",
                attempt=record.attempts + 1,
                rerun=rerun,
            )
        current = engine.memory.records.get(component_id)
        await engine.step(hook_finished(current, run, engine.clock(), engine.timing, record))
        if run.outcome in (HookOutcome.OK, HookOutcome.SKIPPED):
            crash_point("after-commit")
            log.info("registered %s %s at %s", record.role.value, component_id, record.address)
        else:
            log.warning("registration of %s failed: %s", component_id, run.outcome.value)
