"""The registration policy: a pure function from (records, live facts, announcement) to a decision.

It orders the design's consistency checks (slots.py, claims.py, admission.py) and nothing else:
no I/O, no clock, no globals. That is what lets the tests run every ordering and race against it.
"""

from __future__ import annotations

from dataclasses import replace

from eucareg.core.admission import admit, trust_refusal
from eucareg.core.claims import claim, claims, manual
from eucareg.core.model import (
    HOLDS_SLOT,
    Announcement,
    Decision,
    DecisionKind,
    Record,
    Role,
    Status,
)
from eucareg.core.slots import address_taken, check_role, observe_node, refuse
from eucareg.core.trust import Mode
from eucareg.core.view import RegistrarSettings, View


def decide(
    view: View,
    ann: Announcement,
    settings: RegistrarSettings,
    *,
    fresh: bool = False,
    retry: bool = False,
) -> Decision:
    """Decide what to do with one announcement (see _decide); then bound what an
    unauthenticated sender can make us store."""
    decision = _decide(view, ann, settings, fresh=fresh, retry=retry)
    if decision.event_only or decision.kind not in _STORED_UNADMITTED:
        return decision
    if view.token is not None and view.token.ok:
        return decision  # a token-proven component is never crowded out
    if ann.source == "fallback" and view.trust.mode is not Mode.ANY:
        # An unauthenticated HTTP request outside mode any leaves nothing behind.
        return replace(decision, event_only=True)
    if ann.component_id not in view.records and view.unadmitted >= settings.max_unadmitted:
        return Decision(
            DecisionKind.REFUSE,
            "pending-full",
            f"{view.unadmitted} components already wait or were refused (the limit is "
            f"{settings.max_unadmitted}); not recorded. Approve, reject or deregister some, or "
            "use a join token, which is never crowded out",
            event_only=True,
        )
    return decision


_STORED_UNADMITTED = frozenset({DecisionKind.PENDING, DecisionKind.REFUSE, DecisionKind.UNMATCHED})


def _decide(
    view: View,
    ann: Announcement,
    settings: RegistrarSettings,
    *,
    fresh: bool = False,
    retry: bool = False,
) -> Decision:
    """Decide what to do with one announcement.

    `fresh` is true when the component has just (re)appeared on the network rather than
    re-sent an announcement we already knew; only a fresh sighting revives an expired wait.
    `retry` is true when a failed registration's backoff ran out: it is decided afresh.
    """
    handles = ann.role in settings.registers and (
        ann.role is not Role.NC or ann.cluster == settings.own_cluster
    )
    if not handles:
        if ann.role is Role.NC and settings.observes_unmatched_nodes:
            return observe_node(view, ann)
        if ann.role is Role.CLC and settings.own_clc not in (None, ann.component_id):
            # The design assumes one CLC per LAN; a second one splits the cloud (or is a rogue).
            return replace(
                refuse(
                    "second-clc",
                    f"another CLC announces itself at {ann.address} (key "
                    f"{ann.fingerprint[:19]}…): a cloud has one CLC; components pinned to ours "
                    "refuse it",
                ),
                event_only=True,  # an event and a status warning, never a record
            )
        return Decision(DecisionKind.IGNORE, "not-mine", "not registered by this registrar")

    if ann.source == "manual":
        return manual(view, ann, settings)
    existing = view.records.get(ann.component_id)
    if existing is not None:
        verdict = _against_existing(existing, ann, fresh, retry)
        if verdict is not None:
            return verdict
    index = view.indexed()
    for other in view.matching(index.with_key(ann.fingerprint), ann.component_id):
        # (An operator's registration names the key it waits for: no use of it, for the
        # component it waits for.)
        if _is_claimed(other) and not claims(ann, other):
            return refuse(
                "key-in-use",
                f"key {ann.fingerprint[:19]}… already belongs to {other.component_id}",
            )
    claimed = claim(view, ann)
    if claimed is not None:
        return claimed
    replaced: Record | None = None
    for other in view.matching(index.at(ann.role, str(ann.address)), ann.component_id):
        if other.status in HOLDS_SLOT:
            verdict = address_taken(view, ann, other, settings)
            if verdict is not None:
                return verdict
            replaced = other

    refusal = trust_refusal(view, ann, existing)
    if refusal is not None:
        return refusal
    gone = frozenset({replaced.component_id}) if replaced is not None else frozenset()
    verdict = check_role(view, ann, settings, gone)
    if verdict.kind is not DecisionKind.REGISTER:
        return _noting_replacement(verdict, replaced)
    return _noting_replacement(admit(view, ann, existing), replaced)


def _noting_replacement(decision: Decision, replaced: Record | None) -> Decision:
    if replaced is None or decision.kind not in (DecisionKind.REGISTER, DecisionKind.PENDING):
        return decision
    return replace(
        decision,
        reason=f"{decision.reason}; replaces {replaced.component_id} (silent at this address)",
        replaces=replaced.component_id,
    )


def _against_existing(
    existing: Record, ann: Announcement, fresh: bool, retry: bool
) -> Decision | None:
    """Rules for a component we already have a record of; None means decide afresh."""
    if existing.fingerprint != ann.fingerprint:
        return Decision(
            DecisionKind.REFUSE,
            "identity-conflict",
            f"id {ann.component_id} belongs to key {existing.fingerprint[:19]}…, "
            f"but was announced with key {ann.fingerprint[:19]}… from {ann.address}",
            event_only=True,
        )
    if existing.status in HOLDS_SLOT and (
        existing.role is not ann.role or existing.cluster != ann.cluster
    ):
        return Decision(
            DecisionKind.REFUSE,
            "changed-identity",
            f"registered as {existing.role.value} of cluster {existing.cluster}, now announced "
            f"as {ann.role.value} of cluster {ann.cluster}; deregister it first",
            event_only=True,
        )
    if existing.status is Status.REGISTERED:
        return Decision(DecisionKind.KEEP, "registered", existing.reason)
    if existing.status is Status.REJECTED:
        return Decision(DecisionKind.KEEP, "rejected", existing.reason)
    if existing.status is Status.AWAITING_KEY and not (existing.replaces and fresh):
        # (An admitted replacer is decided afresh when asked: the identity it would replace
        # may have been heard again before it proved its key.)
        return Decision(DecisionKind.KEEP, "awaiting-key", existing.reason)
    if existing.status is Status.REGISTERING:
        return Decision(DecisionKind.KEEP, "registering", existing.reason)
    if existing.status is Status.FAILED and not retry:
        return Decision(DecisionKind.KEEP, "retrying", existing.reason)
    if existing.status is Status.EXPIRED and not fresh:
        return Decision(DecisionKind.KEEP, "expired", existing.reason)
    return None


def _is_claimed(record: Record) -> bool:
    return record.status in HOLDS_SLOT or record.status is Status.PENDING
