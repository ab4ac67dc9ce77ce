"""The RFC 2136 updates DNS-SD sends, each signed with a TSIG key: all of an instance's records
(records.py) written in one atomic update, all of them deleted, and a prune's deletion, which
holds only while the instance's heartbeat is still the one found stale.
"""

from __future__ import annotations

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.update

from eucareg.mdns.types import ServiceSpec

from . import records
from .keys import Key

IN = dns.rdataclass.IN


def put(
    names: records.Names,
    key: Key,
    instance: str,
    spec: ServiceSpec,
    ttl: int,
    heartbeat: dns.rdata.Rdata,
) -> dns.update.UpdateMessage:
    """Every record of the instance, replaced in one atomic update; ValueError when the
    instance or the spec cannot be written as records."""
    name = names.instance(instance)
    pointer = _ptr(name)
    message = _message(names, key)
    message.add(names.service, ttl, pointer)
    if "port" in spec.txt:  # a CLC, or a registered CC: a registrar
        message.add(names.registrars, ttl, pointer)
    else:
        message.delete(names.registrars, pointer)
    srv = dns.rdata.from_text(IN, dns.rdatatype.SRV, f"0 0 {spec.port} {name}")
    message.replace(name, ttl, srv)
    message.replace(name, ttl, records.txt_rdata(spec.txt))
    v4, v6 = records.address_rdatas(spec.addresses)
    for rdtype, found in ((dns.rdatatype.A, v4), (dns.rdatatype.AAAA, v6)):
        if found:
            message.replace(name, ttl, *found)
        else:
            message.delete(name, rdtype)
    message.replace(names.alive(name), ttl, heartbeat)
    return message


def delete(names: records.Names, key: Key, instance: str) -> dns.update.UpdateMessage:
    message = _message(names, key)
    _delete_records(names, message, names.instance(instance))
    return message


def prune(
    names: records.Names, key: Key, instance: str, heartbeat: dns.rrset.RRset | None
) -> dns.update.UpdateMessage:
    """Delete the instance's records provided its heartbeat is still `heartbeat` as it was read
    (None: there was none): a component that refreshed meanwhile makes the prerequisite fail."""
    name = names.instance(instance)
    alive = names.alive(name)
    message = _message(names, key)
    if heartbeat is None:
        message.absent(alive, dns.rdatatype.TXT)
    else:
        # A prerequisite's TTL must be zero (RFC 2136 section 2.4.2).
        message.present(alive, dns.rdataset.from_rdata_list(0, list(heartbeat)))
    _delete_records(names, message, name)
    return message


def _message(names: records.Names, key: Key) -> dns.update.UpdateMessage:
    return dns.update.UpdateMessage(
        names.domain, keyring=key.keyring, keyname=key.name, keyalgorithm=key.algorithm
    )


def _delete_records(
    names: records.Names, message: dns.update.UpdateMessage, name: dns.name.Name
) -> None:
    pointer = _ptr(name)
    message.delete(names.service, pointer)
    message.delete(names.registrars, pointer)
    for rdtype in (dns.rdatatype.SRV, dns.rdatatype.TXT, dns.rdatatype.A, dns.rdatatype.AAAA):
        message.delete(name, rdtype)
    message.delete(names.alive(name), dns.rdatatype.TXT)


def _ptr(name: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, dns.rdatatype.PTR, name.to_text())
