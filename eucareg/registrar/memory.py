"""The registrar's state in memory, kept in step with the store: decisions read only this.

`apply` interprets a transition's Write exactly as the store does, so memory and database
never disagree about what a committed transition means.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from eucareg.core.index import RecordIndex
from eucareg.core.model import UNADMITTED, IssuedCertificate, Record
from eucareg.core.transitions import TokenChange, Write
from eucareg.core.trust import Token, TrustSettings
from eucareg.store.registry import Snapshot


@dataclass
class Memory:
    records: dict[str, Record]
    tokens: dict[str, Token]
    trust: TrustSettings
    certificates: dict[str, IssuedCertificate]
    revoked: set[str]
    # How many records are UNADMITTED (kept in step by apply; the policy caps it).
    unadmitted: int = field(init=False, default=0)
    # The records by key, address and cluster (kept in step by apply; the policy's checks).
    index: RecordIndex = field(init=False)

    def __post_init__(self) -> None:
        self.unadmitted = sum(r.status in UNADMITTED for r in self.records.values())
        self.index = RecordIndex.of(self.records)

    def _put(self, record: Record | None, new: Record | None) -> None:
        self.unadmitted += (new is not None and new.status in UNADMITTED) - (
            record is not None and record.status in UNADMITTED
        )
        self.index.update(record, new)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> Memory:
        return cls(snap.records, snap.tokens, snap.trust, snap.certificates, snap.revoked)

    def apply(self, change: Write) -> None:
        for record in change.records:
            self._put(self.records.get(record.component_id), record)
            self.records[record.component_id] = record
        for component_id in change.revoke:
            cert = self.certificates.pop(component_id, None)
            if cert is not None:
                self.revoked.add(cert.serial)
        for component_id in change.deleted:
            self._put(self.records.pop(component_id, None), None)
            self.certificates.pop(component_id, None)
        for cert in change.certificates:
            self.certificates[cert.component_id] = cert
        for token in change.tokens:
            old = self.tokens.get(token.token_id)
            kept = (
                token if old is None else replace(token, used_by=old.used_by, spent_by=old.spent_by)
            )
            self.tokens[token.token_id] = kept
        for use in change.token_uses:
            held = self.tokens.get(use.token_id)
            if held is None:
                continue
            used, spent = set(held.used_by), set(held.spent_by)
            used.discard(use.component_id)
            if use.change is TokenChange.RESERVE:
                used.add(use.component_id)
            elif use.change is TokenChange.SPEND:
                spent.add(use.component_id)
            self.tokens[use.token_id] = replace(
                held, used_by=frozenset(used), spent_by=frozenset(spent)
            )
        if change.trust is not None:
            self.trust = change.trust
