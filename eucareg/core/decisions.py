"""The policy's decision on an announcement, as a transition: the record it makes, its events
stamped with how the component was heard, and the identity it replaces or the operator's
registration it adopts."""

from __future__ import annotations

from dataclasses import replace

from eucareg.core.model import Announcement, Decision, DecisionKind, Record, Status, event_for
from eucareg.core.transitions import (
    NOTHING,
    WAITING,
    Effect,
    EffectKind,
    Timing,
    Transition,
    Write,
    join,
    move,
)


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
    # its registration. An unproven newcomer waits with `replaces` set (registering.key_proven).
    if replaced is not None and status is Status.REGISTERING:
        step = join((step, replace_old(replaced, record, now)))
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
    return join((step, gone))


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
