"""A component's deregister hook (`deregister-node`, ...) as the engine runs it once the operator
deregistered it: journaled like a registration hook, retried with backoff, each outcome an
event, and the last run handed to the operator's `eucareg deregister`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING

from eucareg.core.model import HookOutcome, HookRun, Record, event_for
from eucareg.core.transitions import Transition, Write
from eucareg.registrar.hooks import DEREGISTER, script_for

if TYPE_CHECKING:
    from eucareg.registrar.ports import Engine

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a failing deregister hook runs this often in all, then is reported
KEPT = 1000  # outcomes kept after their hook ended, for an operator who asks a moment later
DONE = frozenset({HookOutcome.OK, HookOutcome.SKIPPED})


def hook_ended(record: Record, run: HookRun, now: float, last: bool) -> Transition:
    """The journal row of a finished deregister hook and the event saying what it did (and,
    after a failure, whether it runs again). No script is no event: a site without deregister
    hooks hears nothing new of each deregistration (the journal still has the row)."""
    if run.outcome is HookOutcome.SKIPPED:
        return Transition(Write(hook_runs=(run,)))
    if run.outcome is HookOutcome.OK:
        code, reason = "deregister-hook-ok", f"deregister hook {run.hook} succeeded"
    else:
        tail = (run.stderr.strip().splitlines() or [""])[-1][:200]
        code = f"deregister-hook-{run.outcome.value}"
        reason = f"deregister hook {run.hook} {run.outcome.value} (attempt {run.attempt})"
        reason += f": {tail}" if tail else ""
        reason += "; giving up: undo the registration by hand" if last else "; trying again"
    event = event_for(record, now, "hook", code, reason)
    return Transition(Write(hook_runs=(run,), events=(event,)))


class Deregistering:
    """Runs deregister hooks, one task per deregistration, and keeps each outcome (the last
    KEPT of them) for the operator's request, which picks it up right after deregistering."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._outcomes: OrderedDict[str, asyncio.Future[HookRun]] = OrderedDict()

    def start(self, record: Record) -> None:
        """Run the deregister hook of `record` (deleted already) in a task of the engine."""
        outcome: asyncio.Future[HookRun] = asyncio.get_running_loop().create_future()
        self._outcomes.pop(record.component_id, None)
        self._outcomes[record.component_id] = outcome
        while len(self._outcomes) > KEPT:
            self._outcomes.popitem(last=False)
        self.engine.spawn(self._run(record, outcome))

    def outcome(self, component_id: str) -> asyncio.Future[HookRun] | None:
        """The final run of the deregister hook started last for `component_id` (done once
        its last attempt ended), or None."""
        return self._outcomes.get(component_id)

    async def _run(self, record: Record, outcome: asyncio.Future[HookRun]) -> None:
        engine = self.engine
        try:
            # Under the component's hook lock: after a registration hook still running, and
            # before the hook of the component admitted again meanwhile.
            async with engine.registering.held(record.component_id):
                run = await self._attempts(record)
            if run.outcome in DONE:
                log.info(
                    "deregistered %s %s: deregister hook %s",
                    record.role.value,
                    record.component_id,
                    run.outcome.value,
                )
            else:
                log.error(
                    "deregister hook of %s %s %s after %d attempts",
                    record.role.value,
                    record.component_id,
                    run.outcome.value,
                    run.attempt,
                )
            if not outcome.done():
                outcome.set_result(run)
        finally:
            if not outcome.done():
                outcome.cancel()  # the registrar stops: a waiting operator is told so

    async def _attempts(self, record: Record) -> HookRun:
        """Run the hook until it succeeds or ATTEMPTS runs failed, with backoff; the last."""
        engine = self.engine
        attempt = 1
        while True:
            run = await self._attempt(record, attempt)
            last = run.outcome in DONE or attempt == ATTEMPTS
            await engine.step(hook_ended(record, run, engine.clock(), last))
            if last:
                return run
            await asyncio.sleep(
                min(engine.timing.retry_max, engine.timing.retry_base * 2 ** (attempt - 1))
            )
            attempt += 1

    async def _attempt(self, record: Record, attempt: int) -> HookRun:
        engine = self.engine
        try:
            return await engine.hooks.run(record, attempt=attempt, event=DEREGISTER)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("deregister hook for %s could not run", record.component_id)
            return HookRun(
                run_id=uuid.uuid4().hex,
                component_id=record.component_id,
                hook=str(script_for(engine.hook_dir, record.role, DEREGISTER)),
                started_at=engine.clock(),
                outcome=HookOutcome.FAILED,
                stderr=f"cannot run the hook: {exc!r}",
                attempt=attempt,
            )
