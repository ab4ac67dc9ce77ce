"""Steps that come from neither an announcement nor a hook: a wait that expires, the operator's
approval, rejection, deregistration and trust changes, and credentials issued and collected."""

from __future__ import annotations

from dataclasses import replace

from eucareg.core.model import HOLDS_SLOT, IssuedCertificate, NewEvent, Record, Status, event_for
from eucareg.core.transitions import (
    NOTHING,
    WAITING,
    Effect,
    EffectKind,
    Transition,
    Write,
    move,
    token_uses,
)
from eucareg.core.trust import TrustSettings


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
