"""Checks of single configuration values (strings, paths, addresses, ports, counts, durations),
shared by the parsers of each table; each raises a ConfigError naming the key and the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ifaddr

from eucareg.core import grammar
from eucareg.core.grammar import Invalid, IPNetwork
from eucareg.core.model import IPAddress

MAX_ALLOWED_RANGES = 64
MAX_COUNT = 10_000_000  # the largest history or record limit a configuration may ask for


class ConfigError(Exception):
    """A configuration problem; the message names the file, the key and the reason."""


def parse_duration(value: Any, key: str, high: float = grammar.MAX_DURATION) -> float:
    """A duration through the one grammar (core/grammar.py); ConfigError names the key."""
    try:
        return grammar.duration(value, key, high=high)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def interval(value: Any, key: str) -> float:
    seconds = parse_duration(value, key, 3600.0)
    if seconds < 1.0:
        # A component renews within this: below a second it would do little else.
        raise ConfigError(f"{key}: at least 1s, got {shown(value)}")
    return seconds


def usable_addresses() -> list[IPAddress]:
    """This host's addresses that may be announced: no loopback, no link-local (lesson L3)."""
    found: list[IPAddress] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                address = ipaddress.ip_address(raw)
            except ValueError:
                continue
            if address.version == 4 and grammar.address_problem(address) is None:
                found.append(address)
    return sorted(set(found), key=str)


def registrar_url(value: Any, key: str) -> tuple[str, int]:
    """(host, port) of a registrar's 'https://HOST:PORT'; ConfigError naming `key`."""
    match = (
        re.fullmatch(r"https?://(?P<host>[^:/]{1,253}):(?P<port>[0-9]{1,5})/?", value, re.ASCII)
        if isinstance(value, str)
        else None
    )
    if (
        match is None
        or grammar.integer_or_none(match["port"], 1, 65535) is None
        or not is_host(match["host"], ipv6=False)
    ):
        raise ConfigError(f"{key}: expected 'https://HOST:PORT' of a registrar, got {shown(value)}")
    return match["host"], int(match["port"])


def is_host(value: str, *, ipv6: bool) -> bool:
    try:
        grammar.host(value, "host", ipv6=ipv6)
    except Invalid:
        return False
    return True


def shown(value: Any) -> str:
    """A value for a message, cut short (grammar.shown)."""
    return grammar.shown(value)


def shown_key(name: str) -> str:
    """A key from the file as a message names it: as written, or quoted and cut if odd."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name, re.ASCII) else shown(name)


def no_unknown(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{prefix}{shown_key(unknown[0])}: unknown key "
            f"(allowed here: {', '.join(sorted(allowed))})"
        )


def table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {shown(value)}")
    return value


def string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {shown(value)}")
    return value


def choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {shown(value)}")
    return str(value)


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    return value


def path(value: Any, key: str) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{key}: expected a path, got {shown(value)}")
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"{key}: {shown(value)} must be an absolute path")
    return path


def address(value: Any, key: str, *, auto: bool, allowed: tuple[IPNetwork, ...] = ()) -> IPAddress:
    if value is None and auto:
        candidates = usable_addresses()
        if len(candidates) == 1:
            return candidates[0]
        listed = ", ".join(map(str, candidates)) or "none"
        raise ConfigError(
            f"{key}: not set, and this host has {len(candidates)} usable addresses ({listed}); "
            "set the preferred one, eucareg never guesses between addresses"
        )
    try:
        return grammar.address(value, key, allowed)
    except Invalid as exc:
        raise ConfigError(f"{exc}; it cannot be registered") from None


def ranges(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list) or len(value) > MAX_ALLOWED_RANGES:
        raise ConfigError(
            f"allowed_ranges: expected a list of at most {MAX_ALLOWED_RANGES} ranges such as "
            f"'100.64.0.0/10', got {grammar.shown(value)}"
        )
    try:
        return tuple(grammar.network(item, "allowed_ranges") for item in value)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def count(value: Any, key: str) -> int:
    """A limit on stored things: a whole number from 100 to 10,000,000."""
    try:
        return grammar.integer(value, key, 100, MAX_COUNT)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def bounded(value: Any, key: str, low: int, high: int) -> int:
    """A whole number from `low` to `high` (request limits)."""
    try:
        return grammar.integer(value, key, low, high)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def port(value: Any, key: str) -> int:
    try:
        return grammar.port(value, key)
    except Invalid as exc:
        raise ConfigError(f"{key}: expected a TCP port number (1-65535); {exc.reason}") from None
