"""The `[dnssd]` table: wide-area DNS-SD through the site's DNS server (docs/dnssd.md), its
domain, server and TSIG keys, and the templates that name each component's key and its file.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eucareg.core import grammar

from . import values
from .values import ConfigError, shown

# Each component's TSIG key is named after its instance by default, which the update-policy
# rule `grant * selfsub * ...` confines to its own names.
DEFAULT_DNSSD_KEY_NAME = "{instance}._eucalyptus._tcp.{domain}"
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
DNSSD_PLACEHOLDERS = ("instance", "role", "domain")


@dataclass(frozen=True)
class DnssdConfig:
    """The `[dnssd]` table: announce and browse through the site's DNS server as well
    (eucareg/dnssd, docs/dnssd.md)."""

    domain: str  # absolute and lower case: "site.example."
    server: tuple[str, int]  # an IP address, and the port
    # Templates: {instance} (e.g. node-nc-0123456789ab), {role} (nc) and {domain}.
    tsig_key_name: str
    tsig_secret_file: str
    tsig_algorithm: str = "hmac-sha256"
    # The key a registrar deletes stale components' records with (none: it never prunes).
    prune_key_name: str | None = None
    prune_secret_file: Path | None = None
    refresh: float = 60.0  # each component rewrites its records this often
    browse_interval: float = 5.0  # the domain is browsed this often
    mdns: bool = True  # announce and browse over mDNS too


_DNSSD_KEYS = {
    "enabled",
    "domain",
    "server",
    "tsig_key_name",
    "tsig_algorithm",
    "tsig_secret_file",
    "prune_key_name",
    "prune_secret_file",
    "refresh",
    "browse_interval",
    "mdns",
}
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", re.ASCII)
# What each placeholder may expand to, for checking a template: the longest instance label.
_PLACEHOLDER_SAMPLES = {"instance": "storage-sc-0123456789ab", "role": "walrus"}


def parse(value: Any, components: int) -> DnssdConfig | None:
    """The `[dnssd]` table of a host running `components` components; None when it is absent
    or disabled."""
    if value is None:
        return None
    table = values.table(value, "dnssd")
    values.no_unknown(table, _DNSSD_KEYS, "dnssd.")
    enabled = values.boolean(table.get("enabled", True), "dnssd.enabled")
    if "domain" not in table:
        raise ConfigError(
            "dnssd.domain: required; the DNS domain to announce in, e.g. 'site.example'"
        )
    domain = _domain(table["domain"])
    if "server" not in table:
        raise ConfigError("dnssd.server: required; 'ADDRESS' or 'ADDRESS:PORT' of the DNS server")
    server = _dns_server(table["server"])
    key_name = _dns_name_template(
        table.get("tsig_key_name", DEFAULT_DNSSD_KEY_NAME), "dnssd.tsig_key_name", domain
    )
    if "tsig_secret_file" not in table:
        raise ConfigError(
            "dnssd.tsig_secret_file: required; the file holding the TSIG key's secret "
            "(base64, or tsig-keygen's output)"
        )
    secret_file = _path_template(table["tsig_secret_file"], "dnssd.tsig_secret_file")
    per_component = any(f"{{{p}}}" in key_name for p in ("instance", "role"))
    if per_component and components > 1 and "{" not in secret_file:
        raise ConfigError(
            "dnssd.tsig_secret_file: this host's components have keys of their own "
            f"(tsig_key_name {shown(key_name)}), so name their files apart with {{role}} or "
            f"{{instance}}, e.g. '/etc/eucareg/dnssd/{{role}}.key'; got {shown(secret_file)}"
        )
    algorithm = values.choice(
        table.get("tsig_algorithm", "hmac-sha256"), "dnssd.tsig_algorithm", TSIG_ALGORITHMS
    )
    prune_name, prune_file = table.get("prune_key_name"), table.get("prune_secret_file")
    if (prune_name is None) != (prune_file is None):
        missing = "prune_secret_file" if prune_file is None else "prune_key_name"
        raise ConfigError(
            f"dnssd.{missing}: required with "
            f"dnssd.{'prune_key_name' if prune_file is None else 'prune_secret_file'}"
        )
    if prune_name is not None:
        prune_name = _dns_name_template(prune_name, "dnssd.prune_key_name", domain, fixed=True)
        prune_file = values.path(prune_file, "dnssd.prune_secret_file")
    config = DnssdConfig(
        domain=domain,
        server=server,
        tsig_key_name=key_name,
        tsig_secret_file=secret_file,
        tsig_algorithm=algorithm,
        prune_key_name=prune_name,
        prune_secret_file=prune_file,
        refresh=values.interval(table.get("refresh", "60s"), "dnssd.refresh"),
        browse_interval=values.interval(
            table.get("browse_interval", "5s"), "dnssd.browse_interval"
        ),
        mdns=values.boolean(table.get("mdns", True), "dnssd.mdns"),
    )
    return config if enabled else None


def _is_dns_name(name: str) -> bool:
    labels = name.removesuffix(".").split(".")
    return len(name.removesuffix(".")) <= 253 and all(_DNS_LABEL.fullmatch(x) for x in labels)


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not value or not _is_dns_name(value):
        raise ConfigError(
            f"dnssd.domain: expected a DNS domain such as 'site.example', got {shown(value)}"
        )
    domain = value.lower().removesuffix(".")
    if domain == "local" or domain.endswith(".local"):
        raise ConfigError(
            f"dnssd.domain: {shown(value)} is the mDNS domain; name the site's own DNS domain"
        )
    return domain + "."


def _dns_server(value: Any) -> tuple[str, int]:
    match = (
        re.fullmatch(
            r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+))(?::(?P<port>[0-9]{1,5}))?", value
        )
        if isinstance(value, str)
        else None
    )
    problem = "expected 'ADDRESS' or 'ADDRESS:PORT' ('[ADDRESS]:PORT' for IPv6) of the DNS server"
    if match is None:
        raise ConfigError(f"dnssd.server: {problem}, got {shown(value)}")
    host = match["v6"] or match["v4"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"dnssd.server: {problem}, got {shown(value)}") from None
    port = grammar.integer_or_none(match["port"], 1, 65535) if match["port"] else 53
    if port is None:
        raise ConfigError(f"dnssd.server: {match['port']!r} is not a port (1-65535)")
    return str(address), port


def _placeholders(value: str, key: str) -> set[str]:
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError:
        raise ConfigError(
            f"{key}: unbalanced braces in {shown(value)}; placeholders are "
            + ", ".join(f"{{{p}}}" for p in DNSSD_PLACEHOLDERS)
        ) from None
    names = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in DNSSD_PLACEHOLDERS or spec or conversion:
            raise ConfigError(
                f"{key}: unknown placeholder {{{shown(name)[1:-1]}}}; expected "
                + ", ".join(f"{{{p}}}" for p in DNSSD_PLACEHOLDERS)
            )
        names.add(name)
    return names


def expand_template(template: str, *, instance: str, role: str, domain: str) -> str:
    """A [dnssd] template with its placeholders filled in (docs/dnssd.md)."""
    return template.format(instance=instance, role=role, domain=domain.removesuffix("."))


def _dns_name_template(value: Any, key: str, domain: str, *, fixed: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a TSIG key name, got {shown(value)}")
    names = _placeholders(value, key)
    if fixed and names:
        raise ConfigError(f"{key}: one key for every instance; no placeholders, got {shown(value)}")
    sample = expand_template(value, domain=domain, **_PLACEHOLDER_SAMPLES)
    if not _is_dns_name(sample):
        raise ConfigError(f"{key}: {shown(value)} is not a DNS name (TSIG keys are named like one)")
    return value


def _path_template(value: Any, key: str) -> str:
    path = values.path(value, key)
    _placeholders(str(path), key)
    return str(path)
