"""The Avahi backend's TXT handling (eucareg/mdns/avahi_dbus.py): what it sends as `aay`, and
that what it hears decodes exactly as the python-zeroconf backend decodes the same record,
nasty records included (invalid UTF-8, keys without '=', repeated keys, empty strings)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf.asyncio import AsyncServiceInfo

from eucareg.core.txt import SERVICE_TYPE
from eucareg.mdns import avahi_dbus as ad
from eucareg.mdns.zeroconf_backend import _decode_properties


def as_zeroconf_hears(strings: list[bytes]) -> dict[str, str]:
    """The same TXT strings on the wire (length-prefixed), parsed and decoded by the zeroconf
    backend's own code."""
    wire = b"".join(bytes((len(s),)) + s for s in strings)
    info = AsyncServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=wire)
    return _decode_properties(info.properties)


def test_txt_strings_are_key_equals_value_in_the_specs_order() -> None:
    assert ad.txt_strings({"txtvers": "1", "type": "node", "addr": "10.0.0.5", "e": ""}) == [
        b"txtvers=1",
        b"type=node",
        b"addr=10.0.0.5",
        b"e=",
    ]
    assert ad.txt_strings({"n": "é"}) == ["n=é".encode()]


def test_a_txt_string_over_255_bytes_is_refused_by_name() -> None:
    assert len(ad.txt_strings({"k": "v" * 253})[0]) == 255  # the largest allowed
    with pytest.raises(ValueError, match=r"TXT string k= is 256 bytes; DNS-SD allows 255"):
        ad.txt_strings({"k": "v" * 254})


@pytest.mark.parametrize(
    ("strings", "heard"),
    [
        ([b"type=node", b"addr=10.0.0.5"], {"type": "node", "addr": "10.0.0.5"}),
        ([b"TYPE=node"], {"type": "node"}),  # keys are case-insensitive (RFC 6763 6.4)
        ([b"type=node", b"type=cloud"], {"type": "node"}),  # the first one wins
        ([b"flag", b"e="], {"e": ""}),  # a key without '=' has no value: dropped
        ([b"v=a=b"], {"v": "a=b"}),  # split at the first '='
        ([b"v=\xff\xfe"], {}),  # a value that is not UTF-8: dropped, not guessed
        ([b"k\xc3\xa9=1", b"ok=1"], {"ok": "1"}),  # a key that is not ASCII: dropped
        ([b"=x"], {"": "x"}),  # as zeroconf: an empty key with a value is kept ...
        ([b"", b"=x"], {}),  # ... unless an empty string (that key, no value) came first
        ([], {}),
    ],
)
def test_decoding_matches_the_zeroconf_backend(strings: list[bytes], heard: dict[str, str]) -> None:
    assert ad.decode_txt(strings) == heard
    assert as_zeroconf_hears(strings) == heard


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda k, v: k + b"=" + v,
                st.sampled_from([b"type", b"Type", b"addr", b"id", b"\xff", b"k\x00"]),
                st.binary(max_size=20),
            ),
        ),
        max_size=8,
    )
)
def test_any_txt_record_decodes_as_the_zeroconf_backend_decodes_it(strings: list[bytes]) -> None:
    assert ad.decode_txt(strings) == as_zeroconf_hears(strings)


def test_encoded_txt_decodes_back_to_itself() -> None:
    txt = {"txtvers": "1", "type": "cluster", "cluster": "c-1", "fp": "sha256:" + "a" * 64}
    assert ad.decode_txt(ad.txt_strings(txt)) == txt
