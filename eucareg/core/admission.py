"""Trust: the operator's switches and a bad token refuse a component first, and one that passes
the design's checks still needs a reason to be trusted (a token, an approval, an install window)."""

from __future__ import annotations

from eucareg.core.model import Announcement, Decision, DecisionKind, Record, Status
from eucareg.core.slots import refuse
from eucareg.core.trust import Mode, Task
from eucareg.core.view import View


def trust_refusal(view: View, ann: Announcement, existing: Record | None) -> Decision | None:
    """The operator's switches and a bad token refuse before anything else is considered."""
    trust = view.trust
    if trust.mode is Mode.OFF:
        return refuse("registration-off", "auto-registration is off (mode off)")
    task = Task.of(ann.role)
    if task in trust.locked:
        return refuse(
            "locked", f"the {task.value} registration task is locked; no new registrations"
        )
    token_ok = view.token is not None and view.token.ok
    approved = existing is not None and (existing.approved or _retrying(existing))
    if view.token is not None and not view.token.ok and not approved:
        # Said first: "needs mode any" would send the operator to weaken the mode, when it
        # is the token (revoked, used up, for another role) that is wrong.
        return refuse(view.token.code, view.token.reason)
    if ann.source == "fallback" and trust.mode is not Mode.ANY and not token_ok:
        return refuse(
            "fallback-not-allowed",
            f"HTTP registration from {ann.address} without a join token needs mode any "
            f"(mode is {trust.mode.value})",
        )
    return None


def _retrying(record: Record) -> bool:
    """A component admitted earlier whose hook failed: its admission still stands."""
    return record.status is Status.FAILED and bool(record.admitted_by)


def admit(view: View, ann: Announcement, existing: Record | None) -> Decision:
    """A component that passed every check still needs a reason to be trusted (lesson L8)."""
    if existing is not None and _retrying(existing):
        return Decision(
            DecisionKind.REGISTER,
            "accepted",
            f"{ann.role.value} passes every check; retrying (admitted by {existing.admitted_by})",
            admitted_by=existing.admitted_by,
        )
    if view.token is not None and view.token.ok:
        return Decision(
            DecisionKind.REGISTER,
            "accepted",
            f"{ann.role.value} passes every check; {view.token.reason}",
            admitted_by=f"token:{ann.token_id}",
        )
    if existing is not None and existing.approved:
        return Decision(
            DecisionKind.REGISTER,
            "accepted",
            f"{ann.role.value} passes every check; approved by the operator",
            admitted_by="approval",
        )
    if view.trust.install_open(view.now):
        return Decision(
            DecisionKind.REGISTER,
            "accepted",
            f"{ann.role.value} passes every check; install window open",
            admitted_by="install-window",
        )
    return Decision(
        DecisionKind.PENDING,
        "awaiting-approval",
        f"no join token and no install window: waiting for the operator to approve key "
        f"{ann.fingerprint}",
        waiting_for="operator approval",
    )
