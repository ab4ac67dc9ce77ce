"""A transition: what one change to a registration record writes, all in one transaction, and the
effects the engine carries out once that write is durable; `move` is the common shape of a step.
The steps are in decisions.py, registering.py and operations.py; none does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from eucareg.core.model import (
    HOLDS_SLOT,
    HOLDS_TOKEN_USE,
    HookRun,
    IssuedCertificate,
    NewEvent,
    Record,
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


def _join(a: Transition, b: Transition) -> Transition:
    return Transition(a.change + b.change, a.effects + b.effects)


def join(steps: Iterable[Transition]) -> Transition:
    out = NOTHING
    for step in steps:
        out = _join(out, step)
    return out
