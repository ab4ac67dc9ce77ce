"""The `[components.*]` tables: which Eucalyptus components run on this host, in which
cluster, at which address, how their installation is detected, and their join tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eucareg.core import grammar
from eucareg.core.grammar import IPNetwork
from eucareg.core.model import IPAddress, Role
from eucareg.core.trust import TokenError, parse_token

from . import values
from .values import ConfigError, shown, shown_key

# dpkg keeps a file list for every installed package; its presence means "installed".
PACKAGES = {
    Role.CLC: "eucalyptus-cloud",
    Role.WALRUS: "eucalyptus-walrus",
    Role.CC: "eucalyptus-cc",
    Role.SC: "eucalyptus-sc",
    Role.NC: "eucalyptus-nc",
}


@dataclass(frozen=True)
class ComponentConfig:
    role: Role
    cluster: str | None
    address: IPAddress
    # Path whose existence means "installed", or None to skip the check.
    installed: Path | None
    # Join token the operator issued for this component (eucareg1.…), if any.
    token: str | None = None


def parse(
    raw: Any, host_address: IPAddress, allowed: tuple[IPNetwork, ...]
) -> tuple[ComponentConfig, ...]:
    """The `[components]` table: each component this host runs, at `host_address` unless it
    names an address of its own (inside `allowed` or the usual ranges)."""
    if raw is None:
        raise ConfigError("components: required; name at least one of clc, walrus, cc, sc, nc")
    table = values.table(raw, "components")
    if not table:
        raise ConfigError("components: empty; name at least one of clc, walrus, cc, sc, nc")
    out = []
    for name, body in table.items():
        try:
            role = Role(name)
        except ValueError:
            raise ConfigError(
                f"components.{shown_key(name)}: unknown component; "
                "expected clc, walrus, cc, sc or nc"
            ) from None
        key = f"components.{name}"
        body = values.table(body, key)
        values.no_unknown(body, {"cluster", "address", "installed", "token"}, f"{key}.")
        cluster = body.get("cluster")
        if role.needs_cluster:
            if cluster is None:
                raise ConfigError(f"{key}.cluster: required for a {name} (the cluster it serves)")
            if not isinstance(cluster, str) or not grammar.CLUSTER.fullmatch(cluster):
                raise ConfigError(
                    f"{key}.cluster: {shown(cluster)} is not a cluster name "
                    "(letters, digits, '.', '_' and '-', at most 64)"
                )
        elif cluster is not None:
            raise ConfigError(f"{key}.cluster: a {name} belongs to no cluster; remove the key")
        address = (
            values.address(body["address"], f"{key}.address", auto=False, allowed=allowed)
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
                f"got {shown(installed_raw)}"
            )
        token = body.get("token")
        if token is not None:
            if not isinstance(token, str):
                raise ConfigError(f"{key}.token: expected the token string, got {shown(token)}")
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
