"""What the policy decides from: this registrar's fixed settings, and a view of its records and
live facts that the registrar builds and the policy only reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field

from eucareg.core.grammar import IPNetwork
from eucareg.core.index import RecordIndex
from eucareg.core.model import Record, Role
from eucareg.core.trust import TokenVerdict, TrustSettings


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
