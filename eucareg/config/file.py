"""The agent's configuration file (TOML): reading it, its top-level keys and the
[preconditions], [registrar] and [mdns] tables, into one Config; components.py, dnssd.py and
eucalyptus.py parse the other tables, values.py checks single values.

Every problem is reported as a ConfigError naming the key and the reason, and the agent does not
start. docs/configuration.md documents each key; keep the two in step.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eucareg.core import grammar
from eucareg.core.grammar import Invalid, IPNetwork
from eucareg.core.model import IPAddress, Role
from eucareg.core.renewal import DEFAULT_POLICY, RenewalPolicy

from . import values
from .components import ComponentConfig
from .components import parse as parse_components
from .dnssd import DnssdConfig
from .dnssd import parse as parse_dnssd
from .eucalyptus import EucalyptusConfigError, EucalyptusKeys
from .eucalyptus import parse as parse_eucalyptus
from .values import ConfigError, parse_duration, shown

DEFAULT_STATE_DIR = Path("/var/lib/eucareg")
SOCKET_FILE = "api.sock"  # the operator API socket, in state_dir (docs/cli.md)
DEFAULT_HOOK_DIR = Path("/etc/eucareg/hooks")
DEFAULT_API_PORT = 8780
MDNS_BACKENDS = ("auto", "avahi", "zeroconf")  # [mdns] backend (docs/mdns.md)
DEFAULT_SSHD = "127.0.0.1:22"
DEFAULT_EUCAVERS = "3.4"
MAX_CONFIG_BYTES = 1024 * 1024  # a configuration is a few hundred bytes
MAX_RATE = 1_000_000  # the largest request rate, burst or in-flight limit (effectively none)


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
    values.no_unknown(raw, _TOP_KEYS, "")
    allowed = values.ranges(raw.get("allowed_ranges", []))
    address = values.address(raw.get("address"), "address", auto=True, allowed=allowed)
    state_dir = values.path(raw.get("state_dir", DEFAULT_STATE_DIR), "state_dir")
    key_dir = values.path(raw.get("key_dir", state_dir / "keys"), "key_dir")
    hook_dir = values.path(raw.get("hook_dir", DEFAULT_HOOK_DIR), "hook_dir")
    api_port = values.port(raw.get("api_port", DEFAULT_API_PORT), "api_port")
    eucavers = values.string(raw.get("eucalyptus_version", DEFAULT_EUCAVERS), "eucalyptus_version")
    try:
        grammar.version(eucavers, "eucalyptus_version")
    except Invalid as exc:
        raise ConfigError(str(exc)) from None
    log_level = values.choice(
        raw.get("log_level", "info"), "log_level", ("debug", "info", "warning")
    )
    log_format = values.choice(
        raw.get("log_format", "text"), "log_format", ("text", "json", "journal")
    )

    pre = values.table(raw.get("preconditions", {}), "preconditions")
    values.no_unknown(pre, {"sshd", "recheck_interval"}, "preconditions.")
    sshd = _sshd(pre.get("sshd", DEFAULT_SSHD))
    recheck = parse_duration(pre.get("recheck_interval", "5s"), "preconditions.recheck_interval")

    reg = values.table(raw.get("registrar", {}), "registrar")
    values.no_unknown(
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
    mdns = values.table(raw.get("mdns", {}), "mdns")
    values.no_unknown(mdns, {"ipv6", "backend"}, "mdns.")
    ipv6 = mdns.get("ipv6", False)
    if not isinstance(ipv6, bool):
        raise ConfigError(f"mdns.ipv6: expected true or false, got {shown(ipv6)}")
    mdns_backend = mdns.get("backend", "auto")
    if mdns_backend not in MDNS_BACKENDS:
        raise ConfigError(
            f"mdns.backend: expected one of {', '.join(map(repr, MDNS_BACKENDS))}, "
            f"got {shown(mdns_backend)}"
        )

    components = parse_components(raw.get("components"), address, allowed)
    fallback = _fallback(raw.get("fallback_registrar"))
    ca_fingerprint = raw.get("ca_fingerprint")
    if ca_fingerprint is not None and (
        not isinstance(ca_fingerprint, str) or not grammar.FINGERPRINT.fullmatch(ca_fingerprint)
    ):
        raise ConfigError(
            f"ca_fingerprint: expected 'sha256:' and 64 hex digits (eucareg fingerprint on the "
            f"CLC shows it), got {shown(ca_fingerprint)}"
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
        max_events=values.count(reg.get("max_events", 200_000), "registrar.max_events"),
        max_hook_runs=values.count(reg.get("max_hook_runs", 50_000), "registrar.max_hook_runs"),
        max_unadmitted=values.count(reg.get("max_unadmitted", 5000), "registrar.max_unadmitted"),
        max_hooks_running=values.bounded(
            reg.get("max_hooks_running", 64), "registrar.max_hooks_running", 1, 1024
        ),
        batch_hooks=_batch_hooks(reg.get("batch_hooks", [])),
        batch_max=values.bounded(reg.get("batch_max", 100), "registrar.batch_max", 2, 10_000),
        batch_wait=parse_duration(reg.get("batch_wait", "500ms"), "registrar.batch_wait", 60.0),
        rate_limit=values.bounded(reg.get("rate_limit", 10), "registrar.rate_limit", 1, MAX_RATE),
        rate_burst=values.bounded(reg.get("rate_burst", 100), "registrar.rate_burst", 1, MAX_RATE),
        rate_sources=values.count(reg.get("rate_sources", 10_000), "registrar.rate_sources"),
        max_in_flight=values.bounded(
            reg.get("max_in_flight", 1000), "registrar.max_in_flight", 10, MAX_RATE
        ),
        ipv6=ipv6,
        mdns_backend=mdns_backend,
        log_level=log_level,
        log_format=log_format,
        components=components,
        fallback_registrar=fallback,
        fallback_after=_fallback_after(raw.get("fallback_after", "10s")),
        report_interval=values.interval(
            reg.get("report_interval", "30s"), "registrar.report_interval"
        ),
        ca_fingerprint=ca_fingerprint,
        allowed_ranges=allowed,
        dnssd=parse_dnssd(raw.get("dnssd"), len(components)),
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


def _batch_hooks(value: Any) -> frozenset[Role]:
    """Hook scripts (by name) whose runs may be batched: a list of walrus, cluster, storage,
    node, each at most once."""
    names = ", ".join(BATCHABLE)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"registrar.batch_hooks: expected a list of hook names ({names}), got {shown(value)}"
        )
    unknown = [v for v in value if v not in BATCHABLE]
    if unknown:
        raise ConfigError(
            f"registrar.batch_hooks: {shown(unknown[0])} is not a hook; expected {names}"
        )
    if len(set(value)) != len(value):
        raise ConfigError(f"registrar.batch_hooks: a hook is named twice in {shown(value)}")
    return frozenset(BATCHABLE[v] for v in value)


def _fallback(value: Any) -> tuple[str, int] | None:
    return None if value is None else values.registrar_url(value, "fallback_registrar")


def _sshd(value: Any) -> tuple[str, int] | None:
    if value is False:
        return None
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if ":" not in host:  # brackets hold an IPv6 address, nothing else
                host = ""
        if host and values.is_host(host, ipv6=True) and grammar.integer_or_none(port, 1, 65535):
            return host, int(port)
    raise ConfigError(
        f"preconditions.sshd: expected 'HOST:PORT' of the local sshd, or false, got {shown(value)}"
    )
