"""The registering stage, as transitions: a proven key starts the registration hook, and the
hook's outcome (or its interruption by a restart) registers the component or schedules a retry."""

from __future__ import annotations

from dataclasses import replace

from eucareg.core.decisions import replace_old
from eucareg.core.model import (
    HOLDS_SLOT,
    HookOutcome,
    HookRun,
    NewEvent,
    Record,
    Role,
    Status,
    event_for,
)
from eucareg.core.transitions import (
    NOTHING,
    Effect,
    EffectKind,
    Timing,
    Transition,
    Write,
    join,
    move,
)


def _hook_facts(record: Record) -> tuple[object, ...]:
    """What a hook is told about a component."""
    return (record.role, record.fingerprint, record.address, record.cluster)


def key_proven(record: Record, now: float, replaced: Record | None = None) -> Transition:
    """An accepted component signed a request with its key: its hook may run. `replaced` is
    the silent identity it was admitted to replace (still silent: the engine checked), which
    is replaced now that the newcomer has proved who it is."""
    if record.status is not Status.AWAITING_KEY:
        return NOTHING
    reason = "proved possession of its key; running the registration hook"
    new = replace(
        record,
        status=Status.REGISTERING,
        reason=reason,
        updated_at=now,
        expires_at=None,
        waiting_for=None,
    )
    step = move(record, new, now, ("registering", "key-proven", reason))
    if replaced is not None and replaced.status in HOLDS_SLOT:
        step = join((step, replace_old(replaced, new, now)))
    return step


def hook_finished(
    record: Record | None,
    run: HookRun,
    now: float,
    timing: Timing,
    ran_for: Record | None = None,
) -> Transition:
    """The hook's outcome decides: registered, or failed with a retry (holding no slot).

    `ran_for` is the record the hook was started with. An outcome speaks only for what the
    hook saw: if the id now stands for another key or address (deregistered and back as
    another machine while the hook ran), only the journal changes, and the newcomer's own
    run decides."""
    journal = Transition(Write(hook_runs=(run,)))
    if record is None or record.status is not Status.REGISTERING:
        return journal  # deregistered or replaced meanwhile: only the journal changes
    if ran_for is not None and _hook_facts(ran_for) != _hook_facts(record):
        return journal
    attempts = record.attempts + 1
    if run.outcome in (HookOutcome.OK, HookOutcome.SKIPPED):
        how = "hook succeeded" if run.outcome is HookOutcome.OK else "no hook script"
        reason = f"registered ({how})"
        new = replace(
            record,
            status=Status.REGISTERED,
            reason=reason,
            registered_at=now,
            updated_at=now,
            attempts=attempts,
            next_retry_at=None,
            waiting_for=None,
            expires_at=None,
        )
        step = move(record, new, now, ("registered", run.outcome.value, reason))
        effects = step.effects
        if record.role is Role.CC or record.claimable:
            # The CLC's unmatched NCs may have a home now; SCs of this cluster may proceed;
            # the component the operator registered by hand may take its registration over.
            effects += (Effect(EffectKind.RECONSIDER),)
        return join((journal, Transition(step.change, effects)))
    delay = timing.backoff(attempts)
    detail = (run.stderr.strip().splitlines() or [""])[-1][:200]
    reason = (
        f"hook {run.outcome.value}"
        + (f" (exit {run.exit_code})" if run.exit_code is not None else "")
        + (f": {detail}" if detail else "")
        + f"; retry {attempts + 1} in {delay:g}s"
    )
    new = replace(
        record,
        status=Status.FAILED,
        reason=reason,
        updated_at=now,
        attempts=attempts,
        next_retry_at=now + delay,
    )
    return join((journal, move(record, new, now, ("failed", f"hook-{run.outcome.value}", reason))))


def hook_interrupted(record: Record | None, run: HookRun, now: float) -> Transition:
    """Found at start: a hook that was running when the registrar died. Its process group is
    gone now; it is run once more, marked as a re-run, if its component still waits for it."""
    done = replace(run, outcome=HookOutcome.INTERRUPTED, duration=max(0.0, now - run.started_at))
    events: tuple[NewEvent, ...] = ()
    effects: tuple[Effect, ...] = ()
    script = run.hook.rsplit("/", 1)[-1]
    if script.startswith("deregister-"):
        # Its record is gone (deregistered): nothing to run it for again; the operator is told.
        role = next((r.value for r in Role if f"deregister-{r.hook_name}" == script), "")
        reason = (
            f"deregister hook {run.hook} (run {run.run_id[:8]}) was interrupted by a restart "
            "and is not run again: undo the Eucalyptus registration by hand"
        )
        code = "deregister-hook-interrupted"
        event = NewEvent(now, run.component_id, role, None, "", "hook", code, reason)
        return Transition(Write(hook_runs=(done,), events=(event,)))
    if record is not None:
        again = record.status is Status.REGISTERING
        reason = f"hook {run.hook} (run {run.run_id[:8]}) was interrupted by a restart" + (
            "; running it again, marked as a re-run" if again else ""
        )
        events = (event_for(record, now, "hook", "hook-interrupted", reason),)
        if again:
            effects = (Effect(EffectKind.RUN_HOOK, record.component_id, rerun=True),)
    return Transition(Write(hook_runs=(done,), events=events), effects)
