"""A registrar greets newcomers: when a component it serves appears on the LAN, this host sends
its registrar's own announcement once more (at most once a second, RFC 6762 section 6), so the
newcomer finds its registrar at once, not after its first query's 20-120 ms delay (section 5.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from eucareg.core.model import Role
from eucareg.mdns.types import Change, Sighting

# Whom each role asks for its credentials.
SERVED_BY = {Role.WALRUS: Role.CLC, Role.CC: Role.CLC, Role.SC: Role.CLC, Role.NC: Role.CC}


@dataclass(frozen=True)
class Serving:
    """A registrar of this host that can serve now: its instance and, for a CC, its cluster."""

    instance: str
    cluster: str | None = None


def greeting_for(sighting: Sighting, serving: Mapping[Role, Serving]) -> str | None:
    """The instance to announce again because of `sighting`, or None.

    Only a newcomer (a service just added, not one changing) of a role one of our registrars
    serves, and for a CC only a node of its own cluster: nobody else would ask it."""
    if sighting.change is not Change.ADDED:
        return None
    try:
        role = Role.from_txt_type(sighting.txt.get("type", ""))
    except ValueError:
        return None
    registrar = SERVED_BY.get(role)
    ours = serving.get(registrar) if registrar is not None else None
    if ours is None or ours.instance == sighting.instance:
        return None
    if registrar is Role.CC and sighting.txt.get("cluster") != ours.cluster:
        return None
    return ours.instance
