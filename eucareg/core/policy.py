"""The registration policy: a pure function from (records, live facts, announcement) to a decision.

It makes every consistency check of the design and nothing else: no I/O, no clock, no globals.
That is what lets the tests run every ordering and race against it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field, replace

from eucareg.core.grammar import IPNetwork
from eucareg.core.index import RecordIndex
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
    # A component silent on every source this long may be replaced by a newcomer at its
    # address (a reinstalled machine comes back with a new identity).
    replace_after: float = 600.0
    # Records of components nobody admitted (pending, refused, unmatched, expired) kept at
    # most; past it, an unauthenticated newcomer is refused `pending-full` and not stored.
    max_unadmitted: int = 5000
    # Address ranges the site admits besides the private ones and global unicast.
    allowed_ranges: tuple[IPNetwork, ...] = ()
    # The id of the CLC on this host, if any: another CLC announcing itself is reported.
    own_clc: str | None = None


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
    # Components heard now (mDNS or HTTP), and when the others were last heard; a component
    # not heard since the registrar started counts as heard at `seen_floor`.
    online: Set[str] = frozenset()
    last_seen: Mapping[str, float] = field(default_factory=dict)
    seen_floor: float = 0.0
    unadmitted: int = 0  # records of components nobody admitted (see max_unadmitted)
    # The registrar keeps this in step with `records`; a View built without one (tests)
    # indexes its records when first asked.
    index: RecordIndex | None = None

    def indexed(self) -> RecordIndex:
        if self.index is None:
            object.__setattr__(self, "index", RecordIndex.of(self.records))
        assert self.index is not None
        return self.index

    def matching(self, ids: Iterable[str], but: str) -> list[Record]:
        """The records of `ids` except `but`'s, in a stable order."""
        return [self.records[i] for i in sorted(ids) if i != but and i in self.records]

    def silent_for(self, component_id: str) -> float | None:
        """Seconds the component has been silent on every source; None while it is heard."""
        if component_id in self.online:
            return None
        return max(0.0, self.now - self.last_seen.get(component_id, self.seen_floor))


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


# How soon a component waiting for the operator's registration of its address looks again.
CLAIM_RECHECK = 2.0

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
            return _observe_node(view, ann)
        if ann.role is Role.CLC and settings.own_clc not in (None, ann.component_id):
            # The design assumes one CLC per LAN; a second one splits the cloud (or is a rogue).
            return replace(
                _refuse(
                    "second-clc",
                    f"another CLC announces itself at {ann.address} (key "
                    f"{ann.fingerprint[:19]}…): a cloud has one CLC; components pinned to ours "
                    "refuse it",
                ),
                event_only=True,  # an event and a status warning, never a record
            )
        return Decision(DecisionKind.IGNORE, "not-mine", "not registered by this registrar")

    if ann.source == "manual":
        return _manual(view, ann, settings)
    existing = view.records.get(ann.component_id)
    if existing is not None:
        verdict = _against_existing(existing, ann, fresh, retry)
        if verdict is not None:
            return verdict
    index = view.indexed()
    for other in view.matching(index.with_key(ann.fingerprint), ann.component_id):
        # (An operator's registration names the key it waits for: no use of it, for the
        # component it waits for.)
        if _is_claimed(other) and not _claims(ann, other):
            return _refuse(
                "key-in-use",
                f"key {ann.fingerprint[:19]}… already belongs to {other.component_id}",
            )
    claim = _claim(view, ann)
    if claim is not None:
        return claim
    replaced: Record | None = None
    for other in view.matching(index.at(ann.role, str(ann.address)), ann.component_id):
        if other.status in HOLDS_SLOT:
            verdict = _address_taken(view, ann, other, settings)
            if verdict is not None:
                return verdict
            replaced = other

    refusal = _trust_refusal(view, ann, existing)
    if refusal is not None:
        return refusal
    gone = frozenset({replaced.component_id}) if replaced is not None else frozenset()
    verdict = _check_role(view, ann, settings, gone)
    if verdict.kind is not DecisionKind.REGISTER:
        return _noting_replacement(verdict, replaced)
    return _noting_replacement(_admit(view, ann, existing), replaced)


def _manual(view: View, ann: Announcement, settings: RegistrarSettings) -> Decision:
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
    verdict = _check_role(view, ann, settings, frozenset())
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


def _claims(ann: Announcement, record: Record) -> bool:
    """Whether `ann` is what the operator's registration `record` waits for."""
    return (
        record.claimable
        and record.role is ann.role
        and record.address == str(ann.address)
        and record.cluster == ann.cluster
        and record.fingerprint in ("", ann.fingerprint)
    )


def _claim(view: View, ann: Announcement) -> Decision | None:
    """An operator's registration made for this role and address (`eucareg register`): the
    component it was made for takes it over (None: there is none)."""
    index = view.indexed()
    for other in view.matching(index.at(ann.role, str(ann.address)), ann.component_id):
        if not other.claimable or other.status not in (*HOLDS_SLOT, Status.FAILED):
            continue
        if other.cluster != ann.cluster or other.fingerprint not in ("", ann.fingerprint):
            named = f"cluster {other.cluster}" if other.cluster != ann.cluster else "another key"
            who = "eucareg import" if other.admitted_by == "imported" else "the operator"
            return _refuse(
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


def _address_taken(
    view: View, ann: Announcement, holder: Record, settings: RegistrarSettings
) -> Decision | None:
    """Another component holds this address. A reinstalled machine comes back with a new
    identity at the same address: once the holder has been silent long enough, the newcomer
    may replace it (None); until then it waits, and while the holder is heard it is refused."""
    silent = view.silent_for(holder.component_id)
    if silent is None:
        return _refuse(
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


def _noting_replacement(decision: Decision, replaced: Record | None) -> Decision:
    if replaced is None or decision.kind not in (DecisionKind.REGISTER, DecisionKind.PENDING):
        return decision
    return replace(
        decision,
        reason=f"{decision.reason}; replaces {replaced.component_id} (silent at this address)",
        replaces=replaced.component_id,
    )


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
    token_ok = view.token is not None and view.token.ok
    approved = existing is not None and (existing.approved or _retrying(existing))
    if view.token is not None and not view.token.ok and not approved:
        # Said first: "needs mode any" would send the operator to weaken the mode, when it
        # is the token (revoked, used up, for another role) that is wrong.
        return _refuse(view.token.code, view.token.reason)
    if ann.source == "fallback" and trust.mode is not Mode.ANY and not token_ok:
        return _refuse(
            "fallback-not-allowed",
            f"HTTP registration from {ann.address} without a join token needs mode any "
            f"(mode is {trust.mode.value})",
        )
    return None


def _retrying(record: Record) -> bool:
    """A component admitted earlier whose hook failed: its admission still stands."""
    return record.status is Status.FAILED and bool(record.admitted_by)


def _admit(view: View, ann: Announcement, existing: Record | None) -> Decision:
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


def _check_role(
    view: View, ann: Announcement, settings: RegistrarSettings, gone: frozenset[str]
) -> Decision:
    """The design's per-role checks, applied to a component we may register; `gone` are
    records this component replaces, which hold no slot against it."""
    if ann.role is Role.WALRUS:
        holder = _slot_holder(view, ann, Role.WALRUS, None, gone)
        if holder is not None:
            return _refuse(
                "walrus-exists",
                f"the cloud already has a Walrus: {holder.component_id} at {holder.address}",
            )
    elif ann.role is Role.CC:
        holder = _slot_holder(view, ann, Role.CC, ann.cluster, gone)
        if holder is not None:
            return _refuse(
                "cluster-name-taken",
                f"cluster name {ann.cluster} is taken by {holder.component_id} at {holder.address}",
            )
    elif ann.role is Role.SC:
        holder = _slot_holder(view, ann, Role.SC, ann.cluster, gone)
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


def _is_claimed(record: Record) -> bool:
    return record.status in HOLDS_SLOT or record.status is Status.PENDING


def _slot_holder(
    view: View, ann: Announcement, role: Role, cluster: str | None, gone: frozenset[str]
) -> Record | None:
    """The component holding the one `role` slot of `cluster` (the Walrus, a CC, an SC), if
    any, other than `ann` itself and the records it replaces (`gone`)."""
    ids = view.indexed().in_cluster(role, cluster) - gone
    return _first(o for o in view.matching(ids, ann.component_id) if o.status in HOLDS_SLOT)


def _first(records: Iterable[Record]) -> Record | None:
    return next(iter(records), None)


def _refuse(code: str, reason: str) -> Decision:
    return Decision(DecisionKind.REFUSE, code, reason)
