"""Announcements of the Eucalyptus releases before eucareg: Ubuntu 9.10 published only its
cluster controller, as `Eucalyptus cluster controller`; 10.04 published every component under
names such as `Walrus`, `cluster1`, `cluster1 storage` and `cluster1 node`, with the TXT keys
txtvers, protovers, eucavers and type. Pure and standard library only: a sighting that
`txt.decode` rejected in, a LegacyComponent or None out. The registrar reports what this
recognises and registers none of it (docs/mdns.md, "Legacy announcements").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CC_9_10 = "Eucalyptus cluster controller"
LEGACY_KEYS = ("txtvers", "protovers", "eucavers", "type")
# Keys only eucareg announces. A record with any of them is an eucareg announcement, however
# broken (a bad fp=, no id=): it stays rejected with decode's reason, never called legacy.
EUCAREG_KEYS = frozenset({"id", "fp", "state", "addr", "tok", "tts", "tproof"})
# The 10.04 `type=` values and the role each names (eucareg's Role values; this module
# imports nothing of eucareg's, a unit test checks they agree).
ROLES = {"cloud": "clc", "walrus": "walrus", "cluster": "cc", "storage": "sc", "node": "nc"}
# Where a 10.04 instance name carries the cluster: `<cluster>`, `<cluster> storage`,
# `<cluster> node`. The CLC and Walrus names carry none.
NAME_SUFFIX = {"cluster": "", "storage": " storage", "node": " node"}

# avahi's rename on a collision: "cluster1 node" -> "cluster1 node #2".
_RENAMED = re.compile(r"(.+?) #[0-9]{1,6}", re.ASCII)
_CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)  # grammar.CLUSTER
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}", re.ASCII)  # grammar.VERSION
_SMALL_NUMBER = re.compile(r"[0-9]{1,3}", re.ASCII)
MAX_INSTANCE = 255  # shown in events and status; a DNS label is at most 63 bytes anyway


@dataclass(frozen=True)
class LegacyComponent:
    """A pre-eucareg Eucalyptus component heard on the LAN. `kind` is the release ("9.10" or
    "10.04"); `cluster` comes from the instance name, where 10.04 put it (None when the name
    does not say); `address` is the responder's, for the operator only ("" when none)."""

    kind: str
    role: str
    cluster: str | None
    address: str
    eucavers: str | None
    instance: str

    @property
    def code(self) -> str:
        """The code of the registrar's `legacy` event: legacy-9.10 or legacy-10.04."""
        return f"legacy-{self.kind}"


def classify(
    instance: str, txt: Mapping[str, str], addresses: Iterable[str] = ()
) -> LegacyComponent | None:
    """The legacy component a rejected sighting is, or None when it is not one.

    Strict on purpose: a record with any eucareg-only key is not legacy, and a 10.04 record
    needs all four 10.04 keys with a known `type=`. Nothing here is trusted; it is shown.
    """
    if len(instance) > MAX_INSTANCE or EUCAREG_KEYS.intersection(txt):
        return None
    name = _unrenamed(instance)
    address = _address(addresses)
    eucavers = _eucavers(txt.get("eucavers"))
    if name == CC_9_10:
        # 9.10 had one cluster, on the CLC's host; its name carries none, its TXT may be empty.
        return LegacyComponent("9.10", "cc", None, address, eucavers, instance)
    if not all(key in txt for key in LEGACY_KEYS):
        return None
    if not (_SMALL_NUMBER.fullmatch(txt["txtvers"]) and _SMALL_NUMBER.fullmatch(txt["protovers"])):
        return None
    txt_type = txt["type"]
    role = ROLES.get(txt_type)
    if role is None:
        return None
    return LegacyComponent("10.04", role, _cluster(txt_type, name), address, eucavers, instance)


def reason(component: LegacyComponent) -> str:
    """The event's reason: what was heard, and what the operator can do about it."""
    where = f" of cluster {component.cluster}" if component.cluster else ""
    at = f" at {component.address}" if component.address else ""
    version = f" (eucavers {component.eucavers})" if component.eucavers else ""
    return (
        f"announcement {component.instance!r}: a Eucalyptus {component.kind} "
        f"{component.role}{where}{at}{version} announces itself the old way; it is not "
        "registered by eucareg: import what the old front end registered (eucareg import, "
        "docs/upgrade.md), then install eucareg there: it takes its registration over"
    )


def _unrenamed(instance: str) -> str:
    """The instance name without avahi's collision suffix (` #2`)."""
    renamed = _RENAMED.fullmatch(instance)
    return renamed.group(1) if renamed else instance


def _cluster(txt_type: str, name: str) -> str | None:
    suffix = NAME_SUFFIX.get(txt_type)
    if suffix is None or not name.endswith(suffix):
        return None
    cluster = name[: len(name) - len(suffix)]
    return cluster if _CLUSTER.fullmatch(cluster) else None


def _eucavers(value: str | None) -> str | None:
    return value if value is not None and _VERSION.fullmatch(value) else None


def _address(addresses: Iterable[str]) -> str:
    """The responder's first usable address, IPv4 first, without an IPv6 scope."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in addresses:
        try:
            found.append(ipaddress.ip_address(raw.split("%", 1)[0]))
        except ValueError:
            continue
    usable = [a for a in found if not (a.is_loopback or a.is_unspecified or a.is_multicast)]
    usable.sort(key=lambda a: (a.version, a.is_link_local))
    return str(usable[0]) if usable else ""
