"""The records one component keeps in the site's zone, and how a browser reads them back.

For the instance `node-nc-0327e19a6d6f` in `site.example.` (docs/dnssd.md, "Records"), with
I = node-nc-0327e19a6d6f._eucalyptus._tcp.site.example.:

    _eucalyptus._tcp.site.example.                  PTR  I
    _registrar._sub._eucalyptus._tcp.site.example.  PTR  I (only a CLC or a registered CC)
    I                                               SRV  0 0 8780 I
    I                                               TXT  "txtvers=1" ... (ServiceSpec.txt, exactly)
    I                                               A    10.77.1.11
    _alive.I                                        TXT  "at=1795599669.123" "refresh=60"

The SRV target is the instance's own name, which holds its addresses: every name a component
writes lies at or under its instance name, so a key named after the instance (update-policy
`selfsub`) can write all of them and nothing of anyone else's, except the shared PTR RRsets.
`_alive` is the heartbeat: rewritten at every refresh, never part of what the decision reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from eucareg.core.txt import SERVICE_TYPE
from eucareg.mdns.zeroconf_backend import _decode_properties

SERVICE = SERVICE_TYPE.removesuffix("local.")  # "_eucalyptus._tcp."
REGISTRAR_SUBTYPE = "_registrar._sub"
ALIVE = b"_alive"
# More is not an eucareg TXT record (it has about a dozen keys); the rest is not read.
MAX_TXT_STRINGS = 64
MAX_ADDRESSES = 32

IN = dns.rdataclass.IN


class Names:
    """The DNS names of one site domain's DNS-SD service."""

    def __init__(self, domain: str) -> None:
        self.domain = dns.name.from_text(domain)
        self.service = dns.name.from_text(SERVICE.removesuffix("."), origin=self.domain)
        self.registrars = dns.name.from_text(REGISTRAR_SUBTYPE, origin=self.service)

    def instance(self, label: str) -> dns.name.Name:
        """`label._eucalyptus._tcp.<domain>`; ValueError when the label cannot be one."""
        raw = label.encode("utf-8")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"instance label {label!r} is not 1-63 bytes")
        return dns.name.Name([raw]).concatenate(self.service)

    def alive(self, instance: dns.name.Name) -> dns.name.Name:
        return dns.name.Name([ALIVE]).concatenate(instance)

    def label_of(self, name: dns.name.Name) -> str | None:
        """The instance label of a PTR target, or None unless it is `label.<service>` exactly
        (a PTR elsewhere is never followed) with a UTF-8 label."""
        if len(name) != len(self.service) + 1 or name.parent() != self.service:
            return None
        try:
            return name.labels[0].decode("utf-8")
        except UnicodeDecodeError:
            return None


def txt_rdata(txt: Mapping[str, str]) -> dns.rdtypes.ANY.TXT.TXT:
    """The TXT record of a ServiceSpec: one `key=value` string per key, in its order."""
    strings = [f"{key}={value}".encode() for key, value in txt.items()]
    return dns.rdtypes.ANY.TXT.TXT(IN, dns.rdatatype.TXT, strings)


def heartbeat_rdata(at: float, refresh: float) -> dns.rdtypes.ANY.TXT.TXT:
    strings = [f"at={at:.3f}".encode(), f"refresh={max(1, round(refresh))}".encode()]
    return dns.rdtypes.ANY.TXT.TXT(IN, dns.rdatatype.TXT, strings)


def address_rdatas(addresses: Iterable[str]) -> tuple[list[dns.rdata.Rdata], list[dns.rdata.Rdata]]:
    """(A records, AAAA records) of a spec's addresses; anything else is left out."""
    v4: list[dns.rdata.Rdata] = []
    v6: list[dns.rdata.Rdata] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == 4:
            v4.append(dns.rdata.from_text(IN, dns.rdatatype.A, str(address)))
        else:
            v6.append(dns.rdata.from_text(IN, dns.rdatatype.AAAA, str(address)))
    return v4, v6


def txt_properties(rrset: dns.rrset.RRset | None) -> dict[str, str]:
    """A browsed TXT RRset as the TXT keys the decision reads, decoded exactly as the mDNS
    backend decodes them (first of a repeated key wins; value-less or undecodable keys are
    dropped). An RRset of several TXT records is no eucareg record: it reads as empty."""
    if rrset is None or len(rrset) != 1:
        return {}
    rdata = next(iter(rrset))
    properties: dict[bytes, bytes | None] = {}
    for string in getattr(rdata, "strings", ())[:MAX_TXT_STRINGS]:
        key, sep, value = bytes(string).partition(b"=")
        if key not in properties:
            properties[key] = value if sep else None
    return _decode_properties(properties)


def heartbeat(rrset: dns.rrset.RRset | None) -> tuple[tuple[bytes, ...] | None, float | None]:
    """(what the heartbeat holds, the refresh interval it states): a browser compares the first
    over time; None when there is no heartbeat."""
    if rrset is None:
        return None, None
    strings: list[bytes] = []
    for rdata in sorted(rrset, key=lambda r: r.to_digestable()):
        strings.extend(bytes(s) for s in getattr(rdata, "strings", ())[:MAX_TXT_STRINGS])
    refresh: float | None = None
    for string in strings:
        key, _, value = string.partition(b"=")
        if key == b"refresh" and value.isdigit() and len(value) <= 6:
            refresh = float(min(max(int(value), 1), 86400))
    return tuple(strings[:MAX_TXT_STRINGS]), refresh


def addresses_of(rrsets: Iterable[dns.rrset.RRset], target: dns.name.Name) -> tuple[str, ...]:
    """The A and AAAA addresses `rrsets` give for `target`, sorted, at most MAX_ADDRESSES."""
    found: set[str] = set()
    for rrset in rrsets:
        if rrset.name != target or rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        found.update(str(rdata.address) for rdata in rrset)
    return tuple(sorted(found)[:MAX_ADDRESSES])
