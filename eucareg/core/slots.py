"""The design's checks of who holds what: one Walrus, one CC per cluster name, one SC per
cluster, one component per address (a silent holder may be replaced), and the CLC's watch for
NCs whose cluster no registered CC serves."""

from __future__ import annotations

from collections.abc import Iterable

from eucareg.core.model import (
    HOLDS_SLOT,
    Announcement,
    Decision,
    DecisionKind,
    Record,
    Role,
    Status,
)
from eucareg.core.view import RegistrarSettings, View


def check_role(
    view: View, ann: Announcement, settings: RegistrarSettings, gone: frozenset[str]
) -> Decision:
    """The design's per-role checks, applied to a component we may register; `gone` are
    records this component replaces, which hold no slot against it."""
    if ann.role is Role.WALRUS:
        holder = _slot_holder(view, ann, Role.WALRUS, None, gone)
        if holder is not None:
            return refuse(
                "walrus-exists",
                f"the cloud already has a Walrus: {holder.component_id} at {holder.address}",
            )
    elif ann.role is Role.CC:
        holder = _slot_holder(view, ann, Role.CC, ann.cluster, gone)
        if holder is not None:
            return refuse(
                "cluster-name-taken",
                f"cluster name {ann.cluster} is taken by {holder.component_id} at {holder.address}",
            )
    elif ann.role is Role.SC:
        holder = _slot_holder(view, ann, Role.SC, ann.cluster, gone)
        if holder is not None:
            return refuse(
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


def observe_node(view: View, ann: Announcement) -> Decision:
    """The CLC's watch for NCs whose cluster no registered CC serves (lesson L4)."""
    index = view.indexed()
    clusters = {
        cluster
        for cluster in index.clusters(Role.CC)
        if any(
            r.status in HOLDS_SLOT for r in view.matching(index.in_cluster(Role.CC, cluster), "")
        )
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


def _slot_holder(
    view: View, ann: Announcement, role: Role, cluster: str | None, gone: frozenset[str]
) -> Record | None:
    """The component holding the one `role` slot of `cluster` (the Walrus, a CC, an SC), if
    any, other than `ann` itself and the records it replaces (`gone`)."""
    ids = view.indexed().in_cluster(role, cluster) - gone
    return _first(o for o in view.matching(ids, ann.component_id) if o.status in HOLDS_SLOT)


def _first(records: Iterable[Record]) -> Record | None:
    return next(iter(records), None)


def address_taken(
    view: View, ann: Announcement, holder: Record, settings: RegistrarSettings
) -> Decision | None:
    """Another component holds this address. A reinstalled machine comes back with a new
    identity at the same address: once the holder has been silent long enough, the newcomer
    may replace it (None); until then it waits, and while the holder is heard it is refused."""
    silent = view.silent_for(holder.component_id)
    if silent is None:
        return refuse(
            "address-in-use",
            f"address {ann.address} is already registered to {holder.component_id}",
        )
    if silent < settings.replace_after:
        left = settings.replace_after - silent
        return Decision(
            DecisionKind.PENDING,
            "address-held",
            # No running countdown in the reason: a reason that changes at every re-decision
            # would write a new record and event each time (and push its expiry forward).
            f"address {ann.address} belongs to {holder.component_id}, which is silent; it may be "
            f"replaced after {settings.replace_after:g}s of silence",
            waiting_for=f"{holder.component_id} to stay silent",
            recheck_at=view.now + left,
        )
    return None


def refuse(code: str, reason: str) -> Decision:
    return Decision(DecisionKind.REFUSE, code, reason)
