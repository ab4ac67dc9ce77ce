"""Announcements that break the design's "only one" assumptions: a second CLC on the LAN, or
several CCs claiming one cluster. Pure (live announcements in, warnings out); the registrar's
status shows them, and the policy refuses the intruders (codes second-clc, cluster-taken).
"""

from __future__ import annotations

from collections.abc import Iterable

from eucareg.core.model import Announcement, Role


def rival_warnings(live: Iterable[Announcement], own_clc: str | None) -> list[str]:
    """One line per contradiction among the components heard now, in a stable order."""
    clcs: list[Announcement] = []
    claims: dict[str, list[Announcement]] = {}
    for ann in live:
        if ann.role is Role.CLC and ann.component_id != own_clc:
            clcs.append(ann)
        elif ann.role is Role.CC and ann.cluster is not None:
            claims.setdefault(ann.cluster, []).append(ann)
    out = [
        f"another CLC announces itself: {ann.component_id} at {ann.address} "
        f"(key {ann.fingerprint[:19]}…)"
        for ann in sorted(clcs, key=lambda a: a.component_id)
        if own_clc is not None
    ]
    for cluster, ccs in sorted(claims.items()):
        if len(ccs) > 1:
            who = ", ".join(f"{a.component_id} at {a.address}" for a in sorted(ccs, key=_id))
            out.append(f"{len(ccs)} CCs claim cluster {cluster}: {who}")
    return out


def _id(ann: Announcement) -> str:
    return ann.component_id
