"""The TXT record of an eucareg announcement: how a component describes itself on the wire.

It keeps the keys of the Eucalyptus DNS-SD protocol (txtvers, protovers, eucavers, type) and adds
what registration needs. Decoding validates everything, because any host on the LAN can announce.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from eucareg.model import AnnouncedState, Announcement, IPAddress, Role

SERVICE_TYPE = "_eucalyptus._tcp.local."
TXT_VERSION = "1"
PROTOCOL_VERSION = "1"

COMPONENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{7,63}$")
CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Rejected:
    """A sighting that cannot be an announcement; the reason names the offending key."""

    code: str
    reason: str


def encode(
    *,
    role: Role,
    component_id: str,
    cluster: str | None,
    state: AnnouncedState,
    address: IPAddress,
    fingerprint: str,
    api_port: int | None,
    eucavers: str,
) -> dict[str, str]:
    """Build the TXT key/value pairs a component publishes."""
    txt = {
        "txtvers": TXT_VERSION,
        "protovers": PROTOCOL_VERSION,
        "eucavers": eucavers,
        "type": role.txt_type,
        "state": state.value,
        "addr": str(address),
        "id": component_id,
        "fp": fingerprint,
    }
    if cluster is not None:
        txt["cluster"] = cluster
    if api_port is not None:
        txt["port"] = str(api_port)
    return txt


def address_problem(address: IPAddress) -> str | None:
    """Why an address must never be registered, or None when it is usable (lesson L3)."""
    if address.is_loopback:
        return "is a loopback address"
    if address.is_link_local:
        return "is a link-local address"
    if address.is_unspecified:
        return "is the unspecified address"
    if address.is_multicast:
        return "is a multicast address"
    return None


def decode(instance: str, txt: Mapping[str, str]) -> Announcement | Rejected:
    """Turn a sighting's TXT data into an Announcement, or say precisely why not.

    Identity comes from `id` and `fp` only, never from the instance name (lesson L2), and the
    address only from `addr`, never from whatever A/AAAA records the responder offered (L3).
    """
    if txt.get("txtvers") != TXT_VERSION:
        return Rejected("bad-txt", f"txtvers={txt.get('txtvers')!r}, expected {TXT_VERSION!r}")
    if txt.get("protovers") != PROTOCOL_VERSION:
        return Rejected(
            "bad-txt", f"protovers={txt.get('protovers')!r}, expected {PROTOCOL_VERSION!r}"
        )
    try:
        role = Role.from_txt_type(txt.get("type", ""))
    except ValueError:
        return Rejected("bad-txt", f"type={txt.get('type')!r} is not a component type")
    component_id = txt.get("id", "")
    if not COMPONENT_ID_RE.match(component_id):
        return Rejected("bad-txt", f"id={component_id!r} is not a component id")
    fingerprint = txt.get("fp", "")
    if not FINGERPRINT_RE.match(fingerprint):
        return Rejected("bad-txt", f"fp={fingerprint!r} is not a sha256 key fingerprint")
    cluster = txt.get("cluster")
    if role.needs_cluster:
        if cluster is None:
            return Rejected("bad-txt", f"a {role.txt_type} announcement needs cluster=")
        if not CLUSTER_RE.match(cluster):
            return Rejected("bad-txt", f"cluster={cluster!r} is not a cluster name")
    else:
        cluster = None
    try:
        state = AnnouncedState(txt.get("state", ""))
    except ValueError:
        return Rejected("bad-txt", f"state={txt.get('state')!r} is not ready|registered")
    raw_address = txt.get("addr")
    if not raw_address:
        return Rejected("no-address", "no addr= preferred address; refusing to guess one")
    try:
        address = ipaddress.ip_address(raw_address)
    except ValueError:
        return Rejected("bad-address", f"addr={raw_address!r} is not an IP address")
    problem = address_problem(address)
    if problem is not None:
        return Rejected("bad-address", f"addr={raw_address} {problem}")
    api_port: int | None = None
    if "port" in txt:
        raw_port = txt["port"]
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            return Rejected("bad-txt", f"port={raw_port!r} is not a TCP port")
        api_port = int(raw_port)
    return Announcement(
        role=role,
        component_id=component_id,
        cluster=cluster,
        state=state,
        address=address,
        fingerprint=fingerprint,
        api_port=api_port,
        eucavers=txt.get("eucavers", ""),
        instance=instance,
    )
