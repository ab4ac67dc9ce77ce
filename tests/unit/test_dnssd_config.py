"""The `[dnssd]` table: defaults, and errors that name the key (docs/configuration.md,
docs/dnssd.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eucareg.config import file as config
from eucareg.config.dnssd import DnssdConfig, expand_template
from eucareg.config.values import ConfigError

MINIMAL = {"domain": "Site.Example", "server": "10.0.2.53", "tsig_secret_file": "/k/{role}.key"}


def parse(dnssd: Any, components: dict[str, Any] | None = None) -> DnssdConfig | None:
    raw = {
        "address": "10.1.2.3",
        "components": components or {"nc": {"cluster": "c1"}},
        "dnssd": dnssd,
    }
    return config.from_mapping(raw).dnssd


def test_no_table_no_dnssd() -> None:
    cfg = config.from_mapping({"address": "10.1.2.3", "components": {"nc": {"cluster": "c1"}}})
    assert cfg.dnssd is None


def test_defaults() -> None:
    got = parse(MINIMAL)
    assert got == DnssdConfig(
        domain="site.example.",
        server=("10.0.2.53", 53),
        tsig_key_name="{instance}._eucalyptus._tcp.{domain}",
        tsig_secret_file="/k/{role}.key",
        tsig_algorithm="hmac-sha256",
        prune_key_name=None,
        prune_secret_file=None,
        refresh=60.0,
        browse_interval=5.0,
        mdns=True,
    )


def test_everything_set(tmp_path: Path) -> None:
    text = """
address = "10.1.2.3"
[components.clc]
installed = true
[components.cc]
cluster = "c1"
[dnssd]
enabled = true
domain = "site.example."
server = "[fd00::53]:5353"
tsig_key_name = "eucareg-{role}.keys.site.example"
tsig_algorithm = "hmac-sha512"
tsig_secret_file = "/etc/eucareg/dnssd/{role}.key"
prune_key_name = "eucareg-prune"
prune_secret_file = "/etc/eucareg/dnssd/prune.key"
refresh = "2m"
browse_interval = "10s"
mdns = false
"""
    path = tmp_path / "eucareg.toml"
    path.write_text(text)
    got = config.load(path).dnssd
    assert got is not None
    assert got.server == ("fd00::53", 5353) and got.domain == "site.example."
    assert got.tsig_algorithm == "hmac-sha512" and got.refresh == 120 and got.browse_interval == 10
    assert got.prune_key_name == "eucareg-prune"
    assert got.prune_secret_file == Path("/etc/eucareg/dnssd/prune.key")
    assert got.mdns is False
    key = expand_template(got.tsig_key_name, instance="x", role="cc", domain=got.domain)
    assert key == "eucareg-cc.keys.site.example"


def test_enabled_false_keeps_the_table_checked_but_off() -> None:
    assert parse({**MINIMAL, "enabled": False}) is None
    with pytest.raises(ConfigError, match=r"^dnssd.domain:"):
        parse({**MINIMAL, "enabled": False, "domain": "a b"})


def test_templates_expand() -> None:
    got = parse(MINIMAL)
    assert got is not None
    fill = {"instance": "node-nc-0123456789ab", "role": "nc", "domain": got.domain}
    assert expand_template(got.tsig_key_name, **fill) == (
        "node-nc-0123456789ab._eucalyptus._tcp.site.example"
    )
    assert expand_template(got.tsig_secret_file, **fill) == "/k/nc.key"


ERRORS = [
    ("not a table", "^dnssd: expected a table, got"),
    ({**MINIMAL, "zone": "x"}, r"^dnssd.zone: unknown key \(allowed here: browse_interval, "),
    ({**MINIMAL, "enabled": "yes"}, "^dnssd.enabled: expected true or false, got 'yes'"),
    ({k: v for k, v in MINIMAL.items() if k != "domain"}, "^dnssd.domain: required"),
    ({**MINIMAL, "domain": "site .example"}, "^dnssd.domain: expected a DNS domain"),
    ({**MINIMAL, "domain": 5}, "^dnssd.domain: expected a DNS domain"),
    ({**MINIMAL, "domain": "a" * 64 + ".example"}, "^dnssd.domain: expected a DNS domain"),
    ({**MINIMAL, "domain": "local."}, "^dnssd.domain: 'local.' is the mDNS domain"),
    ({**MINIMAL, "domain": "x.LOCAL"}, "^dnssd.domain: 'x.LOCAL' is the mDNS domain"),
    ({k: v for k, v in MINIMAL.items() if k != "server"}, "^dnssd.server: required"),
    ({**MINIMAL, "server": "ns1.site.example"}, "^dnssd.server: expected 'ADDRESS' or"),
    ({**MINIMAL, "server": "10.0.0.1:99999"}, r"^dnssd.server: '99999' is not a port"),
    ({**MINIMAL, "server": "10.0.0.1:0"}, r"^dnssd.server: '0' is not a port"),
    ({**MINIMAL, "server": "::1"}, "^dnssd.server: expected 'ADDRESS' or"),
    ({**MINIMAL, "server": "300.1.1.1"}, "^dnssd.server: expected 'ADDRESS' or"),
    ({**MINIMAL, "server": 53}, "^dnssd.server: expected 'ADDRESS' or"),
    ({**MINIMAL, "tsig_key_name": "{host}.x"}, r"^dnssd.tsig_key_name: unknown placeholder"),
    ({**MINIMAL, "tsig_key_name": "{instance"}, r"^dnssd.tsig_key_name: unbalanced braces"),
    ({**MINIMAL, "tsig_key_name": "{role!r}"}, r"^dnssd.tsig_key_name: unknown placeholder"),
    ({**MINIMAL, "tsig_key_name": "a b"}, "^dnssd.tsig_key_name: 'a b' is not a DNS name"),
    ({**MINIMAL, "tsig_key_name": ""}, "^dnssd.tsig_key_name: expected a TSIG key name"),
    (
        {k: v for k, v in MINIMAL.items() if k != "tsig_secret_file"},
        "^dnssd.tsig_secret_file: required",
    ),
    (
        {**MINIMAL, "tsig_secret_file": "keys/{role}"},
        "^dnssd.tsig_secret_file: .* must be an absolute",
    ),
    ({**MINIMAL, "tsig_secret_file": "/k/{who}"}, r"^dnssd.tsig_secret_file: unknown placeholder"),
    ({**MINIMAL, "tsig_secret_file": 7}, "^dnssd.tsig_secret_file: expected a path"),
    (
        {**MINIMAL, "tsig_algorithm": "hmac-md5"},
        "^dnssd.tsig_algorithm: expected one of hmac-sha256",
    ),
    (
        {**MINIMAL, "prune_key_name": "p"},
        "^dnssd.prune_secret_file: required with dnssd.prune_key_name",
    ),
    (
        {**MINIMAL, "prune_secret_file": "/p"},
        "^dnssd.prune_key_name: required with dnssd.prune_secret_file",
    ),
    (
        {**MINIMAL, "prune_key_name": "{role}", "prune_secret_file": "/p"},
        "^dnssd.prune_key_name: one key",
    ),
    (
        {**MINIMAL, "prune_key_name": "p", "prune_secret_file": "p"},
        "^dnssd.prune_secret_file: 'p' must be an absolute",
    ),
    ({**MINIMAL, "refresh": "0.5s"}, "^dnssd.refresh: at least 1s"),
    ({**MINIMAL, "refresh": "2h"}, "^dnssd.refresh:"),
    ({**MINIMAL, "refresh": "soon"}, "^dnssd.refresh:"),
    ({**MINIMAL, "browse_interval": 0}, "^dnssd.browse_interval:"),
    ({**MINIMAL, "mdns": "off"}, "^dnssd.mdns: expected true or false, got 'off'"),
]


@pytest.mark.parametrize(
    ("table", "message"),
    ERRORS,
    ids=[m.split(":")[0][1:] + f"-{i}" for i, (_, m) in enumerate(ERRORS)],
)
def test_errors_name_the_key(table: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(table)


def test_one_secret_file_for_several_own_keys_is_refused() -> None:
    components = {"cc": {"cluster": "c1"}, "sc": {"cluster": "c1"}}
    with pytest.raises(ConfigError, match=r"^dnssd.tsig_secret_file: this host's components"):
        parse({**MINIMAL, "tsig_secret_file": "/k/one.key"}, components)
    # One component, or one key for all: one file is right.
    assert parse({**MINIMAL, "tsig_secret_file": "/k/one.key"}) is not None
    shared = {**MINIMAL, "tsig_key_name": "eucareg-site", "tsig_secret_file": "/k/site.key"}
    assert parse(shared, components) is not None


def test_a_file_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "eucareg.toml"
    path.write_text('address = "10.1.2.3"\n[components.nc]\ncluster = "c"\n[dnssd]\ndomain = 3\n')
    with pytest.raises(ConfigError, match=r"eucareg.toml: dnssd.domain: expected a DNS"):
        config.load(path)
