"""Indexes over the registrar's records, so that the policy's checks (key in use, address in
use, the one Walrus, a cluster's CC and SC) look at the few records that matter instead of
scanning all of them: a decision costs the same with 10 records as with 10,000.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from eucareg.core.model import Record, Role

K = TypeVar("K", bound=Hashable)


class RecordIndex:
    """Component ids by fingerprint, by (role, address) and by (role, cluster).

    Membership does not depend on status: callers check the status of the few records a
    lookup returns. `update(old, new)` keeps it in step with one record's change."""

    def __init__(self, records: Iterable[Record] = ()) -> None:
        self._by_key: dict[str, set[str]] = {}
        self._by_address: dict[tuple[Role, str], set[str]] = {}
        self._by_cluster: dict[tuple[Role, str | None], set[str]] = {}
        for record in records:
            self.update(None, record)

    @classmethod
    def of(cls, records: Mapping[str, Record]) -> RecordIndex:
        return cls(records.values())

    def update(self, old: Record | None, new: Record | None) -> None:
        if old is not None:
            _drop(self._by_key, old.fingerprint, old.component_id)
            _drop(self._by_address, (old.role, old.address), old.component_id)
            _drop(self._by_cluster, (old.role, old.cluster), old.component_id)
        if new is not None:
            if new.fingerprint:  # an operator's registration may name no key: none in use
                self._by_key.setdefault(new.fingerprint, set()).add(new.component_id)
            self._by_address.setdefault((new.role, new.address), set()).add(new.component_id)
            self._by_cluster.setdefault((new.role, new.cluster), set()).add(new.component_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordIndex) and (
            self._by_key,
            self._by_address,
            self._by_cluster,
        ) == (other._by_key, other._by_address, other._by_cluster)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def with_key(self, fingerprint: str) -> frozenset[str]:
        return frozenset(self._by_key.get(fingerprint, ()))

    def at(self, role: Role, address: str) -> frozenset[str]:
        return frozenset(self._by_address.get((role, address), ()))

    def in_cluster(self, role: Role, cluster: str | None) -> frozenset[str]:
        return frozenset(self._by_cluster.get((role, cluster), ()))

    def clusters(self, role: Role) -> list[str | None]:
        """Every cluster some record of `role` names (a handful: one per cluster)."""
        return [cluster for (r, cluster) in self._by_cluster if r is role]


def _drop(index: dict[K, set[str]], key: K, component_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(component_id)
        if not ids:
            del index[key]
