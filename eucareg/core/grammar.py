"""One exact grammar for every value that crosses a trust boundary: ids, cluster names, key
fingerprints, token fields, versions, ports, counts, times, durations and addresses. TXT
decoding, the HTTP API, the configuration file and the CLI all parse through these functions.

Each parser takes an untrusted value and returns the typed value, or raises Invalid naming the
field and what was wrong. Nothing else escapes: no int() of Unicode digits, no NaN or infinity,
no regex that lets a trailing newline through, no unbounded number.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from eucareg.core.model import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Invalid(ValueError):
    """An input value outside its grammar; `field` names it, `reason` says what was wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# re.ASCII: \d and \w would otherwise match every script's digits and letters. Each pattern is
# used with fullmatch, so "$" can never accept a trailing newline.
COMPONENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{7,63}", re.ASCII)
CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
TOKEN_ID = re.compile(r"[a-z0-9]{12}", re.ASCII)
PROOF = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)
# Eucalyptus versions as packages write them ("1.6.2", "2.0~bzr1234-0ubuntu1"); may be empty.
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}|", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
# A host name as the resolver takes it: dot-separated labels of 1-63 letters, digits and '-'
# (an empty or longer label, a NUL or a non-ASCII letter makes getaddrinfo raise, not fail).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_DURATION = re.compile(r"[ \t]*([0-9]{1,400}(?:\.[0-9]{1,9})?)[ \t]*(ms|s|m|h|d)?[ \t]*", re.ASCII)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

MAX_DURATION = 10 * 365 * 86400.0  # longer is a typo, and overflows timestamps further down
MAX_TIME = 2**34  # seconds since the epoch: year 2514; leaves room in 64-bit arithmetic
_SHOWN = 40  # an echoed value is cut to this many characters


def shown(value: object) -> str:
    """A value for an error message: its repr, cut short (input may be huge or hostile)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        # repr() refuses ints of more than 4300 digits and lists nested past the stack.
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _matched(pattern: re.Pattern[str], value: object, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise Invalid(field, f"expected {what}, got {_kind(value)}")
    if not pattern.fullmatch(value):
        raise Invalid(field, f"{shown(value)} is not {what}")
    return value


def component_id(value: object, field: str = "id") -> str:
    return _matched(COMPONENT_ID, value, field, "a component id (8-64 of a-z 0-9 -)")


def cluster(value: object, field: str = "cluster") -> str:
    return _matched(CLUSTER, value, field, "a cluster name (1-64 of A-Z a-z 0-9 _ . -)")


def fingerprint(value: object, field: str = "fingerprint") -> str:
    return _matched(FINGERPRINT, value, field, "a key fingerprint (sha256: and 64 hex digits)")


def token_id(value: object, field: str = "token") -> str:
    return _matched(TOKEN_ID, value, field, "a token id (12 of a-z 0-9)")


def proof(value: object, field: str = "tproof") -> str:
    return _matched(PROOF, value, field, "a token proof (43 base64url characters)")


def version(value: object, field: str = "eucavers") -> str:
    return _matched(VERSION, value, field, "a version (up to 64 of A-Z a-z 0-9 . + ~ _ -)")


def integer(value: object, field: str, low: int, high: int) -> int:
    """A whole number in [low, high]: a JSON/TOML integer, or a string of ASCII digits."""
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise Invalid(field, f"{shown(value)} is not a number (ASCII digits only)")
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise Invalid(field, f"expected a whole number, got {_kind(value)}")
    if not low <= number <= high:
        raise Invalid(field, f"must be between {low} and {high}, got {shown(number)}")
    return number


def integer_or_none(value: object, low: int, high: int) -> int | None:
    """integer() for callers that only need yes or no."""
    try:
        return integer(value, "value", low, high)
    except Invalid:
        return None


def port(value: object, field: str = "port") -> int:
    return integer(value, field, 1, 65535)


def timestamp(value: object, field: str = "time") -> int:
    """Whole seconds since the epoch."""
    return integer(value, field, 0, MAX_TIME)


def duration(value: object, field: str, *, high: float = MAX_DURATION) -> float:
    """Seconds, from a number or a string such as '30s', '5m', '1.5h', '2d': finite, more
    than zero and at most `high`."""
    if isinstance(value, bool):
        raise Invalid(field, f"expected a duration such as '30s', got {_kind(value)}")
    if isinstance(value, int | float):
        seconds = _as_float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise Invalid(field, f"expected a duration such as '30s', '5m' or '1h', got {shown(value)}")
    if math.isnan(seconds) or seconds <= 0:
        raise Invalid(field, f"must be longer than zero (and finite), got {shown(value)}")
    if seconds > high:  # infinity too
        raise Invalid(field, f"must be at most {_span(high)}, got {shown(value)}")
    return seconds


def _as_float(value: int | float) -> float:
    # float() of an int beyond 1e308 raises OverflowError; it is simply too long.
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# -- addresses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    network: IPNetwork
    why: str  # completes "... is ..."


def _ranges(*rows: tuple[str, str]) -> tuple[Range, ...]:
    return tuple(Range(ipaddress.ip_network(net), why) for net, why in rows)


# What a component may never be registered at (IANA special-purpose registries, RFC 6890 and
# successors). Python's is_private/is_global are not used: they call 0.1.2.3, ::ffff:127.0.0.1,
# 255.255.255.255 and 192.0.2.21 private. An allow-list can admit the ranges marked "site".
REFUSED: tuple[Range, ...] = _ranges(
    ("0.0.0.0/8", "in 0.0.0.0/8 (this network; 0.0.0.0 is unspecified)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("240.0.0.0/4", "in 240.0.0.0/4 (reserved)"),
    ("192.0.2.0/24", "a documentation address (192.0.2.0/24)"),
    ("198.51.100.0/24", "a documentation address (198.51.100.0/24)"),
    ("203.0.113.0/24", "a documentation address (203.0.113.0/24)"),
    ("192.0.0.0/24", "in 192.0.0.0/24 (IETF protocol assignments)"),
    ("198.18.0.0/15", "in 198.18.0.0/15 (benchmarking)"),
    ("192.88.99.0/24", "in 192.88.99.0/24 (6to4 relay anycast)"),
    ("100.64.0.0/10", "in 100.64.0.0/10 (shared address space; allow it per site)"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("::ffff:0:0/96", "an IPv4-mapped address (announce the IPv4 address itself)"),
    ("::/96", "an IPv4-compatible address (deprecated)"),
    ("64:ff9b::/96", "in 64:ff9b::/96 (NAT64 translation)"),
    ("64:ff9b:1::/48", "in 64:ff9b:1::/48 (local NAT64 translation)"),
    ("100::/64", "in 100::/64 (discard-only)"),
    ("2001::/23", "in 2001::/23 (IETF protocol assignments, Teredo, benchmarking)"),
    ("2001:db8::/32", "a documentation address (2001:db8::/32)"),
    ("3fff::/20", "a documentation address (3fff::/20)"),
    ("2002::/16", "a 6to4 address (deprecated)"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address (deprecated)"),
    ("ff00::/8", "a multicast address"),
)
_MAPPED = next(row for row in REFUSED if str(row.network) == "::ffff:0:0/96")
# Usable by default: the private ranges and global unicast (what REFUSED leaves of it).
USABLE: tuple[Range, ...] = _ranges(
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("fc00::/7", "unique-local"),
    ("2000::/3", "global unicast"),
    ("0.0.0.0/0", "global unicast"),
)


def network(value: object, field: str = "allowed_ranges") -> IPNetwork:
    """A CIDR range for a site's allow-list, e.g. '100.64.0.0/10'; no IPv6 scope."""
    if not isinstance(value, str) or not value.isascii() or len(value) > 64:
        raise Invalid(field, f"expected a range such as '100.64.0.0/10', got {shown(value)}")
    if "%" in value:
        raise Invalid(field, f"{shown(value)} carries an IPv6 scope; scoped ranges are refused")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise Invalid(field, f"{shown(value)} is not a network range ({exc})") from None


def peer_address(text: str | None) -> IPAddress | None:
    """An address as a socket or a responder reports it, normalised for comparison: no IPv6
    scope, an IPv4-mapped IPv6 address as the IPv4 address; None if it is not one. (Not for
    untrusted input that must be refused: `address` is.)"""
    try:
        parsed = ipaddress.ip_address((text or "").partition("%")[0])
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def address_problem(address: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why an address must never be registered, or None when it is usable (lesson L3). A
    range in `allowed` (the site's allow-list) wins over the refusals, but never over the
    IPv4-mapped form: that is an IPv4 address in disguise, checked as such or not at all."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return f"is {_MAPPED.why}"
    if any(address in net for net in allowed if net.version == address.version):
        return None
    for row in REFUSED:
        if row.network.version == address.version and address in row.network:
            return f"is {row.why}"
    if not any(row.network.version == address.version and address in row.network for row in USABLE):
        return "is not a unicast address that can be routed inside a site"
    return None


def address(value: object, field: str = "addr", allowed: Iterable[IPNetwork] = ()) -> IPAddress:
    """A preferred address as written: no scope, no IPv4-mapped form, nothing special."""
    if not isinstance(value, str):
        raise Invalid(field, f"expected an IP address, got {_kind(value)}")
    if "%" in value:
        raise Invalid(field, f"{shown(value)} carries an IPv6 scope; scoped addresses are refused")
    # ip_address accepts only ASCII digits and hex, but says so unclearly for other scripts.
    if not value.isascii() or len(value) > 45:
        raise Invalid(field, f"{shown(value)} is not an IP address")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(field, f"{shown(value)} is not an IP address") from None
    problem = address_problem(parsed, allowed)
    if problem is not None:
        raise Invalid(field, f"{value} {problem}")
    return parsed


def host(value: object, field: str, *, ipv6: bool = True) -> str:
    """A host to connect to: a host name (HOSTNAME) or an IP address literal, IPv6 only when
    `ipv6`; no scope. Returned as written (an IPv6 literal without brackets)."""
    if not isinstance(value, str):
        raise Invalid(field, f"expected a host name or address, got {_kind(value)}")
    if len(value) <= 253 and HOSTNAME.fullmatch(value):
        return value
    if ipv6 and value.isascii() and 2 <= len(value) <= 45 and "%" not in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            pass
        else:
            return value
    raise Invalid(field, f"{shown(value)} is not a host name or address")


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {shown(value)}"
    return names.get(type(value), type(value).__name__)
