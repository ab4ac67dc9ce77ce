"""The operator's registrations (`eucareg register`, or `eucareg import`): one made by role and
address before the component is heard, and the component it was made for taking it over."""

from __future__ import annotations

from eucareg.core.model import HOLDS_SLOT, Announcement, Decision, DecisionKind, Record, Status
from eucareg.core.slots import check_role, refuse
from eucareg.core.view import RegistrarSettings, View

# How soon a component waiting for the operator's registration of its address looks again.
CLAIM_RECHECK = 2.0


def manual(view: View, ann: Announcement, settings: RegistrarSettings) -> Decision:
    """The operator registers a component by role and address before it is heard (`eucareg
    register`): the design's checks apply, trust does not (the operator is the trust), and
    what cannot be registered now is an answer to the operator, never a record."""
    index = view.indexed()
    key = ann.fingerprint
    holders = [
        *(view.matching(index.with_key(key), ann.component_id) if key else []),
        *view.matching(index.at(ann.role, str(ann.address)), ann.component_id),
    ]
    for other in holders:
        if other.status in HOLDS_SLOT:
            what = f"key {key[:19]}…" if other.fingerprint == key and key else str(ann.address)
            return _not_now("in-use", f"{what} already belongs to {other.component_id}")
    verdict = check_role(view, ann, settings, frozenset())
    if verdict.kind is not DecisionKind.REGISTER:
        return _not_now(verdict.code, verdict.reason)
    return Decision(
        DecisionKind.REGISTER,
        "registered-by-operator",
        f"{ann.role.value} passes every check; registered by the operator, for the first "
        f"component to announce itself at {ann.address}"
        + (f" with key {key[:19]}…" if key else ""),
        admitted_by="manual",
    )


def _not_now(code: str, reason: str) -> Decision:
    return Decision(DecisionKind.REFUSE, code, reason, event_only=True)


def claims(ann: Announcement, record: Record) -> bool:
    """Whether `ann` is what the operator's registration `record` waits for."""
    return (
        record.claimable
        and record.role is ann.role
        and record.address == str(ann.address)
        and record.cluster == ann.cluster
        and record.fingerprint in ("", ann.fingerprint)
    )


def claim(view: View, ann: Announcement) -> Decision | None:
    """An operator's registration made for this role and address (`eucareg register`): the
    component it was made for takes it over (None: there is none)."""
    index = view.indexed()
    for other in view.matching(index.at(ann.role, str(ann.address)), ann.component_id):
        if not other.claimable or other.status not in (*HOLDS_SLOT, Status.FAILED):
            continue
        if other.cluster != ann.cluster or other.fingerprint not in ("", ann.fingerprint):
            named = f"cluster {other.cluster}" if other.cluster != ann.cluster else "another key"
            who = "eucareg import" if other.admitted_by == "imported" else "the operator"
            return refuse(
                "address-in-use",
                f"{who} registered {ann.role.value} {other.component_id} at "
                f"{ann.address} for {named}",
            )
        if other.status is Status.REGISTERED:
            # An imported registration (`eucareg import`) is taken over like a manual one.
            made = (
                "imported from Eucalyptus"
                if other.admitted_by == "imported"
                else "the operator made"
            )
            return Decision(
                DecisionKind.ADOPT,
                "adopted",
                f"takes over the registration {made} for {ann.role.value} at "
                f"{ann.address} ({other.component_id})",
                replaces=other.component_id,
                admitted_by=other.admitted_by or "manual",
            )
        return Decision(
            DecisionKind.PENDING,
            "registration-running",
            f"the operator's registration of {ann.address} ({other.component_id}) is not done",
            waiting_for=f"{other.component_id} to be registered",
            recheck_at=view.now + CLAIM_RECHECK,
        )
    return None
