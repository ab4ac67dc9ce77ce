"""Every change to a registration record, as a pure function: (record, facts) -> transition.

A transition is what must be written, all in one transaction (records, events, token uses,
revocations, certificates, hook journal rows), and the effects the engine carries out once that
write is durable. Nothing here does I/O or reads a clock: the engine passes `now` in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from eucareg.core.model import (
    HOLDS_SLOT,
    HOLDS_TOKEN_USE,
    Announcement,
    Decision,
    DecisionKind,
    HookOutcome,
    HookRun,
    IssuedCertificate,
    NewEvent,
    Record,
    Role,
    Status,
    event_for,
)
from eucareg.core.trust import Token, TrustSettings

# Statuses that wait for something, and expire when it does not come.
WAITING = frozenset({Status.PENDING, Status.AWAITING_KEY})


@dataclass(frozen=True)
class Timing:
    """Time limits of a registrar, from the config file."""

    pending_timeout: float = 3600.0
    hook_timeout: float = 60.0
    retry_base: float = 2.0
    retry_max: float = 300.0
    # How often a component heard over HTTP announces itself again; it counts as heard for
    # three of these (a report, like an mDNS record, has to be renewed to stay live).
    report_interval: float = 30.0

    @property
    def lease(self) -> float:
        return 3 * self.report_interval

    def backoff(self, attempts: int) -> float:
        return float(min(self.retry_max, self.retry_base * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Retention:
    """How much history a registrar keeps: events and finished hook runs (with their output)
    younger than `keep_for` seconds, and at most the newest `max_events` / `max_hook_runs`."""

    keep_for: float = 90 * 86400.0
    max_events: int = 200_000
    max_hook_runs: int = 50_000


@dataclass(frozen=True)
class Prune:
    """Drop history older than `before` (a time) or beyond the newest counts."""

    before: float
    max_events: int
    max_hook_runs: int


class TokenChange(StrEnum):
    RESERVE = "reserve"  # the token admitted this component: one use taken
    RELEASE = "release"  # the component no longer holds what it was admitted to
    SPEND = "spend"  # released, and the token will not admit this component again


@dataclass(frozen=True)
class TokenUse:
    token_id: str
    component_id: str
    change: TokenChange


@dataclass(frozen=True)
class Write:
    """What one transition writes: all of it, or (after a crash) none of it."""

    records: tuple[Record, ...] = ()
    deleted: tuple[str, ...] = ()
    events: tuple[NewEvent, ...] = ()
    token_uses: tuple[TokenUse, ...] = ()
    revoke: tuple[str, ...] = ()  # component ids whose certificates are revoked
    revoke_reason: str = ""
    certificates: tuple[IssuedCertificate, ...] = ()
    hook_runs: tuple[HookRun, ...] = ()
    trust: TrustSettings | None = None
    tokens: tuple[Token, ...] = ()
    prune: Prune | None = None  # history to drop (not a record's change; see Retention)

    def __add__(self, other: Write) -> Write:
        return Write(
            records=self.records + other.records,
            deleted=self.deleted + other.deleted,
            events=self.events + other.events,
            token_uses=self.token_uses + other.token_uses,
            revoke=self.revoke + other.revoke,
            revoke_reason=other.revoke_reason or self.revoke_reason,
            certificates=self.certificates + other.certificates,
            hook_runs=self.hook_runs + other.hook_runs,
            trust=other.trust or self.trust,
            tokens=self.tokens + other.tokens,
            prune=other.prune or self.prune,
        )

    @property
    def empty(self) -> bool:
        return self == Write()


class EffectKind(StrEnum):
    RUN_HOOK = "run-hook"  # run the registration script of the component
    WAKE = "wake"  # answer the component's waiting credential requests
    EXPIRE_AT = "expire-at"  # give up the wait at `at`
    RETRY_AT = "retry-at"  # decide a failed registration again at `at`
    RECHECK_AT = "recheck-at"  # decide again at `at` (a wait that ends by the clock)
    CANCEL_TIMERS = "cancel-timers"
    RECONSIDER = "reconsider"  # a slot or a fact changed: decide the blocked ones again
    REDECIDE = "redecide"  # decide this component again, as freshly seen
    LEASE_END = "lease-end"  # an HTTP announcement not renewed in time: no longer heard
    RUN_DEREGISTER_HOOK = "run-deregister-hook"  # the deregister script for `record`


@dataclass(frozen=True)
class Effect:
    kind: EffectKind
    component_id: str = ""
    at: float = 0.0
    rerun: bool = False
    # The record as it was, for an effect that outlives it (its deregister hook).
    record: Record | None = None


@dataclass(frozen=True)
class Transition:
    change: Write = field(default_factory=Write)
    effects: tuple[Effect, ...] = ()

    @property
    def empty(self) -> bool:
        return self.change.empty and not self.effects


NOTHING = Transition()


def _held_token(record: Record | None) -> str | None:
    if record is None or record.status not in HOLDS_TOKEN_USE:
        return None
    if not record.admitted_by.startswith("token:"):
        return None
    return record.admitted_by.removeprefix("token:")


def token_uses(
    component_id: str, old: Record | None, new: Record | None, *, spend: bool = False
) -> tuple[TokenUse, ...]:
    """A token use is held exactly while the record holds what the token admitted it to."""
    before, after = _held_token(old), _held_token(new)
    if before == after:
        return ()
    out: list[TokenUse] = []
    if before is not None:
        out.append(
            TokenUse(before, component_id, TokenChange.SPEND if spend else TokenChange.RELEASE)
        )
    if after is not None:
        out.append(TokenUse(after, component_id, TokenChange.RESERVE))
    return tuple(out)


def _frees_slot(old: Record | None, new: Record | None) -> bool:
    held = old is not None and old.status in HOLDS_SLOT
    holds = new is not None and new.status in HOLDS_SLOT
    return held and not holds


def _timers(record: Record, recheck_at: float | None = None) -> tuple[Effect, ...]:
    effects = [Effect(EffectKind.CANCEL_TIMERS, record.component_id)]
    if record.status in WAITING and record.expires_at is not None:
        effects.append(Effect(EffectKind.EXPIRE_AT, record.component_id, at=record.expires_at))
    if record.status is Status.FAILED and record.next_retry_at is not None:
        effects.append(Effect(EffectKind.RETRY_AT, record.component_id, at=record.next_retry_at))
    if recheck_at is not None:
        effects.append(Effect(EffectKind.RECHECK_AT, record.component_id, at=recheck_at))
    return tuple(effects)


def move(
    old: Record | None,
    new: Record,
    now: float,
    event: tuple[str, str, str] | None,
    *,
    recheck_at: float | None = None,
) -> Transition:
    """The common shape of a record's step: write it, keep token uses in step, log the event,
    re-arm its timers, wake its waiters, and reconsider the blocked if a slot came free."""
    events = (event_for(new, now, *event),) if event is not None else ()
    effects = [*_timers(new, recheck_at), Effect(EffectKind.WAKE, new.component_id)]
    if new.status is Status.REGISTERING and (old is None or old.status is not Status.REGISTERING):
        effects.append(Effect(EffectKind.RUN_HOOK, new.component_id))
    uses = token_uses(new.component_id, old, new)
    # A freed slot, or a token use handed back, may be what a blocked component waits for.
    if _frees_slot(old, new) or any(u.change is TokenChange.RELEASE for u in uses):
        effects.append(Effect(EffectKind.RECONSIDER))
    change = Write(records=(new,), events=events, token_uses=uses)
    return Transition(change, tuple(effects))


# -- decisions -------------------------------------------------------------------------------


def decided(
    existing: Record | None,
    ann: Announcement,
    decision: Decision,
    *,
    now: float,
    timing: Timing,
    proven: bool,
    replaced: Record | None = None,
) -> Transition:
    """Record the policy's decision on an announcement; its events say how it was heard."""
    return heard_via(
        _decided(existing, ann, decision, now=now, timing=timing, proven=proven, replaced=replaced),
        ann,
    )


def heard_via(step: Transition, ann: Announcement) -> Transition:
    """The events of `step` about the announcing component, stamped with how it was heard."""
    events = step.change.events
    if not any(e.component_id == ann.component_id and not e.via for e in events):
        return step
    stamped = tuple(
        replace(e, via=ann.source) if e.component_id == ann.component_id and not e.via else e
        for e in events
    )
    return replace(step, change=replace(step.change, events=stamped))


def _decided(
    existing: Record | None,
    ann: Announcement,
    decision: Decision,
    *,
    now: float,
    timing: Timing,
    proven: bool,
    replaced: Record | None = None,
) -> Transition:
    kind = decision.kind
    if kind in (DecisionKind.IGNORE, DecisionKind.KEEP) or decision.event_only:
        return NOTHING
    if kind is DecisionKind.FORGET:
        if existing is None:
            return NOTHING
        return Transition(
            Write(
                deleted=(existing.component_id,),
                events=(event_for(existing, now, "matched", decision.code, decision.reason),),
            )
        )
    if kind is DecisionKind.ADOPT and replaced is not None and proven:
        return adopted(replaced, existing, ann, decision.reason, now)
    if kind is DecisionKind.ADOPT and replaced is None:
        return NOTHING
    # The operator's own registration needs no key proof; a component adopting one does.
    proven = proven or ann.source == "manual"
    status = {
        DecisionKind.REGISTER: Status.REGISTERING if proven else Status.AWAITING_KEY,
        DecisionKind.ADOPT: Status.AWAITING_KEY,
        DecisionKind.PENDING: Status.PENDING,
        DecisionKind.REFUSE: Status.REFUSED,
        DecisionKind.UNMATCHED: Status.UNMATCHED,
    }[kind]
    reason = decision.reason
    if status is Status.AWAITING_KEY:
        reason += "; waiting for a request signed by its key"
    if (
        existing is not None
        and existing.status is status
        and existing.reason == reason
        and existing.address == str(ann.address)
    ):
        if decision.recheck_at is not None:
            return Transition(
                effects=(Effect(EffectKind.RECHECK_AT, ann.component_id, at=decision.recheck_at),)
            )
        return NOTHING  # same verdict as last time: no new event
    waiting_for = (
        "proof of key possession" if status is Status.AWAITING_KEY else decision.waiting_for
    )
    record = Record(
        component_id=ann.component_id,
        role=ann.role,
        cluster=ann.cluster,
        address=str(ann.address),
        fingerprint=ann.fingerprint,
        status=status,
        reason=reason,
        waiting_for=waiting_for,
        instance=ann.instance,
        first_seen=existing.first_seen if existing else now,
        updated_at=now,
        expires_at=now + timing.pending_timeout if status in WAITING else None,
        attempts=existing.attempts if existing else 0,
        approved=existing.approved if existing else False,
        admitted_by=decision.admitted_by,
        replaces=decision.replaces,
        credentials_issued_at=existing.credentials_issued_at if existing else None,
        claimable=ann.source == "manual" or (existing is not None and existing.claimable),
    )
    step = move(
        existing, record, now, (status.value, decision.code, reason), recheck_at=decision.recheck_at
    )
    # The old identity is replaced, and its credentials revoked, only by a newcomer that has
    # proved its key: a copied or forged announcement must not cost a powered-off machine
    # its registration. An unproven newcomer waits with `replaces` set (key_proven below).
    if replaced is not None and status is Status.REGISTERING:
        step = _join(step, replace_old(replaced, record, now))
    return step


def adopted(
    manual: Record, existing: Record | None, ann: Announcement, reason: str, now: float
) -> Transition:
    """A component that proved its key takes over the registration the operator made for it:
    registered at once (its hook ran for the operator's record), and that record is gone."""
    record = Record(
        component_id=ann.component_id,
        role=ann.role,
        cluster=ann.cluster,
        address=str(ann.address),
        fingerprint=ann.fingerprint,
        status=Status.REGISTERED,
        reason=reason,
        instance=ann.instance,
        first_seen=existing.first_seen if existing else now,
        updated_at=now,
        registered_at=manual.registered_at or now,
        approved=existing.approved if existing else False,
        admitted_by=manual.admitted_by or "manual",  # "manual", or "imported" (eucareg import)
    )
    step = move(existing, record, now, ("adopted", "adopted", reason))
    taken = f"taken over by {ann.component_id} (key {ann.fingerprint[:19]}…)"
    gone = Transition(
        Write(
            deleted=(manual.component_id,),
            events=(event_for(manual, now, "adopted-by", "adopted", taken),),
        ),
        (Effect(EffectKind.CANCEL_TIMERS, manual.component_id),),
    )
    return _join(step, gone)


def replace_old(old: Record, new: Record, now: float) -> Transition:
    """A newcomer took over a silent component's address: the old one is out, its
    credentials revoked."""
    reason = f"replaced by {new.component_id} at {new.address} (reinstalled?); credentials revoked"
    gone = replace(
        old,
        status=Status.REPLACED,
        reason=reason,
        waiting_for=None,
        updated_at=now,
        expires_at=None,
    )
    step = move(old, gone, now, ("replaced", "reinstalled", reason))
    return Transition(
        replace(step.change, revoke=(old.component_id,), revoke_reason=reason), step.effects
    )


def _join(a: Transition, b: Transition) -> Transition:
    return Transition(a.change + b.change, a.effects + b.effects)


def join(steps: Iterable[Transition]) -> Transition:
    out = NOTHING
    for step in steps:
        out = _join(out, step)
    return out


# -- key proof and hooks ---------------------------------------------------------------------


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
        step = _join(step, replace_old(replaced, new, now))
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
        return _join(journal, Transition(step.change, effects))
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
    return _join(journal, move(record, new, now, ("failed", f"hook-{run.outcome.value}", reason)))


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


# -- expiry and the operator -----------------------------------------------------------------


def expired(record: Record, now: float, waited: float) -> Transition:
    # A timer armed for an earlier deadline may fire after the wait was extended in memory
    # (timers are re-armed only once the extension is durable): the record's deadline rules.
    if record.status not in WAITING or record.expires_at is None or now < record.expires_at:
        return NOTHING
    reason = f"gave up after {waited:g}s waiting for {record.waiting_for}; re-announce to retry"
    new = replace(record, status=Status.EXPIRED, reason=reason, updated_at=now, expires_at=None)
    return move(record, new, now, ("expired", "pending-timeout", reason))


def approved(record: Record, now: float) -> Transition:
    if record.status in HOLDS_SLOT:
        raise ValueError(f"{record.component_id} is already {record.status.value}")
    reason = f"approved by the operator (key {record.fingerprint})"
    new = replace(
        record,
        approved=True,
        status=Status.PENDING,
        reason=reason,
        waiting_for="re-evaluation",
        updated_at=now,
    )
    step = move(record, new, now, ("approved", "operator", reason))
    return Transition(
        step.change, (*step.effects, Effect(EffectKind.REDECIDE, record.component_id))
    )


def rejected(record: Record, now: float) -> Transition:
    if record.status in HOLDS_SLOT:
        raise ValueError(f"{record.component_id} is {record.status.value}; deregister it instead")
    reason = "rejected by the operator; it stays out until approved"
    new = replace(
        record,
        approved=False,
        status=Status.REJECTED,
        reason=reason,
        waiting_for=None,
        expires_at=None,
        updated_at=now,
    )
    return move(record, new, now, ("rejected", "operator", reason))


def deregistered(record: Record, now: float) -> Transition:
    """Remove a component and revoke its credentials; a token that admitted it will not
    admit it again (its use is given back for others)."""
    reason = "deregistered by the operator; credentials revoked"
    change = Write(
        deleted=(record.component_id,),
        events=(event_for(record, now, "deregistered", "operator", reason),),
        token_uses=token_uses(record.component_id, record, None, spend=True),
        revoke=(record.component_id,),
        revoke_reason="deregistered by the operator",
    )
    effects: tuple[Effect, ...] = (
        Effect(EffectKind.CANCEL_TIMERS, record.component_id),
        Effect(EffectKind.WAKE, record.component_id),
        Effect(EffectKind.RECONSIDER),
    )
    if record.status in HOOK_RAN:
        # Its registration hook ran (or may have): undo it (docs/hooks.md, "Deregistering").
        hook = Effect(EffectKind.RUN_DEREGISTER_HOOK, record.component_id, record=record)
        effects = (*effects, hook)
    return Transition(change, effects)


# Statuses in which a component's registration hook ran, or may have run in part.
HOOK_RAN = frozenset({Status.REGISTERED, Status.REGISTERING, Status.FAILED})


def collected(record: Record, now: float) -> Transition:
    if record.credentials_collected_at is not None:
        return NOTHING
    return Transition(Write(records=(replace(record, credentials_collected_at=now),)))


def certificate_issued(
    record: Record, issued: IssuedCertificate, previous: IssuedCertificate | None = None
) -> Transition:
    """A new certificate for the record's key; one it supersedes (another key's, under the
    same id) is revoked in the same write, so no valid certificate is ever orphaned."""
    reason = f"certificate {issued.serial} issued for {record.fingerprint[:19]}…"
    superseded = previous is not None and previous.serial != issued.serial
    return Transition(
        Write(
            records=(replace(record, credentials_issued_at=issued.issued_at),),
            certificates=(issued,),
            events=(event_for(record, issued.issued_at, "credentials", "issued", reason),),
            revoke=(record.component_id,) if superseded else (),
            revoke_reason=f"superseded by certificate {issued.serial}" if superseded else "",
        )
    )


def registrar_event(now: float, code: str, reason: str, kind: str = "trust") -> NewEvent:
    """An event about the registrar itself rather than a component (a trust change, a
    summary of held-back notes)."""
    return NewEvent(
        at=now,
        component_id="-",
        role="registrar",
        cluster=None,
        address="",
        kind=kind,
        code=code,
        reason=reason,
    )


def trust_changed(trust: TrustSettings, now: float, code: str, reason: str) -> Transition:
    """Anything not registered may now be decided differently."""
    return Transition(
        Write(trust=trust, events=(registrar_event(now, code, reason),)),
        (Effect(EffectKind.RECONSIDER),),
    )
