"""The agent's configuration file (TOML): parsing, defaults and validation.

Every problem is reported as a ConfigError naming the key and the reason, and the agent does not
start. docs/configuration.md documents each key; keep the two in step.
"""

from __future__ import annotations

import ipaddress
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ifaddr

from eucareg.core import grammar
from eucareg.core.grammar import Invalid, IPNetwork
from eucareg.core.model import IPAddress, Role
from eucareg.core.renewal import DEFAULT_POLICY, RenewalPolicy
from eucareg.core.trust import TokenError, parse_token

from .eucalyptus import EucalyptusConfigError, EucalyptusKeys
from .eucalyptus import parse as parse_eucalyptus

DEFAULT_STATE_DIR = Path("/var/lib/eucareg")
SOCKET_FILE = "api.sock"  # the operator API socket, in state_dir (docs/cli.md)
DEFAULT_HOOK_DIR = Path("/etc/eucareg/hooks")
DEFAULT_API_PORT = 8780
MDNS_BACKENDS = ("auto", "avahi", "zeroconf")  # [mdns] backend (docs/mdns.md)
DEFAULT_SSHD = "127.0.0.1:22"
DEFAULT_EUCAVERS = "3.4"

# dpkg keeps a file list for every installed package; its presence means "installed".
PACKAGES = {
    Role.CLC: "eucalyptus-cloud",
    Role.WALRUS: "eucalyptus-walrus",
    Role.CC: "eucalyptus-cc",
    Role.SC: "eucalyptus-sc",
    Role.NC: "eucalyptus-nc",
}

MAX_CONFIG_BYTES = 1024 * 1024  # a configuration is a few hundred bytes
MAX_ALLOWED_RANGES = 64
MAX_COUNT = 10_000_000  # the largest history or record limit a configuration may ask for
MAX_RATE = 1_000_000  # the largest request rate, burst or in-flight limit (effectively none)

# Wide-area DNS-SD (docs/dnssd.md): each component's TSIG key is named after its instance by
# default, which the update-policy rule `grant * selfsub * ...` confines to its own names.
DEFAULT_DNSSD_KEY_NAME = "{instance}._eucalyptus._tcp.{domain}"
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
DNSSD_PLACEHOLDERS = ("instance", "role", "domain")


class ConfigError(Exception):
    """A configuration problem; the message names the file, the key and the reason."""


@dataclass(frozen=True)
class ComponentConfig:
    role: Role
    cluster: str | None
    address: IPAddress
    # Path whose existence means "installed", or None to skip the check.
    installed: Path | None
    # Join token the operator issued for this component (eucareg1.…), if any.
    token: str | None = None


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


@dataclass(frozen=True)
class Config:
    source: Path | None
    address: IPAddress
    state_dir: Path
    key_dir: Path
    hook_dir: Path
    api_port: int
    eucavers: str
    sshd: tuple[str, int] | None
    recheck_interval: float
    pending_timeout: float
    hook_timeout: float
    retry_base: float
    retry_max: float
    replace_after: float
    ipv6: bool
    log_level: str
    log_format: str
    components: tuple[ComponentConfig, ...] = field(default_factory=tuple)
    # (host, port) of a registrar to use over HTTP when none is heard over mDNS ...
    fallback_registrar: tuple[str, int] | None = None
    # ... for this long after the agent starts (docs/registration.md, "Past the LAN").
    fallback_after: float = 10.0
    # How often a component heard over HTTP must announce itself again (it stays heard for
    # three of these); set on the registrar, which tells its callers.
    report_interval: float = 30.0
    # Ranges the site admits besides the private ones and global unicast (e.g. 100.64.0.0/10).
    allowed_ranges: tuple[IPNetwork, ...] = ()
    # The cloud CA's key fingerprint components accept credentials from (a token's pin wins).
    ca_fingerprint: str | None = None
    # History kept (events, hook runs) and records of unadmitted components (docs/security.md).
    keep_history: float = 90 * 86400.0
    max_events: int = 200_000
    max_hook_runs: int = 50_000
    max_unadmitted: int = 5000
    max_hooks_running: int = 64  # registration hooks running at once; the rest queue
    # Roles whose hooks may run as one batch (docs/hooks.md, "Batches"), how many at most, and
    # how long the first of a batch waits for others to join it.
    batch_hooks: frozenset[Role] = frozenset()
    batch_max: int = 100
    batch_wait: float = 0.5
    # Unauthenticated requests: per source (a second, and at once), sources tracked, and
    # being answered at once (eucareg/api/limits.py, docs/security.md).
    rate_limit: int = 10
    rate_burst: int = 100
    rate_sources: int = 10_000
    max_in_flight: int = 1000
    # Wide-area DNS-SD through the site's DNS server, besides (or instead of) mDNS.
    dnssd: DnssdConfig | None = None
    # mDNS through "zeroconf" (python-zeroconf), "avahi" (the host's avahi-daemon over D-Bus),
    # or "auto": Avahi when it runs in this network namespace (docs/mdns.md).
    mdns_backend: str = "auto"
    # How long the certificates this registrar issues last, and how long before their end
    # they are renewed (docs/credentials.md, "Renewal").
    certificates: RenewalPolicy = DEFAULT_POLICY
    # Delivering Eucalyptus's own key files (the `[eucalyptus]` table; off by default).
    eucalyptus: EucalyptusKeys = field(default_factory=EucalyptusKeys)

    def component(self, role: Role) -> ComponentConfig | None:
        return next((c for c in self.components if c.role is role), None)

    @property
    def runs_registrar(self) -> bool:
        return any(c.role in (Role.CLC, Role.CC) for c in self.components)

    @property
    def database(self) -> Path:
        return self.state_dir / "registry.db"


def parse_duration(value: Any, key: str, high: float = grammar.MAX_DURATION) -> float:
    """A duration through the one grammar (core/grammar.py); ConfigError names the key."""
    try:
        return grammar.duration(value, key, high=high)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


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


def load(path: Path) -> Config:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a configuration")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except ValueError:
        # tomllib's int() refuses integers of more than 4300 digits with a bare ValueError.
        raise ConfigError(f"{path}: not valid TOML: a number too long to be one") from None
    except RecursionError:
        # tomllib recurses once per nesting level of arrays and inline tables.
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None
    try:
        return from_mapping(raw, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


_TOP_KEYS = {
    "address",
    "state_dir",
    "key_dir",
    "hook_dir",
    "api_port",
    "eucalyptus_version",
    "log_level",
    "log_format",
    "preconditions",
    "registrar",
    "mdns",
    "components",
    "fallback_registrar",
    "fallback_after",
    "ca_fingerprint",
    "allowed_ranges",
    "dnssd",
    "eucalyptus",
}


def from_mapping(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    _no_unknown(raw, _TOP_KEYS, "")
    allowed = _ranges(raw.get("allowed_ranges", []))
    address = _address(raw.get("address"), "address", auto=True, allowed=allowed)
    state_dir = _path(raw.get("state_dir", DEFAULT_STATE_DIR), "state_dir")
    key_dir = _path(raw.get("key_dir", state_dir / "keys"), "key_dir")
    hook_dir = _path(raw.get("hook_dir", DEFAULT_HOOK_DIR), "hook_dir")
    api_port = _port(raw.get("api_port", DEFAULT_API_PORT), "api_port")
    eucavers = _string(raw.get("eucalyptus_version", DEFAULT_EUCAVERS), "eucalyptus_version")
    try:
        grammar.version(eucavers, "eucalyptus_version")
    except Invalid as exc:
        raise ConfigError(str(exc)) from None
    log_level = _choice(raw.get("log_level", "info"), "log_level", ("debug", "info", "warning"))
    log_format = _choice(raw.get("log_format", "text"), "log_format", ("text", "json", "journal"))

    pre = _table(raw.get("preconditions", {}), "preconditions")
    _no_unknown(pre, {"sshd", "recheck_interval"}, "preconditions.")
    sshd = _sshd(pre.get("sshd", DEFAULT_SSHD))
    recheck = parse_duration(pre.get("recheck_interval", "5s"), "preconditions.recheck_interval")

    reg = _table(raw.get("registrar", {}), "registrar")
    _no_unknown(
        reg,
        {
            "pending_timeout",
            "hook_timeout",
            "retry_base",
            "retry_max",
            "replace_after",
            "keep_history",
            "max_events",
            "max_hook_runs",
            "max_unadmitted",
            "max_hooks_running",
            "batch_hooks",
            "batch_max",
            "batch_wait",
            "rate_limit",
            "rate_burst",
            "rate_sources",
            "max_in_flight",
            "report_interval",
            "certificate_lifetime",
            "certificate_renew_before",
        },
        "registrar.",
    )
    mdns = _table(raw.get("mdns", {}), "mdns")
    _no_unknown(mdns, {"ipv6", "backend"}, "mdns.")
    ipv6 = mdns.get("ipv6", False)
    if not isinstance(ipv6, bool):
        raise ConfigError(f"mdns.ipv6: expected true or false, got {_shown(ipv6)}")
    mdns_backend = mdns.get("backend", "auto")
    if mdns_backend not in MDNS_BACKENDS:
        raise ConfigError(
            f"mdns.backend: expected one of {', '.join(map(repr, MDNS_BACKENDS))}, "
            f"got {_shown(mdns_backend)}"
        )

    components = _components(raw.get("components"), address, allowed)
    fallback = _fallback(raw.get("fallback_registrar"))
    ca_fingerprint = raw.get("ca_fingerprint")
    if ca_fingerprint is not None and (
        not isinstance(ca_fingerprint, str) or not grammar.FINGERPRINT.fullmatch(ca_fingerprint)
    ):
        raise ConfigError(
            f"ca_fingerprint: expected 'sha256:' and 64 hex digits (eucareg fingerprint on the "
            f"CLC shows it), got {_shown(ca_fingerprint)}"
        )
    return Config(
        source=source,
        address=address,
        state_dir=state_dir,
        key_dir=key_dir,
        hook_dir=hook_dir,
        api_port=api_port,
        eucavers=eucavers,
        sshd=sshd,
        recheck_interval=recheck,
        pending_timeout=parse_duration(
            reg.get("pending_timeout", "1h"), "registrar.pending_timeout"
        ),
        hook_timeout=parse_duration(reg.get("hook_timeout", "60s"), "registrar.hook_timeout"),
        retry_base=parse_duration(reg.get("retry_base", "2s"), "registrar.retry_base"),
        retry_max=parse_duration(reg.get("retry_max", "5m"), "registrar.retry_max"),
        replace_after=parse_duration(reg.get("replace_after", "10m"), "registrar.replace_after"),
        keep_history=parse_duration(reg.get("keep_history", "90d"), "registrar.keep_history"),
        max_events=_count(reg.get("max_events", 200_000), "registrar.max_events"),
        max_hook_runs=_count(reg.get("max_hook_runs", 50_000), "registrar.max_hook_runs"),
        max_unadmitted=_count(reg.get("max_unadmitted", 5000), "registrar.max_unadmitted"),
        max_hooks_running=_bounded(
            reg.get("max_hooks_running", 64), "registrar.max_hooks_running", 1, 1024
        ),
        batch_hooks=_batch_hooks(reg.get("batch_hooks", [])),
        batch_max=_bounded(reg.get("batch_max", 100), "registrar.batch_max", 2, 10_000),
        batch_wait=parse_duration(reg.get("batch_wait", "500ms"), "registrar.batch_wait", 60.0),
        rate_limit=_bounded(reg.get("rate_limit", 10), "registrar.rate_limit", 1, MAX_RATE),
        rate_burst=_bounded(reg.get("rate_burst", 100), "registrar.rate_burst", 1, MAX_RATE),
        rate_sources=_count(reg.get("rate_sources", 10_000), "registrar.rate_sources"),
        max_in_flight=_bounded(
            reg.get("max_in_flight", 1000), "registrar.max_in_flight", 10, MAX_RATE
        ),
        ipv6=ipv6,
        mdns_backend=mdns_backend,
        log_level=log_level,
        log_format=log_format,
        components=components,
        fallback_registrar=fallback,
        fallback_after=_fallback_after(raw.get("fallback_after", "10s")),
        report_interval=_interval(reg.get("report_interval", "30s"), "registrar.report_interval"),
        ca_fingerprint=ca_fingerprint,
        allowed_ranges=allowed,
        dnssd=_dnssd(raw.get("dnssd"), len(components)),
        certificates=_certificates(reg),
        eucalyptus=_eucalyptus(raw.get("eucalyptus"), key_dir),
    )


def _eucalyptus(value: Any, key_dir: Path) -> EucalyptusKeys:
    try:
        return parse_eucalyptus(value, key_dir)
    except EucalyptusConfigError as exc:
        raise ConfigError(str(exc)) from None


def _certificates(reg: Mapping[str, Any]) -> RenewalPolicy:
    lifetime = parse_duration(
        reg.get("certificate_lifetime", "1825d"), "registrar.certificate_lifetime"
    )
    before = reg.get("certificate_renew_before")
    policy = RenewalPolicy(
        lifetime,
        None if before is None else parse_duration(before, "registrar.certificate_renew_before"),
    )
    problem = policy.problem()
    if problem is not None:
        raise ConfigError(f"registrar.{problem}")
    return policy


BATCHABLE = {role.hook_name: role for role in Role if role is not Role.CLC}


def _fallback_after(value: Any) -> float:
    if not isinstance(value, bool) and value in (0, "0", "0s"):
        return 0.0  # no wait for mDNS at all: a site it never reaches
    return parse_duration(value, "fallback_after", 3600.0)


def _interval(value: Any, key: str) -> float:
    seconds = parse_duration(value, key, 3600.0)
    if seconds < 1.0:
        # A component renews within this: below a second it would do little else.
        raise ConfigError(f"{key}: at least 1s, got {_shown(value)}")
    return seconds


def _batch_hooks(value: Any) -> frozenset[Role]:
    """Hook scripts (by name) whose runs may be batched: a list of walrus, cluster, storage,
    node, each at most once."""
    names = ", ".join(BATCHABLE)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"registrar.batch_hooks: expected a list of hook names ({names}), got {_shown(value)}"
        )
    unknown = [v for v in value if v not in BATCHABLE]
    if unknown:
        raise ConfigError(
            f"registrar.batch_hooks: {_shown(unknown[0])} is not a hook; expected {names}"
        )
    if len(set(value)) != len(value):
        raise ConfigError(f"registrar.batch_hooks: a hook is named twice in {_shown(value)}")
    return frozenset(BATCHABLE[v] for v in value)


def _fallback(value: Any) -> tuple[str, int] | None:
    return None if value is None else registrar_url(value, "fallback_registrar")


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
        or not _is_host(match["host"], ipv6=False)
    ):
        raise ConfigError(
            f"{key}: expected 'https://HOST:PORT' of a registrar, got {_shown(value)}"
        )
    return match["host"], int(match["port"])


def _components(
    raw: Any, host_address: IPAddress, allowed: tuple[IPNetwork, ...]
) -> tuple[ComponentConfig, ...]:
    if raw is None:
        raise ConfigError("components: required; name at least one of clc, walrus, cc, sc, nc")
    table = _table(raw, "components")
    if not table:
        raise ConfigError("components: empty; name at least one of clc, walrus, cc, sc, nc")
    out = []
    for name, body in table.items():
        try:
            role = Role(name)
        except ValueError:
            raise ConfigError(
                f"components.{_key(name)}: unknown component; expected clc, walrus, cc, sc or nc"
            ) from None
        key = f"components.{name}"
        body = _table(body, key)
        _no_unknown(body, {"cluster", "address", "installed", "token"}, f"{key}.")
        cluster = body.get("cluster")
        if role.needs_cluster:
            if cluster is None:
                raise ConfigError(f"{key}.cluster: required for a {name} (the cluster it serves)")
            if not isinstance(cluster, str) or not grammar.CLUSTER.fullmatch(cluster):
                raise ConfigError(
                    f"{key}.cluster: {_shown(cluster)} is not a cluster name "
                    "(letters, digits, '.', '_' and '-', at most 64)"
                )
        elif cluster is not None:
            raise ConfigError(f"{key}.cluster: a {name} belongs to no cluster; remove the key")
        address = (
            _address(body["address"], f"{key}.address", auto=False, allowed=allowed)
            if "address" in body
            else host_address
        )
        installed_raw = body.get("installed", f"/var/lib/dpkg/info/{PACKAGES[role]}.list")
        if installed_raw is True:
            installed = None
        elif isinstance(installed_raw, str) and installed_raw and "\0" not in installed_raw:
            installed = Path(installed_raw)
        else:
            raise ConfigError(
                f"{key}.installed: expected a path or true (skip the check), "
                f"got {_shown(installed_raw)}"
            )
        token = body.get("token")
        if token is not None:
            if not isinstance(token, str):
                raise ConfigError(f"{key}.token: expected the token string, got {_shown(token)}")
            try:
                parse_token(token)
            except TokenError as exc:
                raise ConfigError(f"{key}.token: {exc}") from None
        out.append(ComponentConfig(role, cluster, address, installed, token))
    clusters = {c.cluster for c in out if c.role is Role.CC}
    for comp in out:
        if comp.role is Role.NC and clusters and comp.cluster not in clusters:
            raise ConfigError(
                f"components.nc.cluster: {comp.cluster!r} differs from this host's CC cluster"
            )
    return tuple(out)


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


def _dnssd(value: Any, components: int) -> DnssdConfig | None:
    if value is None:
        return None
    table = _table(value, "dnssd")
    _no_unknown(table, _DNSSD_KEYS, "dnssd.")
    enabled = _boolean(table.get("enabled", True), "dnssd.enabled")
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
            f"(tsig_key_name {_shown(key_name)}), so name their files apart with {{role}} or "
            f"{{instance}}, e.g. '/etc/eucareg/dnssd/{{role}}.key'; got {_shown(secret_file)}"
        )
    algorithm = _choice(
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
        prune_file = _path(prune_file, "dnssd.prune_secret_file")
    config = DnssdConfig(
        domain=domain,
        server=server,
        tsig_key_name=key_name,
        tsig_secret_file=secret_file,
        tsig_algorithm=algorithm,
        prune_key_name=prune_name,
        prune_secret_file=prune_file,
        refresh=_interval(table.get("refresh", "60s"), "dnssd.refresh"),
        browse_interval=_interval(table.get("browse_interval", "5s"), "dnssd.browse_interval"),
        mdns=_boolean(table.get("mdns", True), "dnssd.mdns"),
    )
    return config if enabled else None


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_shown(value)}")
    return value


def _is_dns_name(name: str) -> bool:
    labels = name.removesuffix(".").split(".")
    return len(name.removesuffix(".")) <= 253 and all(_DNS_LABEL.fullmatch(x) for x in labels)


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not value or not _is_dns_name(value):
        raise ConfigError(
            f"dnssd.domain: expected a DNS domain such as 'site.example', got {_shown(value)}"
        )
    domain = value.lower().removesuffix(".")
    if domain == "local" or domain.endswith(".local"):
        raise ConfigError(
            f"dnssd.domain: {_shown(value)} is the mDNS domain; name the site's own DNS domain"
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
        raise ConfigError(f"dnssd.server: {problem}, got {_shown(value)}")
    host = match["v6"] or match["v4"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"dnssd.server: {problem}, got {_shown(value)}") from None
    port = grammar.integer_or_none(match["port"], 1, 65535) if match["port"] else 53
    if port is None:
        raise ConfigError(f"dnssd.server: {match['port']!r} is not a port (1-65535)")
    return str(address), port


def _placeholders(value: str, key: str) -> set[str]:
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError:
        raise ConfigError(
            f"{key}: unbalanced braces in {_shown(value)}; placeholders are "
            + ", ".join(f"{{{p}}}" for p in DNSSD_PLACEHOLDERS)
        ) from None
    names = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in DNSSD_PLACEHOLDERS or spec or conversion:
            raise ConfigError(
                f"{key}: unknown placeholder {{{_shown(name)[1:-1]}}}; expected "
                + ", ".join(f"{{{p}}}" for p in DNSSD_PLACEHOLDERS)
            )
        names.add(name)
    return names


def expand_template(template: str, *, instance: str, role: str, domain: str) -> str:
    """A [dnssd] template with its placeholders filled in (docs/dnssd.md)."""
    return template.format(instance=instance, role=role, domain=domain.removesuffix("."))


def _dns_name_template(value: Any, key: str, domain: str, *, fixed: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a TSIG key name, got {_shown(value)}")
    names = _placeholders(value, key)
    if fixed and names:
        raise ConfigError(
            f"{key}: one key for every instance; no placeholders, got {_shown(value)}"
        )
    sample = expand_template(value, domain=domain, **_PLACEHOLDER_SAMPLES)
    if not _is_dns_name(sample):
        raise ConfigError(
            f"{key}: {_shown(value)} is not a DNS name (TSIG keys are named like one)"
        )
    return value


def _path_template(value: Any, key: str) -> str:
    path = _path(value, key)
    _placeholders(str(path), key)
    return str(path)


def _is_host(value: str, *, ipv6: bool) -> bool:
    try:
        grammar.host(value, "host", ipv6=ipv6)
    except Invalid:
        return False
    return True


def _shown(value: Any) -> str:
    """A value for a message, cut short (grammar.shown)."""
    return grammar.shown(value)


def _key(name: str) -> str:
    """A key from the file as a message names it: as written, or quoted and cut if odd."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name, re.ASCII) else _shown(name)


def _no_unknown(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{prefix}{_key(unknown[0])}: unknown key (allowed here: {', '.join(sorted(allowed))})"
        )


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {_shown(value)}")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_shown(value)}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {_shown(value)}")
    return str(value)


def _path(value: Any, key: str) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{key}: expected a path, got {_shown(value)}")
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"{key}: {_shown(value)} must be an absolute path")
    return path


def _address(value: Any, key: str, *, auto: bool, allowed: tuple[IPNetwork, ...] = ()) -> IPAddress:
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


def _ranges(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list) or len(value) > MAX_ALLOWED_RANGES:
        raise ConfigError(
            f"allowed_ranges: expected a list of at most {MAX_ALLOWED_RANGES} ranges such as "
            f"'100.64.0.0/10', got {grammar.shown(value)}"
        )
    try:
        return tuple(grammar.network(item, "allowed_ranges") for item in value)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def _count(value: Any, key: str) -> int:
    """A limit on stored things: a whole number from 100 to 10,000,000."""
    try:
        return grammar.integer(value, key, 100, MAX_COUNT)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def _bounded(value: Any, key: str, low: int, high: int) -> int:
    """A whole number from `low` to `high` (request limits)."""
    try:
        return grammar.integer(value, key, low, high)
    except Invalid as exc:
        raise ConfigError(str(exc)) from None


def _port(value: Any, key: str) -> int:
    try:
        return grammar.port(value, key)
    except Invalid as exc:
        raise ConfigError(f"{key}: expected a TCP port number (1-65535); {exc.reason}") from None


def _sshd(value: Any) -> tuple[str, int] | None:
    if value is False:
        return None
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if ":" not in host:  # brackets hold an IPv6 address, nothing else
                host = ""
        if host and _is_host(host, ipv6=True) and grammar.integer_or_none(port, 1, 65535):
            return host, int(port)
    raise ConfigError(
        f"preconditions.sshd: expected 'HOST:PORT' of the local sshd, or false, got {_shown(value)}"
    )
