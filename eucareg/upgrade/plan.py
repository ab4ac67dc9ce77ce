"""The import plan, pure: which of the registrations a 1.6.2 front end lists this registrar
imports, which it already holds, which conflict with its records, and the transition that
records the imported ones as registered, claimable, with no hook. Also the cross-checks of the
listing against eucalyptus.conf, eucalyptus-ipaddr.conf and the key directory.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from eucareg.core import grammar
from eucareg.core.grammar import IPNetwork
from eucareg.core.index import RecordIndex
from eucareg.core.model import HOLDS_SLOT, Record, Role, Status
from eucareg.core.transitions import Effect, EffectKind, Transition, join, move

ADMITTED_BY = "imported"  # Record.admitted_by of an imported registration
# Components one import request may carry: at the longest (an IPv6 address, a 64-character
# cluster name, a key) 250 of them stay under the API's 64 KiB body limit. NCs are imported per
# cluster, on their CC, and a 1.6.2 cluster is far smaller.
MAX_IMPORT = 250


class Action(StrEnum):
    IMPORT = "import"  # recorded as registered, claimable, no hook
    REGISTERED = "already-registered"  # this registrar already holds it: nothing to do
    CONFLICT = "conflict"  # contradicts a record or another listed component: fix first
    REFUSED = "refused"  # never registrable as listed (a link-local address, …)
    ELSEWHERE = "elsewhere"  # another registrar's (an NC of another cluster's CC, …)


BLOCKING = frozenset({Action.CONFLICT, Action.REFUSED})


@dataclass(frozen=True)
class Candidate:
    role: Role
    cluster: str | None
    address: str
    where: str = ""  # FILE:LINE of the listing, for the operator
    # The eucareg key that alone may take it over (`eucareg import --fingerprints`); "" for
    # the first component that announces itself there and proves a key.
    fingerprint: str = ""


@dataclass(frozen=True)
class PlanRow:
    role: Role
    cluster: str | None
    address: str
    action: Action
    reason: str
    component_id: str | None = None  # the record it is (or becomes)
    where: str = ""
    fingerprint: str = ""

    def json(self) -> dict[str, str | None]:
        return {
            "role": self.role.value,
            "cluster": self.cluster,
            "address": self.address,
            "action": self.action.value,
            "reason": self.reason,
            "component_id": self.component_id,
            "where": self.where,
            "fingerprint": self.fingerprint or None,
        }


def what(role: Role, cluster: str | None, address: str) -> str:
    return f"{role.value}" + (f" of cluster {cluster}" if cluster else "") + f" at {address}"


def elsewhere(role: Role, cluster: str | None, registers: frozenset[Role], own: str | None) -> str:
    """Why this registrar does not register the component ("" when it does)."""
    if role is Role.NC and Role.NC in registers and cluster != own:
        return f"an NC of cluster {cluster}: run `eucareg import` on that cluster's CC"
    if role in registers:
        return ""
    if role is Role.NC:
        return f"an NC: run `eucareg import` on the CC of cluster {cluster}"
    return f"a {role.value}: run `eucareg import` on the CLC"


def classify(
    candidates: Sequence[Candidate],
    records: Mapping[str, Record],
    *,
    registers: frozenset[Role],
    own_cluster: str | None,
    allowed: Iterable[IPNetwork] = (),
    index: RecordIndex | None = None,
) -> list[PlanRow]:
    """Decide each candidate against the records and the other candidates, in order. The
    design's "only one" rules hold across both: one Walrus, one CC and one SC per cluster,
    one component of a role per address; an SC needs its cluster's CC."""
    index = index or RecordIndex.of(records)
    allowed = tuple(allowed)
    batch: list[PlanRow] = []
    for given in candidates:
        cand = replace(given, address=canonical(given.address))
        row = _classify(cand, records, index, batch, registers, own_cluster, allowed)
        batch.append(row)
    return batch


def _classify(
    cand: Candidate,
    records: Mapping[str, Record],
    index: RecordIndex,
    batch: Sequence[PlanRow],
    registers: frozenset[Role],
    own: str | None,
    allowed: tuple[IPNetwork, ...],
) -> PlanRow:
    def row(action: Action, reason: str, component_id: str | None = None) -> PlanRow:
        return PlanRow(
            cand.role,
            cand.cluster,
            cand.address,
            action,
            reason,
            component_id,
            cand.where,
            cand.fingerprint,
        )

    refusal = _refusal(cand, allowed)
    if refusal:
        return row(Action.REFUSED, refusal)
    away = elsewhere(cand.role, cand.cluster, registers, own)
    if away:
        return row(Action.ELSEWHERE, away)
    holders = [records[i] for i in sorted(index.at(cand.role, cand.address)) if i in records]
    for held in holders:
        if held.status is Status.REGISTERED and held.cluster == cand.cluster:
            return _already(cand, held, row)
    for held in holders:
        if held.status in HOLDS_SLOT:
            return row(Action.CONFLICT, _held(held, "this address"), held.component_id)
    keyed = _key_taken(cand, records, index, batch)
    if keyed:
        return row(Action.CONFLICT, keyed)
    clash = _slot_taken(cand, records, index)
    if clash is not None:
        return row(Action.CONFLICT, _held(clash, _slot(cand)), clash.component_id)
    for other in batch:
        if other.action not in (Action.IMPORT, Action.REGISTERED):
            continue
        if other.role is cand.role and (
            other.address == cand.address or _same_slot(cand, other.role, other.cluster)
        ):
            return row(
                Action.CONFLICT,
                f"{_slot(cand)} is listed twice: also "
                f"{what(other.role, other.cluster, other.address)} ({other.where})",
            )
    if cand.role is Role.SC and not _has_cc(cand.cluster, records, index, batch):
        return row(
            Action.CONFLICT,
            f"cluster {cand.cluster} has no CC, neither listed nor "
            "registered here; an SC needs its cluster's CC",
        )
    pinned = f"; only key {cand.fingerprint[:19]}… may take it over" if cand.fingerprint else ""
    return row(
        Action.IMPORT,
        f"to be recorded as registered (no hook runs){pinned}{_waiting(cand, holders)}",
    )


def _waiting(cand: Candidate, holders: Sequence[Record]) -> str:
    """Who already waits there and may take the import over at once: without a pin, the
    first of them to prove a key wins, so the operator is shown them before importing."""
    if cand.fingerprint:
        return ""
    ids = [
        h.component_id for h in holders if h.status is Status.PENDING and h.cluster == cand.cluster
    ]
    if not ids:
        return ""
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return (
        f"; {len(ids)} component(s) wait there now ({shown}): the first to prove its key "
        "takes it over (give --fingerprints to choose)"
    )


def _already(cand: Candidate, held: Record, row: Callable[..., PlanRow]) -> PlanRow:
    how = "imported" if held.admitted_by == ADMITTED_BY else "registered"
    pin = cand.fingerprint
    if pin and held.fingerprint and held.fingerprint != pin:
        return row(
            Action.CONFLICT,
            f"already {how} here as {held.component_id}, with key "
            f"{held.fingerprint[:19]}…, not the one given; deregister it if that key is "
            "not the component's",
            held.component_id,
        )
    if pin and not held.fingerprint:
        # The operator asked for a pin: leaving the record claimable by any key, and
        # answering as if all were done, would let it believe the pin holds.
        return row(
            Action.CONFLICT,
            f"already {how} here as {held.component_id} without a key, so any component "
            "there may take it over; the key given is not applied: deregister it and import "
            "again to pin it",
            held.component_id,
        )
    return row(Action.REGISTERED, f"already {how} here", held.component_id)


def _key_taken(
    cand: Candidate, records: Mapping[str, Record], index: RecordIndex, batch: Sequence[PlanRow]
) -> str:
    """A pinned key another record holds, or another listed component was given."""
    if not cand.fingerprint:
        return ""
    for component_id in sorted(index.with_key(cand.fingerprint)):
        held = records.get(component_id)
        if held is not None and held.status in HOLDS_SLOT:
            return f"key {cand.fingerprint[:19]}… already belongs to {component_id}"
    for other in batch:
        if other.fingerprint == cand.fingerprint and other.action is Action.IMPORT:
            return (
                f"key {cand.fingerprint[:19]}… is given twice: also for "
                f"{what(other.role, other.cluster, other.address)}"
            )
    return ""


def _refusal(cand: Candidate, allowed: tuple[IPNetwork, ...]) -> str:
    if cand.role is Role.CLC:
        return "the CLC is not registered: it is where registration happens"
    try:
        grammar.address(cand.address, "address", allowed)
    except grammar.Invalid as exc:
        return (
            f"{exc.args[0] if exc.args else exc}: never registered (lesson L3); register "
            "the component at its LAN address in Eucalyptus first"
        )
    if cand.role.needs_cluster and not (cand.cluster and grammar.CLUSTER.fullmatch(cand.cluster)):
        return f"a {cand.role.value} needs a valid cluster name"
    if not cand.role.needs_cluster and cand.cluster:
        return f"a {cand.role.value} has no cluster"
    if cand.fingerprint and not grammar.FINGERPRINT.fullmatch(cand.fingerprint):
        return "the key given is not a fingerprint (sha256: and 64 hex digits)"
    return ""


def _slot(cand: Candidate) -> str:
    if cand.role is Role.WALRUS:
        return "the Walrus"
    if cand.role in (Role.CC, Role.SC):
        return f"the {cand.role.value.upper()} of cluster {cand.cluster}"
    return f"NC address {cand.address}"


def _same_slot(cand: Candidate, role: Role, cluster: str | None) -> bool:
    return role is cand.role and (
        role is Role.WALRUS or (role in (Role.CC, Role.SC) and cluster == cand.cluster)
    )


def _slot_taken(
    cand: Candidate, records: Mapping[str, Record], index: RecordIndex
) -> Record | None:
    """Another record holding the one-of-a-kind slot the candidate would take."""
    if cand.role is Role.WALRUS:
        ids = index.in_cluster(Role.WALRUS, None)
    elif cand.role in (Role.CC, Role.SC):
        ids = index.in_cluster(cand.role, cand.cluster)
    else:
        return None
    for component_id in sorted(ids):
        held = records.get(component_id)
        if held is not None and held.status in HOLDS_SLOT and held.address != cand.address:
            return held
    return None


def _held(record: Record, slot: str) -> str:
    return (
        f"{slot} is held by {record.component_id} "
        f"({what(record.role, record.cluster, record.address)}, {record.status.value}); "
        "deregister it first if the listing is right"
    )


def _has_cc(
    cluster: str | None, records: Mapping[str, Record], index: RecordIndex, batch: Sequence[PlanRow]
) -> bool:
    if any(
        r.role is Role.CC
        and r.cluster == cluster
        and r.action in (Action.IMPORT, Action.REGISTERED)
        for r in batch
    ):
        return True
    return any(
        records[i].status in HOLDS_SLOT for i in index.in_cluster(Role.CC, cluster) if i in records
    )


# -- the write ----------------------------------------------------------------------------------


def imported(rows: Sequence[PlanRow], ids: Sequence[str], now: float, source: str) -> Transition:
    """Record the rows to import as registered, claimable, admitted by the import, with one
    `imported` event each; no hook runs (a hook runs only for a record entering
    `registering`). `ids` are the new records' ids, one per row. Components already waiting
    at those addresses are decided again: they may take their registration over now."""
    steps = []
    for row, component_id in zip(rows, ids, strict=True):
        who = (
            f"the component with key {row.fingerprint[:19]}… that announces itself"
            if row.fingerprint
            else "the first component to announce itself"
        )
        reason = (
            f"imported from Eucalyptus ({source}); {who} as {row.role.value} at {row.address} "
            "and proves its key takes it over"
        )
        record = Record(
            component_id=component_id,
            role=row.role,
            cluster=row.cluster,
            address=row.address,
            fingerprint=row.fingerprint,
            status=Status.REGISTERED,
            reason=reason,
            instance=f"imported:{row.address}",
            first_seen=now,
            updated_at=now,
            registered_at=now,
            admitted_by=ADMITTED_BY,
            claimable=True,
        )
        steps.append(move(None, record, now, ("imported", "imported", reason)))
    step = join(steps)
    return Transition(step.change, (*step.effects, Effect(EffectKind.RECONSIDER)))


def with_ids(rows: Sequence[PlanRow], ids: Iterable[str]) -> list[PlanRow]:
    """The rows, each row to import given its new id in turn."""
    fresh = iter(ids)
    return [replace(r, component_id=next(fresh)) if r.action is Action.IMPORT else r for r in rows]


def canonical(address: str) -> str:
    """An address as the registry writes it (ip_address's form), or as given if not one."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
