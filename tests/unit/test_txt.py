"""Decoding TXT records: identity from TXT only, and every bad value named."""

from __future__ import annotations

import ipaddress

import pytest

from eucareg.core import txt
from eucareg.core.model import Announcement, Role
from tests.factories import ann, sighting


def test_round_trip_keeps_every_field_and_the_eucalyptus_keys() -> None:
    original = ann(Role.NC, "c1")
    record = sighting(original).txt
    assert record["type"] == "node" and record["txtvers"] == "1" and record["protovers"] == "1"
    assert "eucavers" in record
    decoded = txt.decode("anything at all", record)
    assert isinstance(decoded, Announcement)
    assert decoded.component_id == original.component_id
    assert decoded.fingerprint == original.fingerprint
    assert decoded.address == original.address
    assert decoded.instance == "anything at all"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"txtvers": "2"}, "txtvers"),
        ({"type": "toaster"}, "type="),
        ({"id": "X"}, "id="),
        ({"fp": "md5:abc"}, "fp="),
        ({"cluster": "bad name!"}, "cluster="),
        ({"state": "maybe"}, "state="),
        ({"addr": "not-an-ip"}, "addr="),
        ({"addr": "fe80::1"}, "link-local"),
        ({"addr": "127.0.0.5"}, "loopback"),
        ({"addr": "224.0.0.251"}, "multicast"),
        ({"port": "99999"}, "port: must be between 1 and 65535"),
        ({"port": "²"}, "port='²' is not a number"),
        ({"port": "٨٠"}, "port="),
        ({"addr": "::ffff:127.0.0.1"}, "IPv4-mapped"),
        ({"addr": "2001:db8::7%$(touch x)"}, "scope"),
        ({"addr": "0.1.2.3"}, "0.0.0.0/8"),
        ({"addr": "255.255.255.255"}, "broadcast"),
        ({"cluster": "c1\n"}, "cluster="),
        ({"id": "nc-0123456789\n"}, "id="),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(change: dict[str, str], needle: str) -> None:
    record = {**sighting(ann(Role.NC, "c1")).txt, **change}
    result = txt.decode("x", record)
    assert isinstance(result, txt.Rejected)
    assert needle in result.reason


def test_missing_address_is_refused_rather_than_guessed() -> None:
    record = dict(sighting(ann(Role.NC, "c1")).txt)
    del record["addr"]
    result = txt.decode("x", record)
    assert isinstance(result, txt.Rejected) and result.code == "no-address"


def test_node_without_cluster_is_rejected_and_walrus_cluster_is_dropped() -> None:
    record = dict(sighting(ann(Role.NC, "c1")).txt)
    del record["cluster"]
    assert isinstance(txt.decode("x", record), txt.Rejected)
    walrus = {**sighting(ann(Role.WALRUS)).txt, "cluster": "c1"}
    decoded = txt.decode("x", walrus)
    assert isinstance(decoded, Announcement) and decoded.cluster is None


def test_a_responder_address_that_is_no_address_is_left_out_not_raised() -> None:
    """Found by the property tests: decode() raised ValueError on a responder address that
    did not parse; now such an address simply cannot match addr=."""
    record = sighting(ann(Role.NC, "c1", address="10.77.9.9")).txt
    assert isinstance(txt.decode("x", record, ("junk", "10.77.9.9")), Announcement)
    result = txt.decode("x", record, ("junk\n" * 100, "fe80::1%eth0", "10.77.9.8"))
    assert isinstance(result, txt.Rejected) and result.code == "replayed"
    assert "(10.77.9.8, fe80::1); a copied" in result.reason and "junk" not in result.reason


def test_an_allow_list_never_admits_the_ipv4_mapped_form() -> None:
    record = {**sighting(ann(Role.NC, "c1")).txt, "addr": "::ffff:127.0.0.1"}
    everything = [ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0")]
    result = txt.decode("x", record, (), everything)
    assert isinstance(result, txt.Rejected) and result.code == "bad-address"
    assert "IPv4-mapped" in result.reason
