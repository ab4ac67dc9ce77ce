"""The TXT record of an eucareg announcement: how a component describes itself on the wire.

It keeps the keys of the Eucalyptus DNS-SD protocol (txtvers, protovers, eucavers, type) and adds
what registration needs. Decoding validates everything, because any host on the LAN can announce.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from eucareg.core import grammar
from eucareg.core.grammar import Invalid, IPNetwork
from eucareg.core.model import AnnouncedState, Announcement, IPAddress, Role

SERVICE_TYPE = "_eucalyptus._tcp.local."
TXT_VERSION = "1"
PROTOCOL_VERSION = "1"

# A TXT record is at most a few hundred bytes; anything this long is not one of ours.
MAX_TXT_VALUE = 255


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


def address_problem(address: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why an address must never be registered, or None when it is usable (lesson L3)."""
    return grammar.address_problem(address, allowed)


def decode(
    instance: str,
    txt: Mapping[str, str],
    addresses: tuple[str, ...] = (),
    allowed: Iterable[IPNetwork] = (),
) -> Announcement | Rejected:
    """Turn a sighting's TXT data into an Announcement, or say precisely why not.

    Identity comes from `id` and `fp` only, never from the instance name (lesson L2), and the
    address only from `addr`, never from whatever A/AAAA records the responder offered (L3).
    When the responder's addresses are known, `addr` must be one of them: a TXT record copied
    to another host is refused as a replay. `allowed` is the site's address allow-list.
    """
    if txt.get("txtvers") != TXT_VERSION:
        return Rejected(
            "bad-txt", f"txtvers={_shown(txt.get('txtvers'))}, expected {TXT_VERSION!r}"
        )
    if txt.get("protovers") != PROTOCOL_VERSION:
        return Rejected(
            "bad-txt", f"protovers={_shown(txt.get('protovers'))}, expected {PROTOCOL_VERSION!r}"
        )
    too_long = [k for k, v in txt.items() if len(v) > MAX_TXT_VALUE]
    if too_long:
        return Rejected("bad-txt", f"{_shown(too_long[0])}= is longer than {MAX_TXT_VALUE}")
    try:
        role = Role.from_txt_type(txt.get("type", ""))
    except ValueError:
        return Rejected("bad-txt", f"type={_shown(txt.get('type'))} is not a component type")
    try:
        component_id, fingerprint, cluster, state, api_port, eucavers, token = _fields(role, txt)
    except Invalid as exc:
        return Rejected("bad-txt", _say(exc))
    raw_address = txt.get("addr")
    if not raw_address:
        return Rejected("no-address", "no addr= preferred address; refusing to guess one")
    try:
        address = grammar.address(raw_address, "addr", allowed)
    except Invalid as exc:
        return Rejected("bad-address", f"addr={exc.reason}")
    if addresses and str(address) not in (plain := _plain(addresses)):
        return Rejected(
            "replayed",
            f"addr={raw_address} is not an address of the announcing host "
            f"({', '.join(sorted(plain)[:4]) or 'none usable'}"
            f"{', ...' if len(plain) > 4 else ''}); a copied announcement?",
        )
    return Announcement(
        role=role,
        component_id=component_id,
        cluster=cluster,
        state=state,
        address=address,
        fingerprint=fingerprint,
        api_port=api_port,
        eucavers=eucavers,
        instance=instance,
        token_id=token[0] if token else None,
        token_stamp=token[1] if token else None,
        token_proof=token[2] if token else None,
    )


Fields = tuple[str, str, str | None, AnnouncedState, int | None, str, tuple[str, int, str] | None]


def _fields(role: Role, txt: Mapping[str, str]) -> Fields:
    """Every key but type and addr, each through its grammar; Invalid names the first bad one."""
    component_id = grammar.component_id(txt.get("id", ""), "id")
    fingerprint = grammar.fingerprint(txt.get("fp", ""), "fp")
    cluster: str | None = None
    if role.needs_cluster:
        if "cluster" not in txt:
            raise Invalid("cluster", f"a {role.txt_type} announcement needs cluster=")
        cluster = grammar.cluster(txt["cluster"], "cluster")
    try:
        state = AnnouncedState(txt.get("state", ""))
    except ValueError:
        raise Invalid("state", f"{_shown(txt.get('state'))} is not ready|registered") from None
    api_port = grammar.port(txt["port"], "port") if "port" in txt else None
    eucavers = grammar.version(txt.get("eucavers", ""), "eucavers")
    return component_id, fingerprint, cluster, state, api_port, eucavers, _token_fields(txt)


def _say(exc: Invalid) -> str:
    """The offending key as it reads on the wire: "port='x' is not ..." or "port: must ..."."""
    quoted = exc.reason.startswith(("'", '"'))
    return f"{exc.field}={exc.reason}" if quoted else f"{exc.field}: {exc.reason}"


def _shown(value: object) -> str:
    return grammar.shown(value)


def _plain(addresses: Iterable[str]) -> set[str]:
    """The responder's addresses without their IPv6 scope ('fe80::1%eth0' -> 'fe80::1');
    anything that is not an address is left out (it cannot match `addr`)."""
    return {str(a) for a in map(grammar.peer_address, addresses) if a is not None}


def _token_fields(txt: Mapping[str, str]) -> tuple[str, int, str] | None:
    present = [k for k in ("tok", "tts", "tproof") if k in txt]
    if not present:
        return None
    if len(present) != 3:
        raise Invalid("tok", "tok=, tts= and tproof= must come together")
    return (
        grammar.token_id(txt["tok"], "tok"),
        grammar.timestamp(txt["tts"], "tts"),
        grammar.proof(txt["tproof"], "tproof"),
    )
