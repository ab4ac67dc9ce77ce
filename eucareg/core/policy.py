"""The registration policy: a pure function from (records, live facts, announcement) to a decision.

It makes every consistency check of the design and nothing else: no I/O, no clock, no globals.
That is what lets the tests run every ordering and race against it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from eucareg.core.model import (
    HOLDS_SLOT,
    Announcement,
    Decision,
    DecisionKind,
    Record,
    Role,
    Status,
)
from eucareg.core.trust import Mode, Task, TokenVerdict, TrustSettings


@dataclass(frozen=True)
class RegistrarSettings:
    """What this registrar is responsible for; fixed for the life of the process."""

    # Roles this registrar registers: the CLC registers walrus/cc/sc, a CC registers nc.
    registers: frozenset[Role]
    # The cluster of the CC on this host, if any: a CC registers only its own cluster's NCs.
    own_cluster: str | None = None
    # The CLC watches NC announcements to flag those whose cluster has no registered CC (L4).
    observes_unmatched_nodes: bool = False


@dataclass(frozen=True)
class View:
    """Everything the policy may look at besides the announcement itself."""

    records: Mapping[str, Record]
    # Clusters whose registered CC currently announces "registered as FOO" (design: SC check).
    live_registered_clusters: frozenset[str]
    # Whether the CC on this host holds its own credentials (design: CC waits for itself).
    self_registered: bool
    # The operator's trust settings, the time, and the verdict on the announcement's token.
    trust: TrustSettings = field(default_factory=TrustSettings)
    now: float = 0.0
    token: TokenVerdict | None = None


def decide(
    view: View, ann: Announcement, settings: RegistrarSettings, *, fresh: bool = False
) -> Decision:
    """Decide what to do with one announcement.

    `fresh` is true when the component has just (re)appeared on the network rather than
    re-sent an announcement we already knew; only a fresh sighting revives an expired wait.
    """
    handles = ann.role in settings.registers and (
        ann.role is not Role.NC or ann.cluster == settings.own_cluster
    )
    if not handles:
        if ann.role is Role.NC and settings.observes_unmatched_nodes:
            return _observe_node(view, ann)
        return Decision(DecisionKind.IGNORE, "not-mine", "not registered by this registrar")

    existing = view.records.get(ann.component_id)
    if existing is not None:
        verdict = _against_existing(existing, ann, fresh)
        if verdict is not None:
            return verdict

    for other in _others(view.records, ann.component_id):
        if other.fingerprint == ann.fingerprint and _is_claimed(other):
            return _refuse(
                "key-in-use",
                f"key {ann.fingerprint[:19]}… already belongs to {other.component_id}",
            )
        if (
            other.role is ann.role
            and other.address == str(ann.address)
            and other.status in HOLDS_SLOT
        ):
            return _refuse(
                "address-in-use",
                f"address {ann.address} is already registered to {other.component_id}",
            )

    refusal = _trust_refusal(view, ann, existing)
    if refusal is not None:
        return refusal
    verdict = _check_role(view, ann, settings)
    if verdict.kind is not DecisionKind.REGISTER:
        return verdict
    return _admit(view, ann, existing)


def _trust_refusal(view: View, ann: Announcement, existing: Record | None) -> Decision | None:
    """The operator's switches and a bad token refuse before anything else is considered."""
    trust = view.trust
    if trust.mode is Mode.OFF:
        return _refuse("registration-off", "auto-registration is off (mode off)")
    task = Task.of(ann.role)
    if task in trust.locked:
        return _refuse(
            "locked", f"the {task.value} registration task is locked; no new registrations"
        )
    if ann.source == "fallback" and trust.mode is not Mode.ANY:
        return _refuse(
            "fallback-not-allowed",
            f"HTTP fallback registration from {ann.address} needs mode any (mode is "
            f"{trust.mode.value})",
        )
    approved = existing is not None and existing.approved
    if view.token is not None and not view.token.ok and not approved:
        return _refuse(view.token.code, view.token.reason)
    return None


def _admit(view: View, ann: Announcement, existing: Record | None) -> Decision:
    """A component that passed every check still needs a reason to be trusted (lesson L8)."""
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


def _against_existing(existing: Record, ann: Announcement, fresh: bool) -> Decision | None:
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
    if existing.status is Status.AWAITING_KEY:
        return Decision(DecisionKind.KEEP, "awaiting-key", existing.reason)
    if existing.status is Status.REGISTERING:
        return Decision(DecisionKind.KEEP, "registering", existing.reason)
    if existing.status is Status.FAILED:
        return Decision(DecisionKind.KEEP, "retrying", existing.reason)
    if existing.status is Status.EXPIRED and not fresh:
        return Decision(DecisionKind.KEEP, "expired", existing.reason)
    return None


def _check_role(view: View, ann: Announcement, settings: RegistrarSettings) -> Decision:
    """The design's per-role checks, applied to a component we may register."""
    others = list(_others(view.records, ann.component_id))
    if ann.role is Role.WALRUS:
        holder = _first(o for o in others if o.role is Role.WALRUS and o.status in HOLDS_SLOT)
        if holder is not None:
            return _refuse(
                "walrus-exists",
                f"the cloud already has a Walrus: {holder.component_id} at {holder.address}",
            )
    elif ann.role is Role.CC:
        holder = _first(
            o
            for o in others
            if o.role is Role.CC and o.cluster == ann.cluster and o.status in HOLDS_SLOT
        )
        if holder is not None:
            return _refuse(
                "cluster-name-taken",
                f"cluster name {ann.cluster} is taken by {holder.component_id} at {holder.address}",
            )
    elif ann.role is Role.SC:
        holder = _first(
            o
            for o in others
            if o.role is Role.SC and o.cluster == ann.cluster and o.status in HOLDS_SLOT
        )
        if holder is not None:
            return _refuse(
                "cluster-has-sc",
                f"cluster {ann.cluster} already has an SC: {holder.component_id} "
                f"at {holder.address}",
            )
        if ann.cluster not in view.live_registered_clusters:
            return Decision(
                DecisionKind.PENDING,
                "waiting-for-cluster",
                f"waiting for cluster {ann.cluster}'s CC to announce that it is registered",
                waiting_for=f"cluster {ann.cluster}",
            )
    elif ann.role is Role.NC and not view.self_registered:
        return Decision(
            DecisionKind.PENDING,
            "waiting-for-own-registration",
            f"this CC is not yet registered as {settings.own_cluster}",
            waiting_for=f"registration of CC {settings.own_cluster}",
        )
    return Decision(DecisionKind.REGISTER, "accepted", f"{ann.role.value} passes every check")


def _observe_node(view: View, ann: Announcement) -> Decision:
    """The CLC's watch for NCs whose cluster no registered CC serves (lesson L4)."""
    clusters = {
        r.cluster for r in view.records.values() if r.role is Role.CC and r.status in HOLDS_SLOT
    }
    existing = view.records.get(ann.component_id)
    if ann.cluster in clusters:
        if existing is not None and existing.status is Status.UNMATCHED:
            return Decision(
                DecisionKind.FORGET, "matched", f"cluster {ann.cluster} is now registered"
            )
        return Decision(DecisionKind.IGNORE, "not-mine", "registered by its cluster's CC")
    known = ", ".join(sorted(c for c in clusters if c)) or "none"
    return Decision(
        DecisionKind.UNMATCHED,
        "no-such-cluster",
        f"no registered CC has cluster {ann.cluster} (registered clusters: {known})",
    )


def _others(records: Mapping[str, Record], component_id: str) -> list[Record]:
    return [r for r in records.values() if r.component_id != component_id]


def _is_claimed(record: Record) -> bool:
    return record.status in HOLDS_SLOT or record.status is Status.PENDING


def _first(records: Iterable[Record]) -> Record | None:
    return next(iter(records), None)


def _refuse(code: str, reason: str) -> Decision:
    return Decision(DecisionKind.REFUSE, code, reason)
