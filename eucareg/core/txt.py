"""The TXT record of an eucareg announcement: how a component describes itself on the wire.

It keeps the keys of the Eucalyptus DNS-SD protocol (txtvers, protovers, eucavers, type) and adds
what registration needs. Decoding validates everything, because any host on the LAN can announce.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from eucareg.core.model import AnnouncedState, Announcement, IPAddress, Role

SERVICE_TYPE = "_eucalyptus._tcp.local."
TXT_VERSION = "1"
PROTOCOL_VERSION = "1"

COMPONENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{7,63}$")
CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TOKEN_ID_RE = re.compile(r"^[a-z0-9]{12}$")
PROOF_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


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
    token: tuple[str, int, str] | None = None,
) -> dict[str, str]:
    """Build the TXT key/value pairs a component publishes; `token` is (id, stamp, proof)."""
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
    if token is not None:
        txt["tok"], txt["tts"], txt["tproof"] = token[0], str(token[1]), token[2]
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


def decode(
    instance: str, txt: Mapping[str, str], addresses: tuple[str, ...] = ()
) -> Announcement | Rejected:
    """Turn a sighting's TXT data into an Announcement, or say precisely why not.

    Identity comes from `id` and `fp` only, never from the instance name (lesson L2), and the
    address only from `addr`, never from whatever A/AAAA records the responder offered (L3).
    When the responder's addresses are known, `addr` must be one of them: a TXT record copied
    to another host is refused as a replay.
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
    if addresses and str(address) not in {_plain(a) for a in addresses}:
        return Rejected(
            "replayed",
            f"addr={raw_address} is not an address of the announcing host "
            f"({', '.join(addresses)}); a copied announcement?",
        )
    api_port: int | None = None
    if "port" in txt:
        raw_port = txt["port"]
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            return Rejected("bad-txt", f"port={raw_port!r} is not a TCP port")
        api_port = int(raw_port)
    token = _token_fields(txt)
    if isinstance(token, Rejected):
        return token
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
        token_id=token[0] if token else None,
        token_stamp=token[1] if token else None,
        token_proof=token[2] if token else None,
    )


def _plain(address: str) -> str:
    """An address without its IPv6 scope ('fe80::1%eth0' -> 'fe80::1')."""
    return str(ipaddress.ip_address(address.split("%", 1)[0]))


def _token_fields(txt: Mapping[str, str]) -> tuple[str, int, str] | Rejected | None:
    present = [k for k in ("tok", "tts", "tproof") if k in txt]
    if not present:
        return None
    if len(present) != 3:
        return Rejected("bad-txt", "tok=, tts= and tproof= must come together")
    if not TOKEN_ID_RE.match(txt["tok"]):
        return Rejected("bad-txt", f"tok={txt['tok']!r} is not a token id")
    if not txt["tts"].isdigit():
        return Rejected("bad-txt", f"tts={txt['tts']!r} is not a time")
    if not PROOF_RE.match(txt["tproof"]):
        return Rejected("bad-txt", f"tproof={txt['tproof']!r} is not a token proof")
    return txt["tok"], int(txt["tts"]), txt["tproof"]
