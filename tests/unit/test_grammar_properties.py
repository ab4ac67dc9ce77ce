"""Property-based tests (hypothesis) of every grammar, TXT decoding and the configuration file.

Whatever arrives, a parser returns values that satisfy the grammar, or refuses with a reason
that names the field; nothing else ever escapes (no ValueError of a 5000-digit number, no
RecursionError, no UnicodeError). Each `budget(n)` below runs n examples; together they run more
than the 10,000 the issue asks for (test_the_suite_runs_at_least_10000_examples checks the sum).

The address rules are stated a second time here, independently of grammar.REFUSED, from the
IANA special-purpose address registries (RFC 6890 and its successors), and the two must agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import math
import re
import string
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from eucareg.config import file as config
from eucareg.config.values import MAX_ALLOWED_RANGES, ConfigError, shown_key
from eucareg.core import grammar, txt
from eucareg.core.grammar import Invalid, IPNetwork
from eucareg.core.model import AnnouncedState, Announcement, IPAddress, Role
from eucareg.core.trust import parse_token
from tests.factories import ann, fake_fingerprint, sighting

_BUDGETS: list[int] = []


def budget(examples: int, cases: int = 1) -> settings:
    """hypothesis settings for one property: `examples` examples (for each of `cases`
    parametrized cases), no deadline (a loaded CI machine is slow, not wrong) and no example
    database (nothing is written to the tree)."""
    _BUDGETS.append(examples * cases)
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


REASON_MAX = 200  # an echoed value is cut by grammar.shown(); no reason grows with its input

# -- what arrives: anything at all ------------------------------------------------------------

# Every code point: other scripts' digits, NUL, newlines, lone surrogates.
TEXT = st.text(st.characters(), max_size=80)
# Near the grammars: ASCII letters and digits with their punctuation, blanks and line breaks.
ASCIIISH = st.text(
    st.sampled_from(string.ascii_letters + string.digits + "-_.:/%+~[] \t\n\r\x00"), max_size=80
)
# Digits of every script (Arabic-Indic, fullwidth, superscripts, ...): int() takes many of them.
FOREIGN_DIGITS = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=8)
# Built by map: hypothesis describes a sampled_from by repr(), which refuses 5000 digits.
HUGE_INTS = st.sampled_from([(2, 63), (-2, 63), (2, 64), (10, 20), (-10, 400), (10, 5000)]).map(
    lambda t: t[0] ** t[1] if t[0] > 0 else -(abs(t[0]) ** t[1]) - 1
)
INTS = st.integers() | st.integers(-(10**30), 10**30) | HUGE_INTS
FLOATS = st.floats()  # NaN, both infinities, -0.0, subnormals


def deep() -> list[Any]:
    """A list nested 3000 deep: repr() of it raises RecursionError."""
    nested: list[Any] = []
    for _ in range(3000):
        nested = [nested]
    return nested


SCALARS = (
    st.none()
    | st.booleans()
    | INTS
    | FLOATS
    | TEXT
    | ASCIIISH
    | FOREIGN_DIGITS
    | st.binary(max_size=16)
    | st.builds(deep)
)
ANYTHING = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


@st.composite
def near(draw: st.DrawFn, valid: st.SearchStrategy[str]) -> str:
    """A valid value, or one edit away from it: the inputs that get closest to a grammar."""
    text = draw(valid)
    edit = draw(st.sampled_from(["keep", "insert", "delete", "replace", "newline", "blank"]))
    at = draw(st.integers(0, len(text)))
    char = draw(st.characters() | st.sampled_from("\n\x00 %\u0660\uff11\u00b2-_.:"))
    if edit == "insert":
        return text[:at] + char + text[at:]
    if edit == "delete" and text:
        return text[: min(at, len(text) - 1)] + text[min(at, len(text) - 1) + 1 :]
    if edit == "replace" and text:
        at = min(at, len(text) - 1)
        return text[:at] + char + text[at + 1 :]
    if edit == "newline":
        return text + draw(st.sampled_from(["\n", "\r\n", "\x00", "\u2028"]))
    if edit == "blank":
        return draw(st.sampled_from([" ", "\t", ""])) + text + draw(st.sampled_from([" ", "\t"]))
    return text


def outcome(parse: Callable[[], Any], field: str) -> Any:
    """parse()'s value, or None when it refused with a proper Invalid; anything else fails."""
    try:
        return parse()
    except Invalid as exc:
        assert exc.field == field
        assert exc.reason and len(exc.reason) <= REASON_MAX, exc.reason
        assert str(exc) == f"{field}: {exc.reason}"
        return None


# -- the identifier grammars ------------------------------------------------------------------

LOWER_DIGITS = set(string.ascii_lowercase + string.digits)
ALNUM = set(string.ascii_letters + string.digits)


def id_ok(value: str) -> bool:
    return 8 <= len(value) <= 64 and set(value) <= LOWER_DIGITS | {"-"} and value[0] != "-"


def cluster_ok(value: str) -> bool:
    return 1 <= len(value) <= 64 and set(value) <= ALNUM | set("_.-") and value[0] in ALNUM


def fingerprint_ok(value: str) -> bool:
    hexdigits = set("0123456789abcdef")
    return len(value) == 71 and value.startswith("sha256:") and set(value[7:]) <= hexdigits


def token_id_ok(value: str) -> bool:
    return len(value) == 12 and set(value) <= LOWER_DIGITS


def proof_ok(value: str) -> bool:
    return len(value) == 43 and set(value) <= ALNUM | set("-_")


def version_ok(value: str) -> bool:
    return value == "" or (
        len(value) <= 64 and value[0] in ALNUM and set(value) <= ALNUM | set(".+~_-")
    )


# parser, its default field, its pattern, and the rule restated without a regex
IDS: dict[str, tuple[Callable[..., str], str, re.Pattern[str], Callable[[str], bool]]] = {
    "component_id": (grammar.component_id, "id", grammar.COMPONENT_ID, id_ok),
    "cluster": (grammar.cluster, "cluster", grammar.CLUSTER, cluster_ok),
    "fingerprint": (grammar.fingerprint, "fingerprint", grammar.FINGERPRINT, fingerprint_ok),
    "token_id": (grammar.token_id, "token", grammar.TOKEN_ID, token_id_ok),
    "proof": (grammar.proof, "tproof", grammar.PROOF, proof_ok),
    "version": (grammar.version, "eucavers", grammar.VERSION, version_ok),
}


def valid(pattern: re.Pattern[str]) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


@pytest.mark.parametrize("name", IDS)
@budget(400, cases=len(IDS))
@given(data=st.data())
def test_an_identifier_is_valid_or_refused_with_its_field(name: str, data: st.DataObject) -> None:
    parse, field, pattern, rule = IDS[name]
    value = data.draw(ANYTHING | near(valid(pattern)), label="value")
    result = outcome(lambda: parse(value), field)
    if result is not None:
        assert type(result) is str and result == value
        assert rule(result), result
        assert pattern.fullmatch(result) and result.isascii()
        assert parse(result, "again") == result
    else:
        assert not (isinstance(value, str) and rule(value)), f"{value!r} was refused"


@pytest.mark.parametrize("name", IDS)
@budget(150, cases=len(IDS))
@given(data=st.data())
def test_every_identifier_the_grammar_describes_is_accepted(name: str, data: st.DataObject) -> None:
    parse, _, pattern, rule = IDS[name]
    value = data.draw(valid(pattern))
    assert rule(value) and parse(value) == value


# -- numbers, times and durations -------------------------------------------------------------


@budget(800)
@given(
    value=ANYTHING | near(st.integers(0, 10**21).map(str)) | FOREIGN_DIGITS,
    bounds=st.tuples(st.integers(-(2**70), 2**70), st.integers(-(2**70), 2**70)).map(sorted),
)
@example(value=10**5000, bounds=[0, 5])  # repr() of it raised ValueError, not Invalid
@example(value=-(10**5000), bounds=[0, 5])
@example(value="\u0668\u0660", bounds=[1, 65535])
@example(value="\u00b2", bounds=[1, 65535])
@example(value="80\n", bounds=[1, 65535])
@example(value=True, bounds=[0, 5])
def test_an_integer_is_in_bounds_or_refused(value: object, bounds: list[int]) -> None:
    low, high = bounds
    result = outcome(lambda: grammar.integer(value, "n", low, high), "n")
    if result is None:
        assert grammar.integer_or_none(value, low, high) is None
        return
    assert type(result) is int and low <= result <= high
    if isinstance(value, str):
        assert 1 <= len(value) <= 20 and set(value) <= set(string.digits)
        assert int(value) == result
    else:
        assert type(value) is int and value == result
    assert grammar.integer_or_none(value, low, high) == result


@budget(300)
@given(value=ANYTHING | st.integers(-5, 2**35).map(str) | st.integers(-5, 2**35))
def test_a_port_and_a_timestamp_are_in_their_ranges(value: object) -> None:
    port = outcome(lambda: grammar.port(value), "port")
    assert port is None or 1 <= port <= 65535
    stamp = outcome(lambda: grammar.timestamp(value, "tts"), "tts")
    assert stamp is None or 0 <= stamp <= grammar.MAX_TIME
    if isinstance(value, int | str) and not isinstance(value, bool):
        number = int(value) if isinstance(value, int) else None
        if number is not None:
            assert (port is not None) == (1 <= number <= 65535)
            assert (stamp is not None) == (0 <= number <= grammar.MAX_TIME)


UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
DURATION_TEXT = st.builds(
    lambda blank1, number, fraction, unit, blank2: f"{blank1}{number}{fraction}{unit}{blank2}",
    st.sampled_from(["", " ", "\t"]),
    st.integers(0, 10**12).map(str),
    st.sampled_from(["", ".5", ".25", ".000000001", ".1234567891"]),
    st.sampled_from([*UNITS, "S", "M", "us", "y", "e3"]),
    st.sampled_from(["", " ", "\t", "\n"]),
)


def seconds_by_hand(text: str) -> float:
    """'1.5h' -> 5400.0, restated: number, then an optional unit, blanks around either."""
    text = text.strip(" \t")
    unit = next(u for u in ("ms", "s", "m", "h", "d", "") if text.endswith(u))
    number = text[: len(text) - len(unit)].strip(" \t")
    whole, _, fraction = number.partition(".")
    assert whole and set(whole) <= set(string.digits) and len(whole) <= 400
    assert set(fraction) <= set(string.digits) and len(fraction) <= 9
    return float(number) * UNITS[unit]


@budget(700)
@given(
    value=ANYTHING | near(DURATION_TEXT) | FLOATS | st.sampled_from(["1" * 400, "9" * 401 + "s"]),
    high=st.none() | st.floats(min_value=0.001, max_value=grammar.MAX_DURATION),
)
@example(value=10**5000, high=None)  # repr() of it raised ValueError, not Invalid
@example(value=-(10**5000), high=None)
@example(value=float("nan"), high=None)
@example(value="1" * 400 + "d", high=None)
def test_a_duration_is_finite_positive_and_bounded_or_refused(
    value: object, high: float | None
) -> None:
    limit = grammar.MAX_DURATION if high is None else high
    result = outcome(lambda: grammar.duration(value, "wait", high=limit), "wait")
    if result is None:
        return
    assert type(result) is float and math.isfinite(result) and 0 < result <= limit
    assert not isinstance(value, bool)
    if isinstance(value, str):
        assert result == seconds_by_hand(value)
    else:
        assert isinstance(value, int | float) and result == value
    assert grammar.duration(result, "again", high=limit) == result


GRAMMAR_DURATION_TEXT = st.builds(
    lambda blank1, number, fraction, blank2, unit, blank3: (
        f"{blank1}{number}{fraction}{blank2}{unit}{blank3}"
    ),
    st.sampled_from(["", " ", "\t"]),
    st.integers(0, 10**12).map(str) | st.from_regex(r"[0-9]{1,400}", fullmatch=True),
    st.sampled_from(["", ".5", ".25", ".000000001", ".123456789"]),
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from(list(UNITS)),
    st.sampled_from(["", " ", "\t"]),
)


@budget(200)
@given(text=GRAMMAR_DURATION_TEXT)
@example(text="0.5ms")
@example(text="3650d")
@example(text="3650.000000001d")
def test_every_duration_the_grammar_describes_is_accepted_when_in_range(text: str) -> None:
    seconds = seconds_by_hand(text)
    result = outcome(lambda: grammar.duration(text, "wait"), "wait")
    assert (result is not None) == (0 < seconds <= grammar.MAX_DURATION)
    assert result is None or result == seconds


# -- addresses: the rules restated from the IANA registries -----------------------------------


def usable_by_the_registries(address: IPAddress) -> bool:
    """Whether an address may be registered, stated from the IANA IPv4 and IPv6 special-purpose
    address registries (RFC 6890 and successors) and the IPv6 addressing architecture, without
    looking at grammar.REFUSED: a unicast address a host inside a site is reached at."""
    b = address.packed
    if address.version == 4:
        return not (
            b[0] == 0  # 0.0.0.0/8 "this network" (RFC 791, RFC 1122)
            or b[0] == 127  # loopback (RFC 1122)
            or b[0] >= 224  # multicast 224/4 (RFC 5771), reserved 240/4, broadcast (RFC 919)
            or b[:2] == bytes([169, 254])  # link-local (RFC 3927)
            or (b[0] == 100 and 64 <= b[1] <= 127)  # shared address space (RFC 6598)
            or (b[0] == 198 and b[1] in (18, 19))  # benchmarking (RFC 2544)
            or b[:3] in {bytes(x) for x in ((192, 0, 0), (192, 88, 99))}  # RFC 6890, RFC 7526
            or b[:3] in {bytes(x) for x in ((192, 0, 2), (198, 51, 100), (203, 0, 113))}  # 5737
        )
    if b[0] & 0xFE == 0xFC:  # unique-local fc00::/7 (RFC 4193)
        return True
    if b[0] >> 5 != 0b001:  # outside global unicast 2000::/3 (RFC 4291): ::1, ::, mapped,
        return False  # compatible, NAT64, discard, link-local, site-local, multicast, ...
    first = int.from_bytes(b[:2], "big")
    return not (
        (first == 0x2001 and b[2] <= 0x01)  # 2001::/23 IETF protocol assignments (RFC 2928)
        or b[:4] == bytes.fromhex("20010db8")  # documentation (RFC 3849)
        or first == 0x2002  # 6to4 (RFC 3056), deprecated
        or (first == 0x3FFF and b[2] < 0x10)  # documentation 3fff::/20 (RFC 9637)
    )


def is_mapped(address: IPAddress) -> bool:
    return address.version == 6 and address.packed[:12] == bytes(10) + b"\xff\xff"


def admitted(address: IPAddress, allowed: Iterable[IPNetwork]) -> bool:
    """The site's allow-list wins over the registries, never over the IPv4-mapped form."""
    if is_mapped(address):
        return False
    in_allowed = any(n.version == address.version and address in n for n in allowed)
    return usable_by_the_registries(address) or in_allowed


def address_ok(result: object, allowed: Iterable[IPNetwork] = ()) -> None:
    assert isinstance(result, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert getattr(result, "scope_id", None) is None and "%" not in str(result)
    assert not is_mapped(result)
    assert admitted(result, allowed), result
    assert grammar.address_problem(result, allowed) is None


IP = st.ip_addresses()
IP_TEXT = st.one_of(
    IP.map(str),
    IP.map(lambda a: a.exploded),
    IP.map(lambda a: str(a).upper()),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.tuples(IP.map(str), TEXT).map("%".join),
)


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    address = draw(IP)
    prefix = draw(st.integers(0, address.max_prefixlen))
    return ipaddress.ip_network((address, prefix), strict=False)


ALLOWED = st.lists(networks(), max_size=3)
# Addresses a site would use (private, unique-local, global, shared), to get past `addr`.
SITE_IP_TEXT = st.one_of(
    *(
        st.ip_addresses(network=net).map(str)
        for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
    ),
    *(st.ip_addresses(network=net).map(str) for net in ("fd00::/8", "2a00::/12", "2001:db8::/32")),
)


@budget(1000)
@given(value=ANYTHING | near(IP_TEXT), allowed=ALLOWED)
@example(value="::ffff:127.0.0.1", allowed=[ipaddress.ip_network("::/0")])  # was accepted
@example(value="::ffff:10.0.0.1", allowed=[ipaddress.ip_network("::ffff:0:0/96")])
@example(value="2001:db8::7%$(touch x)", allowed=[])
@example(value="\u0661\u0660.\u0660.\u0660.\u0661", allowed=[])
@example(value="10.0.0.1\n", allowed=[])
def test_an_address_is_usable_or_refused(value: object, allowed: list[IPNetwork]) -> None:
    result = outcome(lambda: grammar.address(value, "addr", allowed), "addr")
    if result is None:
        return
    address_ok(result, allowed)
    assert isinstance(value, str) and value.isascii() and "%" not in value
    assert result == ipaddress.ip_address(value)
    assert grammar.address(str(result), "again", allowed) == result


SAMPLE_RANGES = [
    # Edges of every range the registries name, and of some that only look special.
    *["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12"],
    *["192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24"],
    *["192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24"],
    *[
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "::ffff:0:0/96",
        "::/96",
    ],
    *["64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "2001::/23", "2001::/32"],
    *[
        "2001:2::/48",
        "2001:3::/32",
        "2001:20::/28",
        "2001:db8::/32",
        "2002::/16",
        "2620:4f:8000::/48",
    ],
    *[
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "2000::/3",
        "4000::/3",
    ],
]


@st.composite
def inside_a_sample_range(draw: st.DrawFn) -> IPAddress:
    net = ipaddress.ip_network(draw(st.sampled_from(SAMPLE_RANGES)))
    offset = draw(st.integers(-2, net.num_addresses + 1))
    top = 2**net.max_prefixlen - 1
    value = min(max(int(net.network_address) + offset, 0), top)
    return ipaddress.ip_address(value) if net.version == 4 else ipaddress.IPv6Address(value)


@pytest.mark.parametrize("cidr", SAMPLE_RANGES)
def test_the_table_agrees_with_the_registries_at_each_range_edge(cidr: str) -> None:
    net = ipaddress.ip_network(cidr)
    top = 2**net.max_prefixlen - 1
    first, last = int(net.network_address), int(net.broadcast_address)
    for value in {
        min(max(v, 0), top) for v in (first - 1, first, first + 1, last - 1, last, last + 1)
    }:
        address = ipaddress.ip_address(value) if net.version == 4 else ipaddress.IPv6Address(value)
        expected = usable_by_the_registries(address)
        assert (grammar.address_problem(address) is None) == expected, address


@budget(1200)
@given(address=IP | inside_a_sample_range())
def test_the_table_agrees_with_the_registries(address: IPAddress) -> None:
    problem = grammar.address_problem(address)
    assert (problem is None) == usable_by_the_registries(address), (address, problem)
    assert problem is None or problem.startswith("is ")


@budget(600)
@given(address=IP | inside_a_sample_range(), allowed=ALLOWED)
def test_an_allow_list_admits_its_ranges_but_never_the_mapped_form(
    address: IPAddress, allowed: list[IPNetwork]
) -> None:
    problem = grammar.address_problem(address, allowed)
    assert (problem is None) == admitted(address, allowed), (address, allowed, problem)


@budget(300)
@given(address=IP.filter(usable_by_the_registries))
def test_every_usable_address_is_accepted_in_each_spelling(address: IPAddress) -> None:
    for spelling in {str(address), address.exploded, str(address).upper()}:
        assert grammar.address(spelling) == address


NASTY: list[tuple[str, list[str], str | None]] = [
    ("::ffff:127.0.0.1", [], "IPv4-mapped"),
    ("::ffff:10.0.0.1", [], "IPv4-mapped"),
    ("::ffff:10.0.0.1", ["::ffff:0:0/96"], "IPv4-mapped"),  # the allow-list cannot admit it
    ("::ffff:127.0.0.1", ["::/0"], "IPv4-mapped"),
    ("0.1.2.3", [], "0.0.0.0/8"),
    ("0.0.0.0", [], "0.0.0.0/8"),
    ("255.255.255.255", [], "broadcast"),
    ("192.0.2.21", [], "documentation"),
    ("2001:db8::1", [], "documentation"),
    ("3fff::1", [], "documentation"),
    ("127.0.0.5", [], "loopback"),
    ("::1", [], "loopback"),
    ("fe80::1", [], "link-local"),
    ("fe80::1%eth0", [], "scope"),
    ("2001:db8::7%$(touch x)", [], "scope"),
    ("10.0.0.1%eth0", [], "scope"),
    ("\u0661\u0660.\u0660.\u0660.\u0661", [], "is not an IP address"),  # Arabic-Indic digits
    ("\uff11\uff10.\uff10.\uff10.\uff11", [], "is not an IP address"),  # fullwidth digits
    ("010.0.0.1", [], "is not an IP address"),  # octal or decimal? neither
    ("10.0.0.1\n", [], "is not an IP address"),
    (" 10.0.0.1", [], "is not an IP address"),
    ("10.0.0.1\x00", [], "is not an IP address"),
    ("10.0.0.256", [], "is not an IP address"),
    ("100.64.0.1", [], "shared address space"),
    ("100.64.0.1", ["100.64.0.0/10"], None),
    ("5f00::1", [], "not a unicast address"),
    ("10.0.0.1", [], None),
    ("192.31.196.1", [], None),
    ("fd00::1", [], None),
    ("2a00:1450::1", [], None),
]


@pytest.mark.parametrize(("value", "allowed", "needle"), NASTY)
def test_nasty_addresses(value: str, allowed: list[str], needle: str | None) -> None:
    nets = [grammar.network(n) for n in allowed]
    if needle is None:
        assert str(grammar.address(value, "addr", nets)) == value
        return
    with pytest.raises(Invalid) as err:
        grammar.address(value, "addr", nets)
    assert err.value.field == "addr" and needle in err.value.reason


# -- networks for the allow-list ---------------------------------------------------------------


NETWORK_TEXT = st.one_of(
    networks().map(str),
    networks().map(lambda n: f"{n.network_address.exploded}/{n.prefixlen}"),
    st.tuples(IP, st.integers(-1, 129)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(networks(), TEXT).map(lambda t: f"{t[0].network_address}%{t[1]}/{t[0].prefixlen}"),
)


@budget(700)
@given(value=ANYTHING | near(NETWORK_TEXT))
@example(value="fe80::%eth0/64")  # a scoped range was accepted
@example(value="10.0.0.0/8\n")
@example(value="\uff11\uff10.0.0.0/8")
def test_a_network_is_plain_or_refused(value: object) -> None:
    result = outcome(lambda: grammar.network(value, "allowed_ranges"), "allowed_ranges")
    if result is None:
        return
    assert isinstance(result, ipaddress.IPv4Network | ipaddress.IPv6Network)
    assert isinstance(value, str) and value.isascii() and len(value) <= 64
    assert "%" not in str(result) and getattr(result.network_address, "scope_id", None) is None
    assert result == ipaddress.ip_network(str(result)) == grammar.network(str(result))


@budget(200)
@given(net=networks())
def test_every_network_is_accepted(net: IPNetwork) -> None:
    assert grammar.network(str(net)) == net


# -- host names --------------------------------------------------------------------------------

HOST_TEXT = st.one_of(
    st.from_regex(grammar.HOSTNAME, fullmatch=True), IP_TEXT, st.just("a" * 64 + ".example")
)


@budget(500)
@given(value=ANYTHING | near(HOST_TEXT), ipv6=st.booleans())
@example(value="\x00", ipv6=True)  # getaddrinfo raised ValueError
@example(value="a..b", ipv6=True)  # the idna codec raised UnicodeError
@example(value="a" * 64 + ".example", ipv6=True)
@example(value="fe80::1%eth0", ipv6=True)
def test_a_host_is_a_name_or_an_address_or_refused(value: object, ipv6: bool) -> None:
    result = outcome(lambda: grammar.host(value, "host", ipv6=ipv6), "host")
    if result is None:
        return
    assert result == value and result.isascii() and 1 <= len(result) <= 253
    if ":" in result:
        assert ipv6 and ipaddress.IPv6Address(result)
    else:
        labels = result.removesuffix(".").split(".")
        assert all(1 <= len(label) <= 63 for label in labels)
        assert all(set(label) <= ALNUM | {"-"} for label in labels)
        assert all(label[0] != "-" and label[-1] != "-" for label in labels)
        result.encode("idna")  # what the resolver does first; it must not raise


# -- TXT records -------------------------------------------------------------------------------

TXT_KEYS = ("txtvers", "protovers", "eucavers", "type", "state", "addr", "id", "fp", "cluster")
TOKEN_KEYS = ("tok", "tts", "tproof")
VALID_TXT: dict[str, st.SearchStrategy[str]] = {
    "txtvers": st.just(txt.TXT_VERSION),
    "protovers": st.just(txt.PROTOCOL_VERSION),
    "eucavers": valid(grammar.VERSION),
    "type": st.sampled_from([r.txt_type for r in Role]),
    "state": st.sampled_from([s.value for s in AnnouncedState]),
    "addr": SITE_IP_TEXT | IP.map(str),
    "id": valid(grammar.COMPONENT_ID),
    "fp": valid(grammar.FINGERPRINT),
    "cluster": valid(grammar.CLUSTER),
    "port": st.integers(0, 70000).map(str),
    "tok": valid(grammar.TOKEN_ID),
    "tts": st.integers(0, grammar.MAX_TIME + 1).map(str),
    "tproof": valid(grammar.PROOF),
}
LONG_TEXT = st.text(st.characters(), min_size=250, max_size=300)
REJECTION_CODES = {"bad-txt", "no-address", "bad-address", "replayed"}


@st.composite
def txt_values(draw: st.DrawFn, key: str) -> str | None:
    """A value for one key: mostly valid (to get deep into decode), else anything at all."""
    choice = draw(st.sampled_from(["valid"] * 36 + ["absent", "near", "text", "long"]))
    if choice == "absent":
        return None
    if choice == "near":
        return draw(near(VALID_TXT[key]))
    if choice == "text":
        return draw(TEXT | ASCIIISH)
    if choice == "long":
        return draw(LONG_TEXT)
    return draw(VALID_TXT[key])


@st.composite
def sightings(draw: st.DrawFn) -> tuple[dict[str, str], tuple[str, ...]]:
    record: dict[str, str] = {}
    keys = list(TXT_KEYS) + ["port"] * draw(st.booleans()) + list(TOKEN_KEYS) * draw(st.booleans())
    for key in keys:
        value = draw(txt_values(key))
        if value is not None:
            record[key] = value
    record.update(draw(st.dictionaries(TEXT, TEXT, max_size=2)))
    addresses = draw(st.lists(IP_TEXT | TEXT, max_size=3))
    if "addr" in record and draw(st.booleans()):
        addresses.insert(draw(st.integers(0, len(addresses))), record["addr"])
    return record, tuple(addresses)


def decoded_ok(
    result: object,
    record: dict[str, str],
    addresses: tuple[str, ...],
    allowed: list[IPNetwork],
    instance: str,
) -> None:
    """An Announcement whose every field satisfies its grammar, or a Rejected with a known
    code and a short reason."""
    if isinstance(result, txt.Rejected):
        assert result.code in REJECTION_CODES
        assert result.reason and len(result.reason) <= 2 * REASON_MAX, result.reason
        return
    assert isinstance(result, Announcement)
    assert record["txtvers"] == "1" and record["protovers"] == "1"
    assert all(len(v) <= txt.MAX_TXT_VALUE for v in record.values())
    assert result.role is Role.from_txt_type(record["type"])
    assert id_ok(result.component_id) and result.component_id == record["id"]
    assert fingerprint_ok(result.fingerprint) and result.fingerprint == record["fp"]
    assert (result.cluster is not None) == result.role.needs_cluster
    assert result.cluster is None or (
        cluster_ok(result.cluster) and result.cluster == record["cluster"]
    )
    assert result.state is AnnouncedState(record["state"])
    address_ok(result.address, allowed)
    assert result.address == ipaddress.ip_address(record["addr"])
    if addresses:
        plain = set()
        for a in addresses:
            with contextlib.suppress(ValueError):
                plain.add(ipaddress.ip_address(a.split("%", 1)[0]))
        assert result.address in plain
    if "port" in record:
        assert result.api_port is not None and 1 <= result.api_port <= 65535
        # ASCII digits, so leading zeros too (protocol.md 3.2: "port=08780" is 8780).
        assert record["port"].isascii() and record["port"].isdigit()
        assert result.api_port == int(record["port"])
    else:
        assert result.api_port is None
    assert version_ok(result.eucavers) and result.eucavers == record.get("eucavers", "")
    token = (result.token_id, result.token_stamp, result.token_proof)
    if any(k in record for k in TOKEN_KEYS):
        assert result.token_id is not None and token_id_ok(result.token_id)
        assert result.token_stamp is not None and 0 <= result.token_stamp <= grammar.MAX_TIME
        assert result.token_proof is not None and proof_ok(result.token_proof)
    else:
        assert token == (None, None, None)
    assert result.instance == instance


@budget(800)
@given(sighting_=sightings(), allowed=ALLOWED, instance=TEXT)
@example(  # a responder address that is not one raised ValueError
    sighting_=(dict(sighting(ann(Role.CLC, fingerprint=fake_fingerprint("x"))).txt), ("junk",)),
    allowed=[],
    instance="x",
)
def test_any_txt_record_decodes_or_is_rejected_with_a_known_code(
    sighting_: tuple[dict[str, str], tuple[str, ...]], allowed: list[IPNetwork], instance: str
) -> None:
    record, addresses = sighting_
    result = txt.decode(instance, record, addresses, allowed)
    event(result.code if isinstance(result, txt.Rejected) else "decoded")
    decoded_ok(result, record, addresses, allowed, instance)


def _with_token(record: dict[str, str]) -> dict[str, str]:
    return {**record, "tok": "abcdefghij12", "tts": "1700000000", "tproof": "A" * 43}


BASES = [
    sighting(ann(Role.CLC, fingerprint=fake_fingerprint("clc"), api_port=8780)),
    sighting(ann(Role.WALRUS, fingerprint=fake_fingerprint("walrus"))),
    sighting(ann(Role.CC, "c1", fingerprint=fake_fingerprint("cc"), api_port=8780)),
    sighting(ann(Role.SC, "c1", fingerprint=fake_fingerprint("sc"))),
    sighting(ann(Role.NC, "c1", fingerprint=fake_fingerprint("nc"), address="fd00::21")),
]
BASE_RECORDS = [(dict(s.txt), s.addresses) for s in BASES]
BASE_RECORDS += [(_with_token(r), a) for r, a in BASE_RECORDS[-2:]]


def test_the_valid_records_decode() -> None:
    for record, addresses in BASE_RECORDS:
        decoded = txt.decode("x", record, addresses)
        assert isinstance(decoded, Announcement), decoded
        decoded_ok(decoded, record, addresses, [], "x")


@budget(1200)
@given(
    base=st.sampled_from(BASE_RECORDS),
    key=st.sampled_from([*TXT_KEYS, "port", *TOKEN_KEYS]) | TEXT,
    value=st.none() | TEXT | ASCIIISH | LONG_TEXT | FOREIGN_DIGITS | near(IP_TEXT),
    keep_addresses=st.booleans(),
)
def test_one_changed_value_decodes_or_is_rejected(
    base: tuple[dict[str, str], tuple[str, ...]], key: str, value: str | None, keep_addresses: bool
) -> None:
    record = dict(base[0])
    if value is None:
        record.pop(key, None)
    else:
        record[key] = value
    addresses = base[1] if keep_addresses else ()
    result = txt.decode("x", record, addresses)
    event(result.code if isinstance(result, txt.Rejected) else "decoded")
    decoded_ok(result, record, addresses, [], "x")


# -- the configuration file --------------------------------------------------------------------

TOML_SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | HUGE_INTS
    | FLOATS
    | TEXT
    | ASCIIISH
    | st.datetimes()
    | st.dates()
    | st.times()
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# Good values, to get past every check, and odd ones near them; maybe() mixes the two.
USABLE_IP_TEXT = st.one_of(
    *(
        st.ip_addresses(network=net).map(str)
        for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8", "2a00::/12")
    )
)
ABSOLUTE_PATH = st.from_regex(r"/[a-z0-9/._-]{0,30}", fullmatch=True)
ODD_PATH = st.one_of(TEXT, TEXT.map(lambda s: "/" + s), near(ABSOLUTE_PATH))
GOOD_DURATION = st.one_of(
    st.integers(1, 3600).map(lambda n: f"{n}s"),
    st.integers(1, 100_000),
    st.floats(0.001, 1e6),
    st.sampled_from(["250ms", "1.5h", " 2d ", "10m"]),
)
ODD_DURATION = DURATION_TEXT | st.integers(-5, 10**10) | FLOATS | near(DURATION_TEXT)
HOSTNAME_TEXT = st.from_regex(grammar.HOSTNAME, fullmatch=True).filter(lambda h: len(h) <= 253)
GOOD_SSHD = st.one_of(
    st.sampled_from(["127.0.0.1:22", "[::1]:22", "::1:22", "localhost:2222", False]),
    st.tuples(HOSTNAME_TEXT, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
)
ODD_SSHD = st.one_of(
    st.sampled_from(["[10.0.0.1]:22", "\x00:22", "a..b:22", ":22", "host:0", True]),
    st.tuples(HOST_TEXT | TEXT, st.integers(-1, 70000)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(HOST_TEXT, st.integers(0, 70000)).map(lambda t: f"[{t[0]}]:{t[1]}"),
)
GOOD_FALLBACK = st.tuples(HOSTNAME_TEXT, st.integers(1, 65535), st.sampled_from(["", "/"])).map(
    lambda t: f"http://{t[0]}:{t[1]}{t[2]}"
)
ODD_FALLBACK = st.tuples(HOST_TEXT | TEXT, st.integers(-1, 70000), st.sampled_from(["", "/"])).map(
    lambda t: f"http://{t[0]}:{t[1]}{t[2]}"
)
TOKEN_TEXT = st.builds(
    lambda i, s, c, pad: f"{pad}eucareg1.{i}.{s}.{c}{pad}",
    valid(grammar.TOKEN_ID),
    valid(grammar.PROOF),
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    st.sampled_from(["", " ", "\n"]),
)
REGISTRAR_KEYS = ("pending_timeout", "hook_timeout", "retry_base", "retry_max", "replace_after")


@st.composite
def maybe(
    draw: st.DrawFn, good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any] | None = None
) -> Any:
    """A good value mostly (a whole file gets past every check often enough), else an odd
    value near it, else anything TOML holds. (Draws of 0 take the common path: hypothesis
    leans towards them.)"""
    roll = draw(st.integers(0, 49))
    if roll < 46:
        return draw(good)
    return draw(odd) if roll < 48 and odd is not None else draw(TOML_VALUES)


TOP_VALUES: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "state_dir": (ABSOLUTE_PATH, ODD_PATH),
    "key_dir": (ABSOLUTE_PATH, ODD_PATH),
    "hook_dir": (ABSOLUTE_PATH, ODD_PATH),
    "api_port": (st.integers(1, 65535), st.integers(-1, 70000) | near(st.just("8780"))),
    "eucalyptus_version": (valid(grammar.VERSION).filter(bool), near(valid(grammar.VERSION))),
    "log_level": (st.sampled_from(["debug", "info", "warning"]), st.just("error") | TEXT),
    "log_format": (st.sampled_from(["text", "json"]), st.just("yaml") | TEXT),
    "fallback_registrar": (GOOD_FALLBACK, ODD_FALLBACK | near(GOOD_FALLBACK)),
    "ca_fingerprint": (valid(grammar.FINGERPRINT), near(valid(grammar.FINGERPRINT))),
    "allowed_ranges": (
        st.lists(networks().map(str), max_size=3),
        st.lists(NETWORK_TEXT | near(NETWORK_TEXT), max_size=3),
    ),
}


@st.composite
def sections(draw: st.DrawFn, values: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    return {k: draw(maybe(*v)) for k, v in values.items() if draw(st.booleans())}


@st.composite
def components(draw: st.DrawFn) -> dict[str, Any]:
    roles = draw(st.lists(st.sampled_from(list(Role)), min_size=1, max_size=3, unique=True))
    cluster = draw(maybe(st.just("c1"), valid(grammar.CLUSTER) | near(valid(grammar.CLUSTER))))
    out: dict[str, Any] = {}
    for role in roles:
        body: dict[str, Any] = {}
        if role.needs_cluster or draw(st.integers(0, 19)) == 19:
            body["cluster"] = cluster
        if draw(st.integers(0, 2)) == 0:
            body["address"] = draw(maybe(USABLE_IP_TEXT, IP_TEXT | near(IP_TEXT)))
        if draw(st.booleans()):
            body["installed"] = draw(maybe(st.just(True) | ABSOLUTE_PATH, ODD_PATH | st.just("")))
        if draw(st.integers(0, 2)) == 0:
            body["token"] = draw(maybe(TOKEN_TEXT, near(TOKEN_TEXT)))
        if draw(st.integers(0, 49)) == 49:
            body.update(draw(st.dictionaries(TEXT, TOML_VALUES, min_size=1, max_size=1)))
        out[role.value] = body
    if draw(st.integers(0, 29)) == 29:
        out[draw(TEXT)] = draw(st.dictionaries(TEXT, TOML_VALUES, max_size=1) | TOML_VALUES)
    return out


@st.composite
def config_mappings(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if draw(st.integers(0, 19)) < 19:  # without it the host's own addresses decide
        raw["address"] = draw(maybe(USABLE_IP_TEXT, IP_TEXT | SITE_IP_TEXT | near(IP_TEXT)))
    raw.update(draw(sections(TOP_VALUES)))
    if draw(st.integers(0, 2)) == 0:
        raw["mdns"] = draw(maybe(st.fixed_dictionaries({}, optional={"ipv6": st.booleans()})))
    if draw(st.integers(0, 2)) == 0:
        good = {"sshd": (GOOD_SSHD, ODD_SSHD), "recheck_interval": (GOOD_DURATION, ODD_DURATION)}
        raw["preconditions"] = draw(maybe(sections(good)))
    if draw(st.integers(0, 2)) == 0:
        good = {k: (GOOD_DURATION, ODD_DURATION) for k in REGISTRAR_KEYS}
        raw["registrar"] = draw(maybe(sections(good)))
    if draw(st.integers(0, 29)) < 29:
        raw["components"] = draw(maybe(components(), st.just({})))
    if draw(st.integers(0, 29)) == 29:
        raw.update(draw(st.dictionaries(TEXT, TOML_VALUES, max_size=2)))
    return raw


def config_ok(cfg: config.Config) -> None:
    """Every value of a loaded configuration satisfies its grammar."""
    allowed = cfg.allowed_ranges
    assert len(allowed) <= MAX_ALLOWED_RANGES
    assert all("%" not in str(n) for n in allowed)
    address_ok(cfg.address, allowed)
    for path in (cfg.state_dir, cfg.key_dir, cfg.hook_dir):
        assert path.is_absolute() and "\0" not in str(path)
    assert type(cfg.api_port) is int and 1 <= cfg.api_port <= 65535
    assert cfg.eucavers and version_ok(cfg.eucavers)
    if cfg.sshd is not None:
        host, port = cfg.sshd
        assert grammar.host(host, "sshd") == host and 1 <= port <= 65535
    for seconds in (
        cfg.recheck_interval,
        cfg.pending_timeout,
        cfg.hook_timeout,
        cfg.retry_base,
        cfg.retry_max,
        cfg.replace_after,
    ):
        assert math.isfinite(seconds) and 0 < seconds <= grammar.MAX_DURATION
    assert type(cfg.ipv6) is bool
    assert cfg.log_level in ("debug", "info", "warning")
    assert cfg.log_format in ("text", "json", "journal")
    assert cfg.components and len({c.role for c in cfg.components}) == len(cfg.components)
    for comp in cfg.components:
        assert (comp.cluster is not None) == comp.role.needs_cluster
        assert comp.cluster is None or cluster_ok(comp.cluster)
        address_ok(comp.address, allowed)
        assert comp.installed is None or (str(comp.installed) and "\0" not in str(comp.installed))
        if comp.token is not None:
            parse_token(comp.token)
    if cfg.fallback_registrar is not None:
        host, port = cfg.fallback_registrar
        assert grammar.host(host, "fallback", ipv6=False) == host and 1 <= port <= 65535
    assert cfg.ca_fingerprint is None or fingerprint_ok(cfg.ca_fingerprint)


def config_error_ok(exc: ConfigError, prefix: str, raw: Iterable[object] = ()) -> None:
    """One line that starts with the key (or the file), with a short echo of the value."""
    message = str(exc)
    assert message.startswith(prefix) and "\n" not in message
    assert len(message) <= len(prefix) + 2 * REASON_MAX + 100, message
    rest = message.removeprefix(prefix)
    keys = {*config._TOP_KEYS, *(shown_key(k) for k in raw if isinstance(k, str))}
    assert any(rest.startswith((f"{k}:", f"{k}.")) for k in keys), message


@budget(700)
@given(raw=config_mappings())
@example(raw={"address": "10.0.0.1", "fallback_registrar": 10**5000, "components": {"clc": {}}})
@example(raw={"address": "10.0.0.1", "state_dir": "/a\x00b", "components": {"clc": {}}})
@example(raw={"address": "10.0.0.1", "api_port": 16**5000, "components": {"clc": {}}})
@example(
    raw={"address": "10.0.0.1", "preconditions": {"sshd": "\x00:22"}, "components": {"clc": {}}}
)
@example(raw={"address": "10.0.0.1", "components": {"\n" * 1000: {}}})
@example(raw={"address": "fe80::1", "allowed_ranges": ["fe80::%eth0/64"], "components": {}})
def test_any_mapping_gives_a_valid_config_or_an_error_naming_the_key(raw: dict[str, Any]) -> None:
    try:
        cfg = config.from_mapping(raw)
    except ConfigError as exc:
        event(f"refused: {str(exc).split(':')[0].split('.')[0]}")
        config_error_ok(exc, "", raw)
        return
    event("loaded")
    config_ok(cfg)


@st.composite
def toml_texts(draw: st.DrawFn) -> bytes:
    """TOML-ish text: lines of keys and values as an operator writes them, some broken."""
    lines: list[str] = []
    sections = ["", "[preconditions]", "[registrar]", "[mdns]"]
    sections += [f"[components.{r.value}]" for r in Role]
    for _ in range(draw(st.integers(0, 8))):
        section = draw(st.sampled_from(sections) | TEXT.map(lambda s: f"[{s}]"))
        key = draw(
            st.sampled_from(
                [*config._TOP_KEYS, "cluster", "token", "installed", "sshd", "ipv6", "retry_base"]
            )
            | TEXT.map(json.dumps)
        )
        value = draw(
            st.one_of(
                (TEXT | IP_TEXT | DURATION_TEXT | ODD_SSHD | TOKEN_TEXT).map(json.dumps),
                st.integers(-(2**63), 2**63 - 1).map(str),
                st.sampled_from(["true", "false", "nan", "inf", "[]", "{}", "1979-05-27"]),
                st.sampled_from(["[" * 2000, "{a=" * 2000, "1" * 5000, "0x" + "f" * 5000]),
                TEXT,
            )
        )
        lines += [section, f"{key} = {value}"]
    text = "\n".join(lines)
    if draw(st.booleans()):
        text = 'address = "10.0.0.1"\n[components.clc]\n' + text
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grammar-properties") / "eucareg.toml"


@budget(350)
@given(
    data=st.binary(max_size=200)
    | toml_texts()
    | st.sampled_from(
        [
            b"[" * 2000,
            b"a = " + b"[" * 2000,
            b"a = " + b"{a=" * 2000,
            b"api_port = " + b"1" * 5000,  # tomllib raised ValueError
            b"api_port = 0x" + b"f" * 5000,
            b"\xff\xfe\x00a",
            'address = "\u0661\u0660.\u0660.\u0660.\u0661"\n[components.clc]\n'.encode(),
            b'address = "10.0.0.1"\n[components.clc]\ninstalled = "/a\\u0000b"\n',
        ]
    )
)
def test_any_file_gives_a_valid_config_or_an_error_naming_the_file(
    scratch: Path, data: bytes
) -> None:
    scratch.write_bytes(data)
    try:
        cfg = config.load(scratch)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{scratch}: ") and "\n" not in message
        assert len(message) <= len(str(scratch)) + 2 * REASON_MAX + 100 + 200, message
        event("refused: " + message.removeprefix(f"{scratch}: ").split(":")[0][:20])
        return
    event("loaded")
    config_ok(cfg)


def test_the_suite_runs_at_least_10000_examples() -> None:
    """The issue asks for 10,000 examples at least (hypothesis may stop a property early
    when it has tried every distinct input, so this is the budget, not a count of runs)."""
    assert sum(_BUDGETS) >= 10_000, sum(_BUDGETS)


def toml(value: Any) -> str:
    """A value as TOML writes it (inline tables for tables); some renderings are not TOML
    (a lone surrogate, a raw DEL), and then the file is refused."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() < 4000 else hex(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))
        )
    if isinstance(value, str):
        return json.dumps(value)  # the same escapes as a TOML basic string
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(map(toml, value)) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + "}"


@budget(400)
@given(raw=config_mappings())
@example(raw={"address": "10.0.0.1", "api_port": 16**5000, "components": {"clc": {}}})
def test_a_file_loads_as_its_mapping_does(scratch: Path, raw: dict[str, Any]) -> None:
    text = "\n".join(f"{json.dumps(k)} = {toml(v)}" for k, v in raw.items())
    scratch.write_text(text, "utf-8", "surrogatepass")
    try:  # equal and alike: time(0, 0, fold=1) == time(0, 0), but the two print differently
        parsed = tomllib.loads(text)
        same = parsed == raw and repr(parsed) == repr(raw)
    except (ValueError, RecursionError):
        same = False
    try:
        cfg = config.load(scratch)
    except ConfigError as exc:
        event("refused")
        if same:
            with pytest.raises(ConfigError) as direct:
                config.from_mapping(raw)
            assert str(exc) == f"{scratch}: {direct.value}"
        return
    event("loaded")
    config_ok(cfg)
    if same:
        assert dataclasses.replace(cfg, source=None) == config.from_mapping(raw)
